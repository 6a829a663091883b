"""Per-tensor type choice (one pure function) and quantization with the patched build's ggml.

>>> from gguf import GGMLQuantizationType as Q, MODEL_TENSOR as T
>>> choose_type("blk.0.attn_qkv.weight", T.ATTN_QKV, (128, 64), False, "Q8_0")
<GGMLQuantizationType.Q8_0: 8>
>>> choose_type("blk.0.ssm_alpha.weight", T.SSM_ALPHA, (4, 48), False, "Q8_0")  # 48 % 32 != 0
<GGMLQuantizationType.F16: 1>
>>> choose_type("blk.0.ssm_a", T.SSM_A, (4,), True, "BF16")
<GGMLQuantizationType.F32: 0>
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import MODEL_TENSOR as T

Q = GGMLQuantizationType

# --type names -> (GGUF file type, base tensor type). F32/F16/BF16/Q8_0 follow upstream's
# converter; the others follow llama-quantize's per-tensor rules (recipes.py).
FILE_TYPES: dict[str, tuple[LlamaFileType, Q]] = {
    "F32": (LlamaFileType.ALL_F32, Q.F32),
    "F16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "BF16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q5_K_S": (LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, Q.Q5_0),
    "IQ4_NL": (LlamaFileType.MOSTLY_IQ4_NL, Q.IQ4_NL),
    "IQ4_XS": (LlamaFileType.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, Q.Q2_K),
    # i-quants below 4 bits; those marked in recipes.REQUIRES_IMATRIX need --imatrix
    "IQ3_M": (LlamaFileType.MOSTLY_IQ3_M, Q.IQ3_S),
    "IQ3_S": (LlamaFileType.MOSTLY_IQ3_S, Q.IQ3_S),
    "IQ3_XS": (LlamaFileType.MOSTLY_IQ3_XS, Q.IQ3_S),
    "IQ3_XXS": (LlamaFileType.MOSTLY_IQ3_XXS, Q.IQ3_XXS),
    "IQ2_M": (LlamaFileType.MOSTLY_IQ2_M, Q.IQ2_S),
    "IQ2_S": (LlamaFileType.MOSTLY_IQ2_S, Q.IQ2_XS),
    "IQ2_XS": (LlamaFileType.MOSTLY_IQ2_XS, Q.IQ2_XS),
    "IQ2_XXS": (LlamaFileType.MOSTLY_IQ2_XXS, Q.IQ2_XXS),
    "IQ1_M": (LlamaFileType.MOSTLY_IQ1_M, Q.IQ1_M),
    "IQ1_S": (LlamaFileType.MOSTLY_IQ1_S, Q.IQ1_S),
}
CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")


class QuantizeError(ValueError):
    pass


def check_file_type(file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise QuantizeError(f"--type {file_type} is not supported; use one of {', '.join(FILE_TYPES)}")


def choose_type(name: str, kind: T, shape: tuple[int, ...], keep_f32: bool, file_type: str) -> Q:
    """The tensor type for one GGUF tensor; shape in numpy order (ggml ne reversed).

    The rules of upstream's converter: 1-D tensors, norms, names without a .weight suffix and
    the contract's F32 tensors (router, shared-expert gate, conv1d) stay F32; the rest take the
    file type's base type, falling back to F16 when a row does not fill whole blocks.
    """
    check_file_type(file_type)
    if keep_f32 or len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    base = FILE_TYPES[file_type][1]
    block = GGML_QUANT_SIZES[base][0]
    if shape[-1] % block:
        return Q.F16
    return base


def nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


@functools.cache
def _ggml_base():
    from qwen35 import native

    directory = native.library_dir()
    native.check(next(directory.glob("libllama.*")))
    lib = ctypes.CDLL(
        str(directory / ("libggml-base.dylib" if (directory / "libggml-base.dylib").exists() else "libggml-base.so"))
    )
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def quantize(
    data: np.ndarray, qtype: Q, pool: ThreadPoolExecutor | None = None, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """data (float32, numpy order) as qtype bytes, exactly as llama.cpp would store it.

    imatrix: importance weights [n_matrices, n_per_row], one row per matrix of data (experts of
    a 3-D tensor; 1 for 2-D), as llama-quantize passes them to ggml_quantize_chunk."""
    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    # F16 and BF16 too: ggml's own rounding (the same as gguf-py's, in C and without the GIL)
    lib = _ggml_base()
    lib.ggml_quantize_init(int(qtype))
    data = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = data.shape[-1]
    nrows = data.size // n_per_row
    n_mat = 1 if imatrix is None else imatrix.shape[0]
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_mat, n_per_row) or nrows % n_mat:
            raise QuantizeError(f"importance weights {imatrix.shape} do not fit data {data.shape}")
    rows_per_mat = nrows // n_mat
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.empty(nrows * row_bytes, dtype=np.uint8)
    step = max(1, min(rows_per_mat, (1 << 22) // max(n_per_row, 1)))

    def work(job: tuple[int, int]) -> None:
        # ggml offsets both buffers itself from the element index start * n_per_row; a job never
        # crosses a matrix boundary, so it takes that matrix's importance weights
        start, n = job
        w = None if imatrix is None else ctypes.c_void_p(imatrix[start // rows_per_mat].ctypes.data)
        lib.ggml_quantize_chunk(
            int(qtype),
            ctypes.c_void_p(data.ctypes.data),
            ctypes.c_void_p(out.ctypes.data),
            start * n_per_row,
            n,
            n_per_row,
            w,
        )

    jobs = [
        (m * rows_per_mat + r, min(step, rows_per_mat - r)) for m in range(n_mat) for r in range(0, rows_per_mat, step)
    ]
    if pool is None or len(jobs) == 1:
        for j in jobs:
            work(j)
    else:
        list(pool.map(work, jobs))
    return out.reshape(*data.shape[:-1], row_bytes)


# stored dtype -> the output type that keeps its bytes (bf16 -> BF16 equals widening and rounding
# back, except that NaNs are made quiet as ggml does; f16 -> F16 and f32 -> F32 are exact)
COPY_TYPES = {"bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32}
_STORED = {np.dtype(np.uint16): "bf16", np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}


def encode(x: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> np.ndarray:
    """A piece as stored (bf16 bits as uint16, float16, float32) or as float32, encoded as
    qtype. Same-type pieces (COPY_TYPES) are passed through, bf16 with its NaNs made quiet."""
    if COPY_TYPES.get(_STORED.get(x.dtype)) == qtype:
        return _quiet_bf16_nans(x) if qtype == Q.BF16 else x
    if x.dtype == np.uint16:
        x = np.left_shift(x, 16, dtype=np.uint32).view(np.float32)
    return quantize(x, qtype, None, imatrix)


def bf16_has_nan(x: np.ndarray, block: int = 1 << 18) -> bool:
    """Whether bf16 bit patterns (uint16) hold a NaN (exponent all ones, mantissa not zero);
    scans in cache-sized blocks (512 KiB), no copy of x: ~6 GB/s a core."""
    flat = x.reshape(-1)
    t = np.empty(min(block, flat.size), np.uint16)
    for i in range(0, flat.size, block):
        part = flat[i : i + block]
        tt = t[: part.size]
        np.bitwise_and(part, 0x7FFF, out=tt)
        if tt.max(initial=0) > 0x7F80:
            return True
    return False


def _quiet_bf16_nans(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if not bf16_has_nan(x):
        return x
    x = x.copy()
    x[(x & 0x7FFF) > 0x7F80] |= 0x0040
    return x


def default_threads() -> int:
    from qwen35.cpus import usable_cpus

    return usable_cpus()
