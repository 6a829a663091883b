"""Run GGML_OP_GATED_DELTA_NET on the pinned library's CPU backend through ctypes.

An independent oracle for the numpy reference: the same op as llama.cpp's graph calls,
built from the patched tree by `make setup`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class GgmlCpu:
    def __init__(self, lib_dir: Path):
        mode = ctypes.RTLD_GLOBAL
        self.base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=mode)
        self.cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=mode)
        b, c, p = self.base, self.cpu, ctypes.c_void_p
        b.ggml_init.restype, b.ggml_init.argtypes = p, [_InitParams]
        b.ggml_free.argtypes = [p]
        b.ggml_new_tensor_4d.restype = p
        b.ggml_new_tensor_4d.argtypes = [p, ctypes.c_int] + [ctypes.c_int64] * 4
        b.ggml_get_data.restype, b.ggml_get_data.argtypes = p, [p]
        b.ggml_nbytes.restype, b.ggml_nbytes.argtypes = ctypes.c_size_t, [p]
        b.ggml_gated_delta_net.restype = p
        b.ggml_gated_delta_net.argtypes = [p] * 7 + [ctypes.c_int64]
        b.ggml_new_graph.restype, b.ggml_new_graph.argtypes = p, [p]
        b.ggml_build_forward_expand.argtypes = [p, p]
        c.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        c.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]

    def gated_delta_net(self, q, k, v, g, beta, state, K=1, n_threads=None) -> np.ndarray:
        """Inputs in the numpy layouts of cpp_patches/reference; returns the flat dst buffer
        (n_threads: the CPUs this process may use, when not given)."""
        from qwen35.cpus import usable_cpus

        arrays = [np.ascontiguousarray(x, np.float32) for x in (q, k, v, g, beta, state)]
        need = sum(a.nbytes for a in arrays) * 2 + (K + 1) * state.nbytes * 2 + v.nbytes + (64 << 20)
        ctx = self.base.ggml_init(_InitParams(need, None, False))
        if not ctx:
            raise MemoryError("ggml_init failed")
        try:
            tensors = []
            for a in arrays:
                ne = list(reversed(a.shape))  # numpy C order -> ggml ne
                t = self.base.ggml_new_tensor_4d(ctx, GGML_TYPE_F32, *ne)
                ctypes.memmove(self.base.ggml_get_data(t), a.ctypes.data, a.nbytes)
                tensors.append(t)
            out = self.base.ggml_gated_delta_net(ctx, *tensors, K)
            gf = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(gf, out)
            if self.cpu.ggml_graph_compute_with_ctx(ctx, gf, n_threads or usable_cpus()) != 0:
                raise RuntimeError("ggml_graph_compute_with_ctx failed")
            n = self.base.ggml_nbytes(out)
            res = np.empty(n // 4, np.float32)
            ctypes.memmove(res.ctypes.data, self.base.ggml_get_data(out), n)
            return res
        finally:
            self.base.ggml_free(ctx)
