"""Read a Hugging Face Qwen3.5 checkpoint directory: config, shards, lazily loaded tensors.

Only safetensors are read (never pickle). Tensors are read with pread, whole or a row range at
a time, as float32 numpy arrays, so memory stays bounded by the data in flight. The
safetensors header (8-byte length + JSON) is parsed here because the safetensors package
cannot hand bf16 data to numpy.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARCHITECTURES = {
    "Qwen3_5ForCausalLM": "qwen35",
    "Qwen3_5ForConditionalGeneration": "qwen35",
    "Qwen3_5MoeForCausalLM": "qwen35moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen35moe",
}

# transformers' Qwen3_5TextConfig / Qwen3_5MoeTextConfig defaults for keys that reach the GGUF
# (a config.json written by save_pretrained carries them all; hand-written ones may not).
TEXT_DEFAULTS = {
    "vocab_size": 248320,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "head_dim": 256,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "tie_word_embeddings": False,
}
MOE_DEFAULTS = {
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "num_experts": 256,
    "num_experts_per_tok": 8,
}
ROPE_DEFAULTS = {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}

DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}


class CheckpointError(ValueError):
    """A problem with the input checkpoint; the message names it and the fix."""


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str  # bf16 | f16 | f32
    shard: Path
    begin: int  # absolute byte offset in the shard
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Checkpoint:
    path: Path
    config: dict  # the text model's config: text_config merged over the root
    arch: str  # qwen35 | qwen35moe
    hf_arch: str
    tensors: dict[str, TensorRef]  # HF name -> reference, in shard/file order
    raw_config: dict = field(default_factory=dict)  # config.json as written (vision_config and all)
    _files: dict[Path, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows [a, b) of its first axis) as float32; bf16 and f16 widen exactly."""
        return widen(self.read_raw(name, rows))

    def read_raw(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows [a, b) of its first axis) as stored: float32, float16, or bf16 as
        uint16 bit patterns. Read with pread: nothing stays mapped, so memory is what the caller
        holds; safe to call from several threads."""
        ref = self.tensors[name]
        sp = self.span(name, rows)
        buf = os.pread(sp.fd, sp.nbytes, sp.offset)
        if len(buf) != sp.nbytes:
            raise CheckpointError(f"{ref.shard.name} is truncated inside tensor {name}; re-download the shard")
        n = sp.nbytes // (ref.nbytes // max(ref.shape[0], 1)) if ref.shape else 1
        return np.frombuffer(buf, dtype=sp.numpy_dtype).reshape((n, *ref.shape[1:]) if ref.shape else ())

    def span(self, name: str, rows: tuple[int, int] | None = None) -> Span:
        """Where the tensor's bytes (or rows [a, b) of its first axis) lie in its shard."""
        ref = self.tensors[name]
        a, b = rows if rows is not None else (0, ref.shape[0] if ref.shape else 1)
        row = ref.nbytes // max(ref.shape[0], 1) if ref.shape else ref.nbytes
        with self._lock:
            fd = self._files.get(ref.shard)
            if fd is None:
                fd = self._files[ref.shard] = os.open(ref.shard, os.O_RDONLY)
        return Span(fd, ref.begin + a * row, (b - a) * row, ref.dtype, ref.shard.name)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


