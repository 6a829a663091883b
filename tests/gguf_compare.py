"""Compare two GGUF files: metadata (every key, general.* included, unless named) and tensors byte for byte."""

from __future__ import annotations

import numpy as np

from qwen35.gguf_scan import scan


def tensor_order(path) -> list[str]:
    return [t.name for t in scan(path).tensors]


def differences(a, b, skip: tuple[str, ...] = (), last_bit: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between GGUF files a and b (empty when identical).

    skip: metadata keys that legitimately differ (each caller says why).
    last_bit: names ending in one of these are F32 tensors whose values may differ by one unit in
    the last place (same sign), e.g. ".ssm_a": -exp(A_log), where upstream's torch float32 exp is
    not correctly rounded; every other byte must still be equal."""
    sa, sb = scan(a), scan(b)
    out = []
    keys = (set(sa.kv) | set(sb.kv)) - set(skip)
    for k in sorted(keys):
        if k not in sa.kv or k not in sb.kv:
            out.append(f"key {k}: only in {'a' if k in sa.kv else 'b'}")
        elif (sa.kv[k].vtype, sa.kv[k].raw) != (sb.kv[k].vtype, sb.kv[k].raw):
            out.append(f"key {k}: {str(sa.kv[k].value)[:80]} != {str(sb.kv[k].value)[:80]}")
    ta, tb = {t.name: t for t in sa.tensors}, {t.name: t for t in sb.tensors}
    for k in sorted(set(ta) | set(tb)):
        if k not in ta or k not in tb:
            out.append(f"tensor {k}: only in {'a' if k in ta else 'b'}")
            continue
        x, y = ta[k], tb[k]
        if (x.qtype, x.ne) != (y.qtype, y.ne):
            out.append(f"tensor {k}: {x.qtype.name}{list(x.ne)} != {y.qtype.name}{list(y.ne)}")
            continue
        dx, dy = sa.data(x), sb.data(y)
        if last_bit and k.endswith(last_bit):
            if x.qtype.name != "F32":
                out.append(f"tensor {k}: {x.qtype.name}, compared to the last bit only as F32")
                continue
            ix, iy = (np.frombuffer(d.tobytes(), dtype=np.int32).astype(np.int64) for d in (dx, dy))
            if np.any(np.abs(ix - iy) > 1) or np.any((ix < 0) != (iy < 0)):
                out.append(f"tensor {k}: {int((ix != iy).sum())} of {ix.size} values differ, some by more than one ulp")
            continue
        if not np.array_equal(dx, dy):
            out.append(f"tensor {k}: {int((dx != dy).sum())} of {x.nbytes} bytes differ")
    return out
