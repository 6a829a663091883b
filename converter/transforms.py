"""Pure tensor transforms of the Qwen3.5 GGUF contract (numpy, float32 in and out).

Each function takes the Hugging Face tensor (numpy layout, i.e. PyTorch order) and the
DeltaNet head geometry, and returns the tensor as llama.cpp's qwen35 loader expects it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Heads:
    """Gated DeltaNet head geometry (value heads are a multiple of key heads)."""

    n_k: int  # linear_num_key_heads
    n_v: int  # linear_num_value_heads
    d_k: int  # linear_key_head_dim
    d_v: int  # linear_value_head_dim

    @property
    def r(self) -> int:
        return self.n_v // self.n_k


def identity(x: np.ndarray, h: Heads) -> np.ndarray:
    return x


def norm_plus_one(x: np.ndarray, h: Heads) -> np.ndarray:
    """RMSNorm weights are stored zero-centred (the model multiplies by 1 + w)."""
    return x + np.float32(1)


def neg_exp(x: np.ndarray, h: Heads) -> np.ndarray:
    """A_log -> ssm_a = -exp(A_log), in V-head tiled order.

    Computed in float64 and rounded once, so the result is the correctly rounded float32 on every
    machine. Upstream's converter takes torch's float32 exp, which goes through the CPU's vector
    math library and is one ulp off for some inputs, which ones depending on the processor (torch
    2.13 on an AMD EPYC: 45 of the 34,112 finite bf16 values below 80 in magnitude, 0.9765625
    among them); so ssm_a can differ from upstream's file in its last bit."""
    return tile_v_heads((-np.exp(x.astype(np.float64))).astype(np.float32), h, axis=0, head_dim=1)


def tile_v_heads(x: np.ndarray, h: Heads, axis: int, head_dim: int) -> np.ndarray:
    """Reorder value heads along axis from grouped [k0: v0..v(r-1), k1: ...] to tiled
    [v0 of k0, v0 of k1, ..., v1 of k0, ...]: the kernels read key head (h % n_k) for value head h."""
    if h.n_k == h.n_v:
        return x
    axis %= x.ndim
    shape = x.shape
    y = x.reshape(shape[:axis] + (h.n_k, h.r, head_dim) + shape[axis + 1 :])
    return np.ascontiguousarray(np.swapaxes(y, axis, axis + 1)).reshape(shape)


def qkv_rows(x: np.ndarray, h: Heads) -> np.ndarray:
    """in_proj_qkv [q | k | v, hidden]: only the V rows are head-indexed by value head."""
    qk = 2 * h.n_k * h.d_k
    return np.concatenate([x[:qk], tile_v_heads(x[qk:], h, 0, h.d_v)], axis=0)


def v_rows(x: np.ndarray, h: Heads) -> np.ndarray:
    """in_proj_z [n_v * d_v, hidden]."""
    return tile_v_heads(x, h, 0, h.d_v)


def head_rows(x: np.ndarray, h: Heads) -> np.ndarray:
    """in_proj_a / in_proj_b [n_v, hidden] and dt_bias [n_v]."""
    return tile_v_heads(x, h, 0, 1)


def v_cols(x: np.ndarray, h: Heads) -> np.ndarray:
    """out_proj [hidden, n_v * d_v]: columns are value-head indexed."""
    return tile_v_heads(x, h, 1, h.d_v)


def conv1d(x: np.ndarray, h: Heads) -> np.ndarray:
    """conv1d [C, 1, K] -> [C, K] (ggml {K, C}); the V channels follow the V-head reorder."""
    x = x.reshape(x.shape[0], x.shape[-1])
    qk = 2 * h.n_k * h.d_k
    return np.concatenate([x[:qk], tile_v_heads(x[qk:], h, 0, h.d_v)], axis=0)


def gate_half(x: np.ndarray, h: Heads) -> np.ndarray:
    """Fused experts gate_up_proj [E, 2I, H] -> gate [E, I, H]."""
    return np.ascontiguousarray(x[:, : x.shape[1] // 2])


def up_half(x: np.ndarray, h: Heads) -> np.ndarray:
    """Fused experts gate_up_proj [E, 2I, H] -> up [E, I, H]."""
    return np.ascontiguousarray(x[:, x.shape[1] // 2 :])


def frame_0(x: np.ndarray, h: Heads) -> np.ndarray:
    """Vision patch_embed.proj [H, C, 2, p, p] (a Conv3D over 2 frames) -> frame 0's Conv2D
    [H, C, p, p]: llama.cpp applies one Conv2D per frame and adds them."""
    return np.ascontiguousarray(x[:, :, 0])


def frame_1(x: np.ndarray, h: Heads) -> np.ndarray:
    """... and frame 1's."""
    return np.ascontiguousarray(x[:, :, 1])


# transforms that only move values (reshape, reorder, slice): they act on stored bits as well as
# on float32, so a tensor kept in its source type is copied, not converted
REORDERS = frozenset({identity, qkv_rows, v_rows, head_rows, v_cols, conv1d, gate_half, up_half, frame_0, frame_1})
