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
        if n and (ne[0] % block or n // block * type_size > size):
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
