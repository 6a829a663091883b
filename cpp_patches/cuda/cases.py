"""The cases the chunked GATED_DELTA_NET kernel is checked on, shared by the GPU harness
(run_harness.py) and the CPU emulator (emulate.py), so both runs cover the same grid.

A case: S (head size), T (tokens), H_k / H_v (key / value heads, tiled broadcast h % H_k),
B / B_qk (sequences; q/k shared over B / B_qk sequences), g_scale (log-decay scale: 1e-4 is
g near 0, 20 is g near -20), pad (floats of padding after each q/k/v head row: a strided
layout), extra (output tokens past T that the kernel must leave alone, as the K > 1 dispatch
asks of it), bv (value columns per state-pass block: 32, 64, or 0 for the launch's choice),
spike (g = -spike at the third token of every chunk: a strong forget gate, after which the
chunk's later decays are differences of large cumulative sums).
"""

from __future__ import annotations

# Relative RMS error against the float64 reference (reference/gated_delta_net.py::recurrent).
# The products are 3xTF32 (float32 accuracy); what remains is float32 arithmetic: the chunk's
# cumulative log-decay, exp() (ggml builds CUDA with -use_fast_math: __expf), and the state
# carried from chunk to chunk. The pinned library's own float32 CPU kernel is within 2e-5 of
# the same reference on this grid (tests/test_gdn_reference.py).
TOL_REL_RMS = 1e-5


def _case(S, T, H_k, H_v, B=1, B_qk=1, g_scale=1.0, pad=0, extra=0, bv=0, spike=0) -> dict:
    return dict(S=S, T=T, H_k=H_k, H_v=H_v, B=B, B_qk=B_qk, g_scale=g_scale, pad=pad, extra=extra, bv=bv, spike=spike)


def correctness_cases(long: bool = True) -> list[dict]:
    """The issue's grid: T in {1, 63, 64, 65, 1000, 8192}, H_v/H_k in {1, 2, 4}, 1-4 sequences,
    g near 0 and near -20, S in {64, 128}; plus a strided layout and a kept output tail.
    ``long=False`` drops T = 8192 (the CPU emulator's quick run)."""
    cases = []
    for S in (64, 128):
        for T in (1, 63, 64, 65, 1000):
            for ratio in (1, 2, 4):
                cases.append(_case(S, T, H_k=2, H_v=2 * ratio))
    cases += [
        _case(128, 300, H_k=2, H_v=4, B=4, B_qk=4),
        _case(128, 300, H_k=2, H_v=4, B=3, B_qk=1),  # q/k broadcast over sequences
        _case(64, 200, H_k=1, H_v=4, B=2, B_qk=2, g_scale=1e-4),  # g near 0 (almost no decay)
        _case(128, 200, H_k=2, H_v=4, B=2, B_qk=2, g_scale=20.0),  # g near -20 (state wiped each token)
        _case(128, 130, H_k=2, H_v=4, B=2, B_qk=1, pad=24),  # q/k/v rows inside wider rows
        _case(64, 130, H_k=2, H_v=4, B=2, B_qk=2, extra=4),  # tokens past T belong to another kernel
        # 64 value columns per state-pass block (chosen where 32 would need a second wave)
        _case(128, 1000, H_k=2, H_v=4, bv=64),
        _case(128, 130, H_k=2, H_v=4, B=2, B_qk=2, extra=4, bv=64),
        _case(128, 200, H_k=1, H_v=2, B=3, B_qk=1, g_scale=20.0, pad=8, bv=64),
        # a strong forget gate early in each chunk, mild decay after it
        _case(128, 200, H_k=2, H_v=4, g_scale=0.05, spike=300),
        _case(64, 130, H_k=2, H_v=4, B=2, B_qk=2, g_scale=0.05, spike=3000),
    ]
    if long:
        cases.append(_case(128, 8192, H_k=2, H_v=4))
    return cases


def case_id(c: dict) -> str:
    s = f"S{c['S']}-T{c['T']}-Hk{c['H_k']}-Hv{c['H_v']}-B{c['B']}-Bqk{c['B_qk']}-g{c['g_scale']:g}"
    if c.get("pad"):
        s += f"-pad{c['pad']}"
    if c.get("extra"):
        s += f"-extra{c['extra']}"
    if c.get("bv"):
        s += f"-bv{c['bv']}"
    if c.get("spike"):
        s += f"-spike{c['spike']:g}"
    return s


def ggml_layout(q, k, v, g, beta, state, *, pad: int = 0, extra: int = 0):
    """The op's inputs as the kernels read them (float32, ggml strides in floats).

    q/k/v rows are placed in rows of S + pad floats whose padding is NaN, so a kernel that
    reads the padding shows it. Returns (q, k, v, g, beta, state, strides, T_out) with the
    strides sq1 sq2 sq3 sv1 sv2 sv3 sb1 sb2 sb3 and T_out = T + extra output tokens."""
    import numpy as np

    _B_qk, T, H_k, S = q.shape
    _B, _, H, _ = v.shape

    def wide(x):
        w = np.full(x.shape[:-1] + (S + pad,), np.nan, np.float32)
        w[..., :S] = x
        return w

    row = S + pad
    strides = np.array([row, row * H_k, row * H_k * T, row, row * H, row * H * T, 1, H, H * T], np.int64)
    dense = (np.ascontiguousarray(x, np.float32) for x in (g, beta, state))
    return (wide(q), wide(k), wide(v), *dense, strides, T + extra)