@dataclass(frozen=True)
class Span:
    """A byte range of a shard, copied to the output as it is (copy_file_range)."""

    fd: int
    offset: int
    nbytes: int
    dtype: str  # bf16 | f16 | f32
    shard: str = "a shard"  # its file name, for messages

    def blocks(self, block_bytes: int = 1 << 19):
        """The range as stored, in numpy views of one reused buffer of block_bytes (pread: page
        cache to buffer is cheaper than faulting in a mapping page by page, and memory stays at
        one block)."""
        dtype = np.dtype(self.numpy_dtype)
        buf = np.empty(min(block_bytes, self.nbytes) // dtype.itemsize, dtype)
        done = 0
        while done < self.nbytes:
            view = buf[: min(buf.size, (self.nbytes - done) // dtype.itemsize)]
            n = os.preadv(self.fd, [memoryview(view).cast("B")], self.offset + done)
            if n != view.nbytes:
                raise CheckpointError(
                    f"{self.shard} ended while reading {self.nbytes} bytes at offset {self.offset}; "
                    "the checkpoint is truncated, re-download it"
                )
            yield view
            done += n

    @property
    def numpy_dtype(self):
        """How the stored values read: bf16 as uint16 bit patterns."""
        return {"bf16": np.uint16, "f16": np.float16}.get(self.dtype, np.float32)


def widen(raw: np.ndarray) -> np.ndarray:
    """Stored values (read_raw) as float32, exactly: bf16 bit patterns shift into the high half."""
    if raw.dtype == np.uint16:
        return np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
    return raw.astype(np.float32)


def _read_header(shard: Path) -> dict[str, TensorRef]:
    try:
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"a header of {n} bytes")
            raw = f.read(n)
            if len(raw) != n:
                raise ValueError(f"the header needs {n} bytes, the file has {len(raw)} after its length")
            header = json.loads(raw)
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{shard.name} is not a readable safetensors file ({e}); re-download it") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{shard.name} is not a readable safetensors file (its header is not an object)")
    base = 8 + n
    size = shard.stat().st_size
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = f"{shard.name}: tensor {name!r} has a damaged header entry ({info!r:.80}); re-download the shard"
        if not isinstance(info, dict):
            raise CheckpointError(bad)
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(
                f"{shard.name}: tensor {name} has dtype {info.get('dtype')!r:.40}; "
                "only BF16, F16 and F32 checkpoints are supported"
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise CheckpointError(bad)
        b, e = offsets
        count = 1
        for d in shape:
            count *= d
        if count * {"f32": 4}.get(dtype, 2) != e - b:
            raise CheckpointError(
                f"{shard.name}: tensor {name} of shape {shape} needs {count * {'f32': 4}.get(dtype, 2)} bytes, "
                f"its header gives it {e - b}; re-download the shard"
            )
        refs[name] = TensorRef(name, tuple(shape), dtype, shard, base + b, base + e)
    end = max((r.end for r in refs.values()), default=base)
    if size < end:
        raise CheckpointError(
            f"{shard.name} is truncated: its header needs {end} bytes, the file has {size}; re-download the shard"
        )
    return refs  # header order: the order upstream's converter iterates


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not an object of file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name} is not a valid index ({e!s:.80}); re-download it") from e
        shards = []
        root = path.resolve()
        for rel in dict.fromkeys(weight_map.values()):
            try:
                p = (path / rel).resolve()
                if root not in p.parents:
                    raise CheckpointError(f"{index.name} points at {rel!r}, outside the model directory; refusing it")
                found = p.is_file()
            except (ValueError, OSError) as e:  # a NUL byte, a name too long for the file system
                raise CheckpointError(f"{index.name} names a shard {rel!r:.60} that cannot be a file ({e})") from None
            if not found:
                raise CheckpointError(f"shard {rel!r:.80} listed in {index.name} is missing; download it")
            shards.append(p)
        return sorted(shards)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{path} has only pickle weights ({pickles[0]}); safetensors is required "
            "(pickle can execute code): download the .safetensors files"
        )
    raise CheckpointError(f"{path} has no *.safetensors files; point at a Hugging Face model directory")


# hyper-parameters that size tensors: each a positive integer (bounds far above any release)
_SIZES = {
    "hidden_size": 1 << 17,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "linear_conv_kernel_dim": 64,
    "linear_key_head_dim": 4096,
    "linear_value_head_dim": 4096,
    "linear_num_key_heads": 4096,
    "linear_num_value_heads": 4096,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 30,
}
_DENSE_SIZES = {"intermediate_size": 1 << 20}
_MOE_SIZES = {
    "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "num_experts": 1 << 16,
    "num_experts_per_tok": 1 << 16,
}


