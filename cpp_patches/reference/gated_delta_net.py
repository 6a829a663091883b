"""Numpy reference of ``GGML_OP_GATED_DELTA_NET`` in ggml's exact conventions.

Two forms with one signature, which check each other in float64:

* :func:`recurrent` - the per-token loop every ggml backend runs (CPU, CUDA, Metal, ...).
* :func:`chunked`   - the chunked WY/UT form the CUDA prefill kernel implements.

Layouts (numpy C order, i.e. ggml's ``ne`` read right to left):

====== ======================= =======================================================
name   numpy shape             ggml tensor
====== ======================= =======================================================
q, k   (B_qk, T, H_k, S)       [S, H_k, T, B_qk]; B % B_qk == 0 (sequence broadcast)
v      (B, T, H_v, S)          [S, H_v, T, B]; H_v % H_k == 0
g      (B, T, H_v, 1|S)        [1|S, H_v, T, B]; log-space decay (<= 0), S = KDA variant
beta   (B, T, H_v, 1)          [1, H_v, T, B]
state  (B, H_v, S, S)          [S, S, H_v, B], transposed: state[b, h, j, i] = S_h[i, j]
out    (B, T, H_v, S)          first S*H_v*T*B floats of dst
snaps  (K, B, H_v, S, S)       then K state slots, slot 0 = final state, slot s = s tokens back
====== ======================= =======================================================

Head broadcast is *tiled*: value head ``h`` reads key head ``h % H_k``.
Per token, with G = exp(g) and the state S (key index i, value index j):
``S <- G*S;  delta = beta*(v - S^T k);  S <- S + k delta^T;  o = S^T q / sqrt(S)``.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CHUNK = 64


def _check(q, k, v, g, beta, state):
    B_qk, T, H_k, S = q.shape
    B, T_v, H_v, S_v = v.shape
    assert k.shape == q.shape, f"k {k.shape} != q {q.shape}"
    assert T_v == T and S_v == S, f"v {v.shape} does not match q {q.shape}"
    assert H_v % H_k == 0 and B % B_qk == 0, "H_v must be a multiple of H_k, B of B_qk"
    assert g.shape in ((B, T, H_v, 1), (B, T, H_v, S)), f"g {g.shape}"
    assert beta.shape == (B, T, H_v, 1), f"beta {beta.shape}"
    assert state.shape == (B, H_v, S, S), f"state {state.shape}"
    return B, B_qk, T, H_k, H_v, S


def _heads(x, H_v, B):
    """Broadcast q/k to every value head (tiled: h -> h % H_k) and every sequence."""
    B_qk, _, H_k, _ = x.shape
    x = x[:, :, np.arange(H_v) % H_k, :]
    return x[np.arange(B) // (B // B_qk)]


def recurrent(q, k, v, g, beta, state, K=1):
    """Per-token loop. Returns (out, snapshots) as documented in the module docstring."""
    B, _, T, _, H_v, S = _check(q, k, v, g, beta, state)
    f = np.float64
    qh, kh = _heads(q.astype(f), H_v, B), _heads(k.astype(f), H_v, B)
    v, g, beta = v.astype(f), g.astype(f), beta.astype(f)
    M = np.swapaxes(state.astype(f), -1, -2).copy()  # (B, H, i, j): untransposed S
    out = np.empty((B, T, H_v, S), f)
    snaps = np.zeros((K, B, H_v, S, S), f)
    scale = 1.0 / np.sqrt(S)
    for t in range(T):
        decay = np.exp(g[:, t])  # (B, H, 1|S) over i
        M = M * decay[..., :, None]  # S <- G S (row i scaled)
        kt, qt = kh[:, t], qh[:, t]  # (B, H, S)
        delta = beta[:, t] * (v[:, t] - np.einsum("bhij,bhi->bhj", M, kt))
        M = M + kt[..., :, None] * delta[..., None, :]  # S <- S + k delta^T
        out[:, t] = np.einsum("bhij,bhi->bhj", M, qt) * scale  # o = S^T q / sqrt(S)
        slot = T - 1 - t
        if slot < K:
            snaps[slot] = np.swapaxes(M, -1, -2)
    if K == 1 or T == 0:
        snaps[0] = np.swapaxes(M, -1, -2)
    return out, snaps


def chunked(q, k, v, g, beta, state, K=1, chunk=DEFAULT_CHUNK):
    """Chunked WY/UT form (scalar g only). Same results as :func:`recurrent` up to rounding.

    Within a chunk of C tokens, with cumulative log-decay c_t = sum_{s<=t} g_s and S0 the state
    at the chunk start:

    * ``A[t,s] = beta_t exp(c_t - c_s) k_t.k_s`` for s < t;  ``T = (I + A)^-1`` (unit lower)
    * ``U = T diag(beta) V``,  ``W = T diag(beta exp(c)) K``,  ``delta = U - W S0``
    * ``O = (diag(exp(c)) Q S0 + (exp(c_t - c_s) [s<=t] * Q K^T) delta) / sqrt(S)``
    * ``S_C = exp(c_C) S0 + K^T diag(exp(c_C - c)) delta``
    """
    B, _, T, _, H_v, S = _check(q, k, v, g, beta, state)
    assert g.shape[-1] == 1, "the chunked form covers scalar g; KDA uses recurrent()"
    f = np.float64
    qh, kh = _heads(q.astype(f), H_v, B), _heads(k.astype(f), H_v, B)
    v, beta = v.astype(f), beta.astype(f)[..., 0]
    g = g.astype(f)[..., 0]  # (B, T, H)
    S0 = np.swapaxes(state.astype(f), -1, -2).copy()  # (B, H, i, j)
    out = np.empty((B, T, H_v, S), f)
    snaps = np.zeros((K, B, H_v, S, S), f)
    scale = 1.0 / np.sqrt(S)
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(c0 + chunk, T))
        # per (b, h): move time next to the feature axis -> (B, H, C, S)
        Q, Kc, V = (np.moveaxis(x[:, sl], 1, 2) for x in (qh, kh, v))
        bt = np.moveaxis(beta[:, sl], 1, 2)  # (B, H, C)
        c = np.cumsum(np.moveaxis(g[:, sl], 1, 2), axis=-1)  # (B, H, C)
        C = c.shape[-1]
        diff = c[..., :, None] - c[..., None, :]  # c_t - c_s
        lower = np.tril(np.ones((C, C), bool), -1)
        incl = np.tril(np.ones((C, C), bool))
        decay = np.where(incl, np.exp(np.where(incl, diff, 0.0)), 0.0)
        KK = Kc @ np.swapaxes(Kc, -1, -2)
        A = np.where(lower, bt[..., :, None] * decay * KK, 0.0)
        Tm = np.linalg.inv(np.eye(C) + A)
        U = Tm @ (bt[..., None] * V)
        W = Tm @ ((bt * np.exp(c))[..., None] * Kc)
        delta = U - W @ S0
        QK = Q @ np.swapaxes(Kc, -1, -2)
        O = np.exp(c)[..., None] * (Q @ S0) + (decay * QK) @ delta
        out[:, sl] = np.moveaxis(O * scale, 2, 1)
        # states at the last K tokens of the sequence, if they fall in this chunk
        for t in range(sl.start, sl.stop):
            slot = T - 1 - t
            if 0 <= slot < K and K > 1:
                ti = t - c0
                w = np.exp(c[..., ti, None] - c[..., : ti + 1])  # (B, H, ti+1)
                St = (
                    np.exp(c[..., ti])[..., None, None] * S0
                    + np.swapaxes(Kc[..., : ti + 1, :] * w[..., None], -1, -2) @ delta[..., : ti + 1, :]
                )
                snaps[slot] = np.swapaxes(St, -1, -2)
        wC = np.exp(c[..., -1:] - c)  # (B, H, C)
        S0 = np.exp(c[..., -1])[..., None, None] * S0 + np.swapaxes(Kc * wC[..., None], -1, -2) @ delta
    if K == 1 or T == 0:
        snaps[0] = np.swapaxes(S0, -1, -2)
    return out, snaps


def pack(out, snaps) -> np.ndarray:
    """The op's dst buffer as ggml lays it out: outputs, then K state slots."""
    return np.concatenate([out.ravel(), snaps.ravel()])


def rel_rms(x, ref) -> float:
    """||x - ref|| / ||ref|| (the error measure used by every test of this op)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def random_inputs(rng, *, B=1, B_qk=None, T=16, H_k=2, H_v=4, S=32, kda=False, g_scale=1.0, dtype=np.float32):
    """Inputs as the Qwen3.5 graph produces them: L2-normalised q/k, sigmoid beta, g <= 0."""
    B_qk = B_qk or B
    q = rng.standard_normal((B_qk, T, H_k, S))
    k = rng.standard_normal((B_qk, T, H_k, S))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H_v, S))
    g = -g_scale * np.log1p(np.exp(rng.standard_normal((B, T, H_v, S if kda else 1))))
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H_v, 1))))
    state = 0.1 * rng.standard_normal((B, H_v, S, S))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta, state))
