"""Compare two GGUF files: metadata (optionally without general.*) and tensors byte for byte."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader


def _value(field):
    v = field.contents()
    return v


def metadata(path, skip_general=True) -> dict:
    r = GGUFReader(str(path))
    return {k: _value(f) for k, f in r.fields.items()
            if not k.startswith("GGUF.") and not (skip_general and k.startswith("general."))}


def tensors(path) -> dict:
    r = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
            for t in r.tensors}


def tensor_order(path) -> list[str]:
    return [t.name for t in GGUFReader(str(path)).tensors]


def differences(a, b, skip_general=True) -> list[str]:
    """Human-readable differences between GGUF files a and b (empty when identical)."""
    out = []
    ma, mb = metadata(a, skip_general), metadata(b, skip_general)
    for k in sorted(set(ma) | set(mb)):
        if k not in ma or k not in mb:
            out.append(f"key {k}: only in {'a' if k in ma else 'b'}")
        elif ma[k] != mb[k]:
            va, vb = ma[k], mb[k]
            out.append(f"key {k}: {str(va)[:80]} != {str(vb)[:80]}")
    ta, tb = tensors(a), tensors(b)
    for k in sorted(set(ta) | set(tb)):
        if k not in ta or k not in tb:
            out.append(f"tensor {k}: only in {'a' if k in ta else 'b'}")
            continue
        (ya, sa, da), (yb, sb, db) = ta[k], tb[k]
        if ya != yb or sa != sb:
            out.append(f"tensor {k}: {ya}{list(sa)} != {yb}{list(sb)}")
        elif da != db:
            n = sum(x != y for x, y in zip(da, db))
            out.append(f"tensor {k}: {n} of {len(da)} bytes differ")
    return out
