"""Patch 0003 (candidate scales side by side, Q8_0 rounding without libm calls) leaves every
quantizer's bytes as upstream's.

The oracle is upstream's own ggml-quants.c from the pristine tree (git tag `base` of the tree the
build was made from), compiled here into a standalone library; the code under test is
ggml_quantize_chunk of the patched libggml-base that qwen35-convert and llama-quantize use.
"""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# ggml_abort and friends, which ggml-quants.c calls for row sizes and on bad input; standalone,
# the oracle cannot bind to (or be bound by) the patched libggml-base loaded in the same process
STUBS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
static const size_t BLOCK[] = {%(block)s}, SIZE[] = {%(size)s};
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "abort %%s:%%d %%s\n", file, line, fmt); abort(); }
size_t ggml_type_size(int type) { return SIZE[type]; }
size_t ggml_row_size(int type, int64_t ne) { return SIZE[type]*ne/BLOCK[type]; }
const char * ggml_type_name(int type) { (void) type; return "?"; }
"""


def _stubs() -> str:
    known = {int(q): bs for q, bs in GGML_QUANT_SIZES.items()}
    sizes = [known.get(i, (1, 0)) for i in range(max(known) + 1)]
    return STUBS % {"block": ", ".join(str(b) for b, _ in sizes), "size": ", ".join(str(s) for _, s in sizes)}


# the types whose quantizers the patch changes: the searches (make_qx_quants, make_qkx2/qkx3_quants;
# Q4_0, Q4_1, Q5_0, Q5_1 and Q3_K only with importance weights) and Q8_0's rounding
TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
ROWS, COLS = 16, 512


def _source_tree(build_bin: Path) -> Path:
    cache = (build_bin.parent / "CMakeCache.txt").read_text()
    return Path(re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache, re.M).group(1))


def _compile(tmp: Path, name: str, source: str, tree: Path) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler on PATH (the build needs one too): install gcc or clang")
    (tmp / f"{name}.c").write_text(source)
    (tmp / "stubs.c").write_text(_stubs())
    out = tmp / f"lib{name}.so"
    # ggml-base's own flags (-O3, no -march); -Bsymbolic: the library's calls stay inside it
    subprocess.run(
        [
            cc,
            "-O3",
            "-DNDEBUG",
            "-std=gnu11",
            "-fPIC",
            "-shared",
            "-D_GNU_SOURCE",
            f"-I{tree / 'ggml' / 'src'}",
            f"-I{tree / 'ggml' / 'include'}",
            str(tmp / f"{name}.c"),
            str(tmp / "stubs.c"),
            "-o",
            str(out),
            "-lm",
            "-Wl,-Bsymbolic",
        ],
        check=True,
        capture_output=True,
    )
    return ctypes.CDLL(str(out))


@pytest.fixture(scope="module")
def libs(build_bin, tmp_path_factory):
    tree = _source_tree(build_bin)
    r = subprocess.run(["git", "show", "base:ggml/src/ggml-quants.c"], cwd=tree, capture_output=True, text=True)
    assert r.returncode == 0, f"{tree} has no pristine `base` tag (run `make setup`): {r.stderr}"
    pristine = r.stdout
    assert "qk_lanes" not in pristine and "qk_lanes" in (tree / "ggml/src/ggml-quants.c").read_text()
    # a deliberately different quantizer: Q4_K's candidate scales shifted
    call = "make_qkx2_quants(32, 15, x + 32*j, weights, L + 32*j, &mins[j], Laux, -1.f, 0.1f, 20, false)"
    assert pristine.count(call) == 1
    perturbed = pristine.replace(call, call.replace("-1.f, 0.1f", "-0.5f, 0.1f"))
    tmp = tmp_path_factory.mktemp("quants")
    from qwen35.converter import quantize

    return quantize._ggml_base(), _compile(tmp, "pristine", pristine, tree), _compile(tmp, "perturbed", perturbed, tree)


def _data(kind: str, rng) -> np.ndarray:
    shape = (ROWS, COLS)
    if kind == "normal":
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if kind == "heavy-tailed":
        return (rng.standard_t(2, shape) * 0.01).astype(np.float32)
    if kind == "positive":
        return np.abs(rng.standard_normal(shape)).astype(np.float32)
    if kind == "negative":
        return (-np.abs(rng.standard_normal(shape)) - 1).astype(np.float32)
    if kind == "sparse":
        x = rng.standard_normal(shape).astype(np.float32)
        x[rng.random(shape) < 0.9] = 0
        return x
    if kind == "constant":
        return np.full(shape, 0.5, np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "tiny":
        return (rng.standard_normal(shape) * 1e-30).astype(np.float32)
    if kind == "huge":
        return (rng.standard_normal(shape) * 1e30).astype(np.float32)
    if kind == "subnormal":  # scales that overflow: Q8_0's libm fallback
        x = (rng.standard_normal(shape) * 1e-41).astype(np.float32)
        x[0, :5] = [1e-45, -1e-45, 0, 3e-45, 1e-38]
        return x
    if kind == "halves":  # Q8_0 values on exact .5 ties (amax 127: scale 1)
        x = (rng.integers(-254, 255, shape) / 2).astype(np.float32)
        x[:, ::32] = 127
        return x
    if kind == "few levels":
        return rng.integers(-2, 3, shape).astype(np.float32)
    if kind == "outliers":
        x = rng.standard_normal(shape).astype(np.float32)
        x[:, ::37] *= 100
        return x
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.01] = {"nan": np.nan, "inf": np.inf}[kind]
    return x


KINDS = [
    "normal",
    "heavy-tailed",
    "positive",
    "negative",
    "sparse",
    "constant",
    "zeros",
    "tiny",
    "huge",
    "subnormal",
    "halves",
    "few levels",
    "outliers",
    "nan",
    "inf",
]


def _row_bytes(q: Q) -> int:
    block, size = GGML_QUANT_SIZES[q]
    return COLS // block * size


def _patched(lib, q: Q, x: np.ndarray, w) -> np.ndarray:
    out = np.zeros(ROWS * _row_bytes(q), np.uint8)
    lib.ggml_quantize_chunk(
        int(q),
        ctypes.c_void_p(x.ctypes.data),
        ctypes.c_void_p(out.ctypes.data),
        0,
        ROWS,
        COLS,
        None if w is None else ctypes.c_void_p(w.ctypes.data),
    )
    return out


def _reference(lib, q: Q, x: np.ndarray, w) -> np.ndarray:
    fn = getattr(lib, f"quantize_{q.name.lower().replace('_k', '_K')}")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    out = np.zeros(ROWS * _row_bytes(q), np.uint8)
    assert fn(x.ctypes.data, out.ctypes.data, ROWS, COLS, None if w is None else w.ctypes.data) == out.size
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_quantizers_equal_upstream(libs, kind):
    patched, pristine, _ = libs
    rng = np.random.default_rng(KINDS.index(kind))
    x = _data(kind, rng)
    weights = (rng.random(COLS) ** 3).astype(np.float32)
    for q in TYPES:
        for w in (None, weights):
            got, want = _patched(patched, q, x, w), _reference(pristine, q, x, w)
            assert np.array_equal(got, want), (
                f"{q.name} {kind} imatrix={w is not None}: {int((got != want).sum())} bytes differ"
            )


def test_the_comparison_sees_a_changed_quantizer(libs):
    """The oracle runs its own code, not the patched library's: a quantizer changed in it (Q4_K's
    candidate scales shifted) gives other bytes than the patched library."""
    patched, pristine, perturbed = libs
    x = _data("normal", np.random.default_rng(0))
    assert np.array_equal(_patched(patched, Q.Q4_K, x, None), _reference(pristine, Q.Q4_K, x, None))
    assert not np.array_equal(_patched(patched, Q.Q4_K, x, None), _reference(perturbed, Q.Q4_K, x, None))
