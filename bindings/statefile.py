"""Files of sequence states (saved chats, the server's --cache-dir): safetensors with a checksum.

A state file holds numbers (safetensors tensors) and JSON strings (its metadata), never code.
``write`` seals it with a SHA-256 of every tensor (name, dtype, shape, bytes) and every metadata
value; ``read`` recomputes it, so a file damaged on disk or edited by hand is refused with one
line naming it instead of reaching llama.cpp as a state it would take without complaint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .model import ModelError

CHECKSUM = "sha256"


def checksum(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0{a.nbytes}\0".encode())
        h.update(memoryview(a).cast("B"))
    for key in sorted(meta):
        if key != CHECKSUM:
            h.update(f"{key}\0{len(meta[key])}\0{meta[key]}\0".encode())
    return h.hexdigest()


def write(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str], *, fsync: bool = True) -> None:
    """Write atomically (PATH.partial, then rename); OSError propagates after the partial file
    is removed."""
    from safetensors.numpy import save_file

    meta = {**meta, CHECKSUM: checksum(tensors, meta)}
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read(path: Path, formats: tuple[str, ...], what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a state file whose format is one of formats (the first one is
    the current, sealed format; older ones carry no checksum). Every failure is a ModelError
    naming the file; what: what the file is, for the message ("a saved chat")."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError, TypeError) as e:
        raise ModelError(f"{path} is not {what} or is damaged ({e!s:.80})") from None
    fmt = meta.get("format")
    if fmt not in formats:
        raise ModelError(f"{path} is not {what} (format {fmt!r:.40}, expected {formats[0]})")
    if fmt == formats[0] and meta.get(CHECKSUM) != checksum(tensors, meta):
        raise ModelError(f"{path} is damaged (its checksum does not match its contents); it cannot be used")
    return tensors, meta


def tensor(
    tensors: dict[str, np.ndarray], name: str, dtype, path: Path, *, size: int | None = None, optional: bool = False
) -> np.ndarray | None:
    """tensors[name], checked to be one-dimensional of dtype (and size, when given)."""
    t = tensors.get(name)
    if t is None:
        if optional:
            return None
        raise ModelError(f"{path} is damaged: it has no {name}")
    if t.dtype != np.dtype(dtype) or t.ndim != 1 or (size is not None and t.size != size):
        raise ModelError(
            f"{path} is damaged: {name} is {t.dtype}{list(t.shape)}, expected {np.dtype(dtype)}"
            + (f"[{size}]" if size is not None else "[n]")
        )
    return t


def positions(tensors: dict[str, np.ndarray], prefix: str, n_tokens: int, path: Path) -> dict[int, np.ndarray]:
    """The tensors named PREFIXN, by N: each a position within the n_tokens saved."""
    out = {}
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        tail = name[len(prefix) :]
        if not tail.isdigit() or not 0 < int(tail) <= n_tokens:
            raise ModelError(f"{path} is damaged: {name} is not a position within its {n_tokens} tokens")
        out[int(tail)] = t
    return out
