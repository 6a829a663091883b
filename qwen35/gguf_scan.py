"""A fast read-only scan of a GGUF file: raw metadata values and tensor locations.

gguf's GGUFReader builds Python objects for every token of a 248K-token vocabulary (seconds per
file); this keeps each value as its raw bytes and decodes only scalars and short strings, which
is what comparing, inspecting and verifying files needs.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys
from gguf.gguf_writer import SHARD_NAME_FORMAT

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class GGUFScanError(ValueError):
    pass


@dataclass(frozen=True)
class KV:
    vtype: int
    raw: bytes  # the value's bytes exactly as stored (type tag of arrays included)
    value: object  # decoded scalar / string / short array; None for long arrays


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order
    qtype: GGMLQuantizationType
    offset: int  # absolute file offset
    nbytes: int
    file: Path | None = None  # the split part holding it (scan_model); None: the scanned file


@dataclass
class GGUFScan:
    path: Path
    version: int
    kv: dict[str, KV]
    tensors: list[TensorInfo]

    def data(self, t: TensorInfo) -> np.ndarray:
        return np.memmap(t.file or self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))

    def get(self, key: str, default=None):
        kv = self.kv.get(key)
        return default if kv is None else kv.value


def scan(path: str | Path) -> GGUFScan:
    """One file's header; for a part of a split model, that part alone (see scan_model)."""
    path = Path(path)
    with open(path, "rb", buffering=1 << 20) as f:
        return _scan(path, f)


