"""Importance matrices (llama-imatrix output) as llama-quantize reads them.

Both formats of the pinned llama.cpp (common/imatrix-loader.cpp): the GGUF one (``NAME.in_sum2``
and ``NAME.counts`` tensors, per-expert counts, ``imatrix.*`` metadata) and the legacy ``.dat``
one. Values are normalised exactly as tools/quantize/quantize.cpp does, in float32, so the
quantized bytes equal llama-quantize's. Only numbers are read; nothing in the file is executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, Keys

# llama-quantize's kv overrides (tools/quantize/quantize.cpp), written into the quantized file
KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_N_ENTRIES = "quantize.imatrix.entries_count"
KV_N_CHUNKS = "quantize.imatrix.chunks_count"


class ImatrixError(ValueError):
    pass


@dataclass
class Imatrix:
    path: str  # as the user wrote it (recorded in the GGUF)
    entries: dict[str, np.ndarray]  # tensor name -> float32 [n_matrices, n_per_row]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    # per tensor, how many of its matrices (experts) saw at least one token
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)

    def for_tensor(self, name: str, n_per_row: int, n_matrices: int) -> np.ndarray | None:
        """The importance weights for a tensor of n_matrices x [rows, n_per_row], or None when the
        file has none for it; a size mismatch is an error (as llama-quantize's, token_embd aside)."""
        e = self.entries.get(name)
        if e is None:
            return None
        if e.size != n_per_row * n_matrices:
            if name == "token_embd.weight":
                return None
            raise ImatrixError(
                f"imatrix {self.path}: {name} has {e.size} values, the tensor needs "
                f"{n_per_row * n_matrices}; the imatrix was computed on another model"
            )
        return e.reshape(n_matrices, n_per_row)


def _fail(path: str, what: str) -> ImatrixError:
    return ImatrixError(f"imatrix {path}: {what}; compute one with `llama-imatrix -m MODEL.gguf -f TEXT -o FILE`")


def load(path: str | Path) -> Imatrix:
    shown = str(path)
    p = Path(path)
    if not p.is_file():
        raise ImatrixError(f"imatrix {shown} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(p, shown) if magic == b"GGUF" else _load_legacy(p, shown)
    for name, e in im.entries.items():
        if not np.isfinite(e).all():
            raise _fail(shown, f"{name!r:.80} has non-finite values")
    return im


def _load_gguf(p: Path, shown: str) -> Imatrix:
    from qwen35.gguf_scan import GGUFScanError, scan

    try:  # the bounded scan first: gguf's reader believes the counts it reads and allocates by them
        scan(p)
    except (GGUFScanError, OSError) as e:
        raise _fail(shown, f"not a readable GGUF ({e!s:.100})") from None
    try:
        r = GGUFReader(p)
    except Exception as e:
        raise _fail(shown, f"not a readable GGUF ({e})") from None
    keys = {Keys.IMatrix.DATASETS, Keys.IMatrix.CHUNK_COUNT, Keys.IMatrix.CHUNK_SIZE}
    if not keys <= set(r.fields):
        raise _fail(shown, "missing imatrix metadata (" + ", ".join(sorted(keys - set(r.fields))) + ")")
    try:
        datasets = r.fields[Keys.IMatrix.DATASETS].contents()
        chunk_count = r.fields[Keys.IMatrix.CHUNK_COUNT].contents()
    except Exception as e:  # gguf raises what it meets on damaged fields
        raise _fail(shown, f"damaged imatrix metadata ({e!r:.60})") from None
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise _fail(shown, f"{Keys.IMatrix.DATASETS} is not a list of strings")
    if isinstance(chunk_count, bool) or not isinstance(chunk_count, int) or chunk_count < 0:
        raise _fail(shown, f"{Keys.IMatrix.CHUNK_COUNT} is {chunk_count!r:.40}, not a count")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise _fail(shown, f"{t.name!r:.80} is {t.tensor_type.name}, must be F32")
                try:
                    into[t.name[: -len(suffix)]] = np.asarray(t.data, dtype=np.float32)
                except Exception as e:
                    raise _fail(shown, f"{t.name!r:.80} cannot be read ({e!r:.60})") from None
    if not sums and not counts:
        raise _fail(shown, "no data")
    entries, coverage = {}, {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise _fail(shown, f"mismatched sums and counts for {name!r:.80}")
        s, c = sums[name].reshape(-1), counts[name].reshape(-1)
        if c.size == 0 or s.size % c.size:
            raise _fail(shown, f"{name!r:.80}: {s.size} sums do not split into {c.size} counts")
        s = s.reshape(c.size, -1)
        # GGUF format: normalise by the per-expert counts; experts never routed to weigh 1
        with np.errstate(all="ignore"):  # a damaged file's overflow is refused below as non-finite
            e = np.where(c[:, None] > 0, s / np.where(c > 0, c, 1).astype(np.float32)[:, None], np.float32(1))
        entries[name] = e.astype(np.float32).reshape(-1)
        coverage[name] = (int((c > 0).sum()), int(c.size))
    return Imatrix(shown, entries, datasets, chunk_count, coverage)


def _load_legacy(p: Path, shown: str) -> Imatrix:
    buf = p.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise _fail(shown, "truncated (neither GGUF nor a complete legacy .dat imatrix)")
        pos += n
        return buf[pos - n : pos]

    def i32() -> int:
        return int(np.frombuffer(take(4), dtype="<i4")[0])

    n_entries = i32()
    if n_entries < 1 or n_entries > 1 << 20:
        raise _fail(shown, "no data (neither GGUF nor a legacy .dat imatrix)")
    entries = {}
    for _ in range(n_entries):
        n = i32()
        if n < 1 or n > 4096:
            raise _fail(shown, "bad entry name")
        name = take(n).decode("utf-8", "replace")
        ncall, nval = i32(), i32()
        if nval < 1:
            raise _fail(shown, f"{name!r:.80} has no values")
        s = np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float32)
        with np.errstate(all="ignore"):
            entries[name] = s / np.float32(ncall) if ncall > 0 else s.copy()
    chunk_count, datasets = 0, []
    if pos < len(buf):
        chunk_count = i32()
        if pos + 4 <= len(buf):
            n = i32()
            if n > 0 and pos + n <= len(buf):
                datasets = [take(n).decode("utf-8", "replace")]
    return Imatrix(shown, entries, datasets, chunk_count)