def _check_config(merged: dict, moe: bool) -> None:
    """Every value the conversion computes with has the type and range it must have."""
    sizes = {**_SIZES, **(_MOE_SIZES if moe else _DENSE_SIZES)}
    for key, top in sizes.items():
        v = merged.get(key)
        if v is None:
            raise CheckpointError(f"config.json has no {key}; it is needed to read the checkpoint")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= top:
            raise CheckpointError(f"config.json {key} is {v!r}; it must be a whole number from 1 to {top}")
    for key in ("rms_norm_eps",):
        v = merged.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise CheckpointError(f"config.json {key} is {v!r}; it must be a number between 0 and 1")
    if moe and merged["num_experts_per_tok"] > merged["num_experts"]:
        raise CheckpointError(
            f"config.json num_experts_per_tok ({merged['num_experts_per_tok']}) is more than "
            f"num_experts ({merged['num_experts']})"
        )
    for key in ("mtp_num_hidden_layers", "full_attention_interval"):
        v = merged.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 4096):
            raise CheckpointError(f"config.json {key} is {v!r}; it must be a whole number from 0 to 4096")
    if not merged.get("full_attention_interval", 4):
        raise CheckpointError("config.json full_attention_interval is 0; it must be at least 1")
    if not isinstance(merged.get("tie_word_embeddings", False), bool):
        raise CheckpointError(f"config.json tie_word_embeddings is {merged['tie_word_embeddings']!r}; true or false")
    rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json rope_parameters is {rope!r}; it must be an object")
    for key, lo, hi in (("rope_theta", 0, float("inf")), ("partial_rotary_factor", 0, 1)):
        v = rope.get(key, merged.get(key, ROPE_DEFAULTS[key]))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi or v != v:
            raise CheckpointError(f"config.json {key} is {v!r}; it must be a number in ({lo}, {hi}]")
    sections = rope.get("mrope_section", [11, 11, 10])  # convert.py writes that default when absent
    if (
        not isinstance(sections, list)
        or not 0 < len(sections) <= 4
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in sections)
        or not 0 < sum(sections) <= merged["head_dim"]
    ):
        raise CheckpointError(
            f"config.json mrope_section is {sections!r:.60}; it must be up to 4 counts summing to 1..head_dim "
            f"({merged['head_dim']})"
        )
    types = merged.get("layer_types")
    if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
        raise CheckpointError("config.json layer_types must be a list of linear_attention/full_attention")


def text_config(config: dict) -> dict:
    """The text model's hyper-parameters: root keys, then text_config over them, then defaults."""
    if not isinstance(config, dict) or not isinstance(config.get("text_config", {}), dict):
        raise CheckpointError("config.json must be a JSON object (with text_config an object, if present)")
    merged = {**config, **config.get("text_config", {})}
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(f"config.json architectures is {archs!r}; it must name the model class")
    arch = ARCHITECTURES.get(archs[0])
    for k, v in {**TEXT_DEFAULTS, **(MOE_DEFAULTS if arch == "qwen35moe" else {})}.items():
        merged.setdefault(k, v)
    rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"config.json rope_parameters is {rope!r}; it must be an object")
    rope = dict(rope)
    for k, v in ROPE_DEFAULTS.items():
        rope.setdefault(k, merged.get(k, v))
    merged["rope_parameters"] = rope
    _check_config(merged, arch == "qwen35moe")
    n = merged["num_hidden_layers"]
    interval = merged.get("full_attention_interval", 4)
    if "layer_types" not in merged:
        merged["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    types = merged["layer_types"]
    if len(types) != n or any(t not in ("linear_attention", "full_attention") for t in types):
        raise CheckpointError(
            f"config layer_types has {len(types)} entries {sorted(set(types))}, expected "
            f"{n} of linear_attention/full_attention (num_hidden_layers={n})"
        )
    return merged


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; point at a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
        raise CheckpointError(
            f"config.json architectures is {archs!r:.60}; it must be a list naming the model class, "
            'e.g. ["Qwen3_5ForConditionalGeneration"]'
        )
    hf_arch = archs[0]
    if hf_arch not in ARCHITECTURES:
        raise CheckpointError(f"{path} is a {hf_arch} checkpoint; supported: {', '.join(ARCHITECTURES)}")
    tensors: dict[str, TensorRef] = {}
    for shard in _shards(path):
        tensors.update(_read_header(shard))
    return Checkpoint(
        path=path,
        config=text_config(config),
        arch=ARCHITECTURES[hf_arch],
        hf_arch=hf_arch,
        tensors=tensors,
        raw_config=config,
    )