def split_parts(path: str | Path, first: GGUFScan | None = None) -> list[Path]:
    """Every file of the model that path belongs to, the first part first: [path] for a single
    file; for a split model (llama.cpp's and gguf-split's PREFIX-0000N-of-0000M.gguf, any part
    given) all M parts, which must sit side by side."""
    path = Path(path)
    head = first if first is not None else scan(path)
    count = head.get(Keys.Split.LLM_KV_SPLIT_COUNT, 0) or 0
    if count <= 1:
        return [path]
    m = re.fullmatch(r"(.+)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if not m or int(m.group(3)) != count:
        raise GGUFScanError(
            f"{path} is one of {count} split files but is not named PREFIX-0000N-of-{count:05d}.gguf; "
            "give the parts back the names they were written with"
        )
    parts = [path.with_name(SHARD_NAME_FORMAT.format(m.group(1), i + 1, count)) for i in range(count)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GGUFScanError(
            f"{path} is one of {count} split files and {missing[0]} is missing; put all the parts in one folder"
        )
    return parts


def scan_model(path: str | Path, given: GGUFScan | None = None) -> GGUFScan:
    """The whole model's header: one file's, or for a split model the first part's metadata with
    the tensors of all parts (each TensorInfo names its part), whichever part path is. given:
    scan(path), where the caller has it already."""
    given = given if given is not None else scan(path)
    parts = split_parts(path, given)
    if len(parts) == 1:
        return given
    scans = [given if p == Path(path) else scan(p) for p in parts]
    tensors = []
    for i, (p, s) in enumerate(zip(parts, scans)):
        if s.get(Keys.Split.LLM_KV_SPLIT_NO) != i or s.get(Keys.Split.LLM_KV_SPLIT_COUNT) != len(parts):
            raise GGUFScanError(
                f"{p} is not part {i + 1} of {len(parts)} of {parts[0].name}'s model "
                "(its split.no / split.count say otherwise); re-split or re-convert the model"
            )
        tensors += [replace(t, file=p) for t in s.tensors]
    first = scans[0]
    expected = first.get(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if expected is not None and expected != len(tensors):
        raise GGUFScanError(
            f"the {len(parts)} parts of {parts[0].name} hold {len(tensors)} tensors, "
            f"split.tensors.count says {expected}; re-split or re-convert the model"
        )
    return GGUFScan(parts[0], first.version, first.kv, tensors)


# llama.cpp's own bounds (gguf.cpp, ggml.h): what it refuses, refused here first with the reason
_MAX_DIMS = 4
_MAX_ALIGN = 1 << 16


def _scan(path: Path, f) -> GGUFScan:
    """Reads the header only (metadata and tensor infos), never the tensor data. Every length
    is checked against what is left of the file before anything is read or allocated."""
    import os

    size = os.fstat(f.fileno()).st_size

    def take(n: int) -> bytes:
        if n > size - f.tell():
            raise GGUFScanError(f"{path} is truncated or damaged (a length of {n} bytes runs past the end)")
        b = f.read(n)
        if len(b) != n:
            raise GGUFScanError(f"{path} is truncated")
        return b

    def u(fmt: str):
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        return take(u("<Q")).decode("utf-8", errors="replace")

    def value(vtype: int, decode: bool, depth: int = 0):
        if vtype == GGUFValueType.STRING:
            return string()
        if vtype in _SCALAR:
            return u(_SCALAR[vtype])
        if vtype == GGUFValueType.ARRAY and depth == 0:  # llama.cpp does not nest arrays
            etype, count = u("<I"), u("<Q")
            keep = decode and count <= 64
            if etype in _SCALAR:
                keep = decode and count <= 1024  # per-layer values (up to 512 layers) are read
                itemsize = struct.calcsize(_SCALAR[etype])
                raw = take(itemsize * count)
                return list(struct.unpack(f"<{count}{_SCALAR[etype][1]}", raw)) if keep else None
            if etype != GGUFValueType.STRING:
                raise GGUFScanError(f"{path}: an array of value type {etype} is not valid GGUF")
            if count * 8 > size - f.tell():
                raise GGUFScanError(f"{path} is truncated or damaged (an array of {count} strings)")
            items = [value(etype, keep, depth + 1) for _ in range(count)]
            return items if keep else None
        raise GGUFScanError(f"{path}: unknown metadata value type {vtype}")

    if take(4) != b"GGUF":
        raise GGUFScanError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = u("<I"), u("<Q"), u("<Q")
    if version not in (2, 3):
        raise GGUFScanError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
    if n_kv * 12 > size or n_tensors * 24 > size:  # each entry takes at least that many bytes
        raise GGUFScanError(f"{path} is damaged: it claims {n_kv} metadata keys and {n_tensors} tensors")
    kv = {}
    for _ in range(n_kv):
        key, vtype = string(), u("<I")
        if key in kv:
            raise GGUFScanError(f"{path} is damaged: metadata key {key!r} appears twice")
        start = f.tell()
        val = value(vtype, True)
        end = f.tell()
        f.seek(start)
        kv[key] = KV(vtype, f.read(end - start), val)
    infos = []
    names = set()
    for _ in range(n_tensors):
        name = string()
        n_dims = u("<I")
        if n_dims > _MAX_DIMS:
            raise GGUFScanError(f"{path} is damaged: tensor {name!r:.60} has {n_dims} dimensions (at most 4)")
        ne = tuple(u("<Q") for _ in range(n_dims))
        raw_type, offset = u("<I"), u("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFScanError(f"{path}: tensor {name!r:.60} has unknown type {raw_type}") from None
        if name in names:
            raise GGUFScanError(f"{path} is damaged: tensor {name!r:.60} appears twice")
        names.add(name)
        n = 1
        for d in ne:
            n *= d
        if n and ((ne[0] if ne else 1) % block or n // block * type_size > size):
            raise GGUFScanError(f"{path} is damaged: tensor {name!r:.60} of shape {list(ne)} does not fit")
        infos.append((name, ne, qtype, offset, n // block * type_size))
    align = kv["general.alignment"].value if "general.alignment" in kv else 32
    if type(align) is not int or not 0 < align <= _MAX_ALIGN or align & (align - 1):
        raise GGUFScanError(f"{path}: general.alignment is {align!r}, not a power of two")
    data_start = (f.tell() + align - 1) // align * align
    tensors = []
    for name, ne, qtype, offset, nbytes in infos:
        if offset % align or data_start + offset + nbytes > size:
            raise GGUFScanError(
                f"{path} is truncated or damaged: tensor {name!r:.60} lies outside the file; re-download or re-convert it"
            )
        tensors.append(TensorInfo(name, ne, qtype, data_start + offset, nbytes))
    return GGUFScan(path, version, kv, tensors)


# ---------------------------------------------------------------- Qwen3.5 hyper-parameters
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string


def qwen35_hparams(s: GGUFScan) -> dict:
    """The hyper-parameters of a Qwen3.5 GGUF that llama.cpp sizes memory and graphs by, checked
    the way its loader checks them, and more: what its loader would GGML_ASSERT on (aborting the
    process), divide by, or build an impossible graph from is refused here with the reason, so
    that a damaged or hand-made file never reaches it. Keys llama.cpp reads with an exact type
    it checks itself (a wrong type is a clean error there)."""
    arch = s.get("general.architecture")
    if arch not in ("qwen35", "qwen35moe"):
        raise GGUFScanError(f"{s.path} is a {arch!r:.40} model, not Qwen3.5 (qwen35 or qwen35moe)")

    def bad(key: str, v, need: str) -> GGUFScanError:
        return GGUFScanError(f"{s.path} is damaged: {arch}.{key} is {v!r:.60}, {need}; re-convert the model")

    def whole(key: str, lo: int, hi: int, default=None, *, per_layer: int = 0) -> int:
        v = s.get(f"{arch}.{key}", default)
        if per_layer and isinstance(v, list) and len(v) == per_layer:
            vals = v
        else:
            vals = [v]
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
                raise bad(key, v, f"it must be a whole number from {lo} to {hi}")
        return max(vals)

    n_block = whole("block_count", 1, 512)
    kv = s.kv.get(f"{arch}.block_count")
    if kv is not None and kv.vtype == GGUFValueType.ARRAY:
        raise bad("block_count", "an array", "it must be a whole number")
    n_mtp = whole("nextn_predict_layers", 0, n_block - 1, 0)
    n_layer = n_block - n_mtp
    hp = {"arch": arch, "n_block": n_block, "n_mtp": n_mtp, "n_layer": n_layer}
    hp["n_embd"] = whole("embedding_length", 1, 1 << 17)
    hp["n_ctx_train"] = whole("context_length", 1, 1 << 31)
    hp["n_head"] = whole("attention.head_count", 1, 4096, per_layer=n_block)
    hp["n_head_kv"] = whole("attention.head_count_kv", 1, 4096, hp["n_head"], per_layer=n_block)
    heads, kv_heads = s.get(f"{arch}.attention.head_count"), s.get(f"{arch}.attention.head_count_kv", hp["n_head"])
    for h, k in zip(
        heads if isinstance(heads, list) else [heads] * n_block,
        kv_heads if isinstance(kv_heads, list) else [kv_heads] * n_block,
    ):
        if h % k:
            raise bad("attention.head_count_kv", kv_heads, f"the {h} attention heads must be a multiple of it")
    hp["head_dim"] = whole("attention.key_length", 1, 4096, max(hp["n_embd"] // hp["n_head"], 1))
    hp["head_dim_v"] = whole("attention.value_length", 1, 4096, hp["head_dim"])
    n_rot = whole("rope.dimension_count", 0, hp["head_dim"], hp["head_dim"])
    if n_rot % 2:
        raise bad("rope.dimension_count", n_rot, "it must be even")
    sections = s.get(f"{arch}.rope.dimension_sections")
    if (
        not isinstance(sections, list)
        or len(sections) != 4
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in sections)
        or not 0 < sum(sections) <= hp["head_dim"]
    ):  # llama.cpp's rope divides by their sum and asserts it is at most the head size
        raise bad("rope.dimension_sections", sections, f"it must be 4 counts summing to 1..{hp['head_dim']}")
    scaling = s.get(f"{arch}.rope.scaling.type", "linear")
    if scaling not in ROPE_SCALING_TYPES:
        raise bad("rope.scaling.type", scaling, f"it must be one of {', '.join(ROPE_SCALING_TYPES)}")
    eps = s.get(f"{arch}.attention.layer_norm_rms_epsilon")
    if not isinstance(eps, float) or not 0 < eps < 1:
        raise bad("attention.layer_norm_rms_epsilon", eps, "it must be a number between 0 and 1")
    hp["conv_kernel"] = whole("ssm.conv_kernel", 1, 64)
    hp["d_k"] = whole("ssm.state_size", 1, 4096)
    hp["n_k"] = whole("ssm.group_count", 1, 4096)
    hp["n_v"] = whole("ssm.time_step_rank", 1, 4096)
    hp["d_inner"] = whole("ssm.inner_size", 1, 1 << 20)
    if hp["n_v"] % hp["n_k"]:
        raise bad("ssm.time_step_rank", hp["n_v"], f"it must be a multiple of ssm.group_count ({hp['n_k']})")
    if hp["d_inner"] != hp["d_k"] * hp["n_v"]:
        raise bad("ssm.inner_size", hp["d_inner"], "it must be ssm.state_size x ssm.time_step_rank")
    hp["d_v"] = hp["d_inner"] // hp["n_v"]
    recurrent = s.get(f"{arch}.attention.recurrent_layers")
    if recurrent is None and f"{arch}.attention.recurrent_layers" in s.kv:
        recurrent = "an array too long to read"
    if recurrent is not None:
        if not isinstance(recurrent, list) or len(recurrent) != n_block or any(r not in (0, 1) for r in recurrent):
            raise bad("attention.recurrent_layers", recurrent, f"it must be {n_block} true/false values")
        hp["recurrent"] = [bool(r) for r in recurrent[:n_layer]]
    else:
        interval = whole("full_attention_interval", 1, 4096, 4)
        hp["recurrent"] = [(i + 1) % interval != 0 for i in range(n_layer)]
    hp["n_expert"] = whole("expert_count", 0, 1024, 0)
    used = whole("expert_used_count", 0, 1024, 0, per_layer=n_block)
    groups = whole("expert_group_count", 0, 1024, 0)
    if used > hp["n_expert"] or (hp["n_expert"] > 0) != (used > 0) or (groups and groups >= hp["n_expert"]):
        raise bad("expert_used_count", used, f"it does not fit expert_count {hp['n_expert']}")
    if groups > 1:
        raise bad("expert_group_count", groups, "Qwen3.5 does not group experts")
    if arch == "qwen35moe" and hp["n_expert"] == 0:
        raise bad("expert_count", 0, "a qwen35moe model has experts")
    hp["n_expert_used"] = used
    hp["n_ff"] = whole("feed_forward_length", 0, 1 << 20, 0, per_layer=n_block)
    n_tokens = hp["n_vocab"] = _check_vocab(s)
    for key, kv in s.kv.items():
        is_id = key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
        if is_id and (not isinstance(kv.value, int) or isinstance(kv.value, bool) or not 0 <= kv.value < n_tokens):
            raise GGUFScanError(f"{s.path} is damaged: {key} is {kv.value!r:.40}, not a token of its {n_tokens}")
    return hp


def _string_array(raw: bytes) -> list[bytes] | None:
    """The items of a stored string array (KV.raw), or None when it holds something else."""
    etype, count = struct.unpack_from("<IQ", raw, 0)
    if etype != GGUFValueType.STRING:
        return None
    out, pos, view = [], 12, memoryview(raw)
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", raw, pos)
        out.append(bytes(view[pos + 8 : pos + 8 + n]))
        pos += 8 + n
    return out


def _check_vocab(s: GGUFScan) -> int:
    """The vocabulary as llama.cpp's BPE loader needs it (it asserts on duplicate tokens, a missing
    newline token, and reads the per-token arrays without checking their lengths)."""

    def damaged(what: str) -> GGUFScanError:
        return GGUFScanError(f"{s.path} is damaged: {what}; re-convert the model")

    if s.get("tokenizer.ggml.model") != "gpt2":
        raise damaged(f"tokenizer.ggml.model is {s.get('tokenizer.ggml.model')!r:.40}, Qwen3.5 uses gpt2 (BPE)")
    kv = s.kv.get("tokenizer.ggml.tokens")
    tokens = _string_array(kv.raw) if kv is not None and kv.vtype == GGUFValueType.ARRAY else None
    if not tokens:
        raise damaged("tokenizer.ggml.tokens is missing or not a list of strings")
    # llama.cpp takes each token as a C string: what follows a NUL byte is not part of it
    tokens = [t.split(b"\0", 1)[0] for t in tokens]
    if len(set(tokens)) != len(tokens):
        raise damaged("tokenizer.ggml.tokens has the same token twice")
    if "\u010a".encode() not in tokens:  # byte-level BPE's newline
        raise damaged("tokenizer.ggml.tokens has no newline token")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        kv = s.kv.get(key)
        if kv is None:
            continue
        etype, count = struct.unpack_from("<IQ", kv.raw, 0) if kv.vtype == GGUFValueType.ARRAY else (None, None)
        want = GGUFValueType.INT32 if key.endswith("type") else GGUFValueType.FLOAT32
        if etype != want or count != len(tokens):
            raise damaged(f"{key} does not have one {want.name.lower()} per token")
    kv = s.kv.get("tokenizer.ggml.merges")
    if kv is None or kv.vtype != GGUFValueType.ARRAY or struct.unpack_from("<I", kv.raw, 0)[0] != GGUFValueType.STRING:
        raise damaged("tokenizer.ggml.merges is missing or not a list of strings")
    return len(tokens)
