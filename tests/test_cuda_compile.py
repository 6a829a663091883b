"""Compile-check the CUDA sources of the patch work with nvcc (no GPU needed), so a build break
cannot land: the kernel in its standalone harness, and the pending ggml wiring in ggml-cuda's own
translation unit (cpp_patches/cuda/ggml_compile.py). Run the kernels on a GPU with
cpp_patches/cuda/run_harness.py."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cpp_patches" / "cuda"))
import ggml_compile  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
PREPARED = ROOT / "build" / "src" / "vendor" / "llama.cpp"


@needs_nvcc
@pytest.mark.parametrize(
    "arch,extra",
    [("80", ()), ("90a", ()), ("90a", ("GDN_CHUNKED_1XTF32",)), ("90a", ("GDN_CHUNKED_NW=16",))],
    ids=["80", "90a", "90a-precision-probe", "90a-16-warps"],
)
def test_chunked_gdn_kernel_compiles(tmp_path, arch, extra, cublas):
    """The GPU harness: the chunked kernels, and upstream's token-sequential kernel taken from the
    prepared tree beside them (the bench times both on the same buffers); also as run_harness.py
    --precision builds it a second time (one TF32 product instead of three), and as --bench builds
    it with 16 warps per block (512 threads: at most 128 registers each, still no spills)."""
    from run_harness import PRECISION_PROBE, nvcc_cmd, warps_build

    assert not extra or extra in (PRECISION_PROBE, warps_build(16))
    assert (PREPARED / ".git").exists(), "the prepared tree is missing: `make setup` prepares it before the tests"
    lib = tmp_path / "libgdn.so"
    r = subprocess.run(nvcc_cmd(lib, arch, PREPARED, extra) + ["-Xptxas", "-v"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    kernels = {ggml_compile.kernel_name(k): v for k, v in ggml_compile.ptxas_report(r.stderr).items()}
    assert {"gdn_chunk_prep<64>", "gdn_chunk_prep<128>", "gdn_chunk_state<128,64>"} <= set(kernels), kernels
    assert [k for k in kernels if "gated_delta_net_cuda" in k], f"upstream's kernel is not in the harness: {kernels}"
    # no register spills in the chunked kernels (they would cost more than the chunking gains)
    spills = {k: v for k, v in kernels.items() if k.startswith("gdn_chunk_") and v["spill_bytes"]}
    assert not spills, spills
    # nothing left for the loader to find in ggml: ctypes must open it on a machine with no ggml
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    assert "ggml" not in undefined, [line for line in undefined.splitlines() if "ggml" in line]
    # and run_harness.py finds every entry point it binds (loading needs no GPU); the stamp it
    # keeps beside a harness it compiled makes it load this one rather than compile it again
    from run_harness import build, harness_key

    lib.with_name(lib.name + ".key").write_text(harness_key(arch, PREPARED, extra))
    loaded = build(lib, arch, PREPARED, extra)
    assert loaded.gdn_harness_scratch_floats(64, 2, 1) > 0
    assert loaded.gdn_harness_warps() == (16 if extra == warps_build(16) else 8)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    """ggml/ and test-backend-ops.cpp of the prepared tree with the chunked kernel promoted."""
    assert (PREPARED / ".git").exists(), "the prepared tree is missing: `make setup` prepares it before the tests"
    dest = tmp_path_factory.mktemp("promoted") / "llama.cpp"
    ggml_compile.export_promoted(PREPARED, dest)
    return dest


@pytest.fixture(scope="module")
def cublas():
    if ggml_compile.nvcc_finds_cublas():
        return None
    assert (ggml_compile.CUBLAS_INCLUDE / "cublas_v2.h").exists(), (
        "nvcc has no cuBLAS headers: `make cuda-deps` fetches the pinned ones (make test does it first)"
    )
    return ggml_compile.CUBLAS_INCLUDE


@needs_nvcc
@pytest.mark.parametrize("arch", ggml_compile.DEFAULT_BUILD_ARCHS)
def test_ggml_cuda_translation_unit_compiles_with_the_chunked_path(promoted, cublas, arch):
    """gated_delta_net.cu with the pending wiring, in ggml-cuda's translation unit and flags:
    compiles warning-free in the changed files, instantiates every chunked kernel, no spills.
    ggml's default (non-native) CUDA 13 build is one binary for 75-virtual, 80-virtual, 86, 89,
    90-virtual, 120a and 121a; each is compiled here. sm_75 takes the kernels' trap stubs (no
    TF32 mma or cp.async; the dispatcher never launches them there), which must compile too,
    or every such build breaks."""
    report = ggml_compile.compile_tu(promoted, arch, cublas)
    names = sorted(ggml_compile.kernel_name(k) for k in report["kernels"])
    assert names == [
        "gdn_chunk_prep<128>",
        "gdn_chunk_prep<64>",
        "gdn_chunk_state<128,32>",
        "gdn_chunk_state<128,64>",
        "gdn_chunk_state<64,32>",
    ]
    for k, v in report["kernels"].items():
        assert v["registers"] and v["registers"] <= 255 and v["spill_bytes"] == 0, (k, v)


@needs_nvcc
def test_ggml_compile_reports_a_warning_in_the_changed_file(promoted, cublas, tmp_path):
    """The check is not blind: an unused variable in the wiring is an error of the check."""
    import tree

    broken = tmp_path / "llama.cpp"
    shutil.copytree(promoted, broken)
    cu = broken / "ggml" / "src" / "ggml-cuda" / "gated_delta_net.cu"
    text = cu.read_text()
    anchor = "void ggml_cuda_op_gated_delta_net("
    assert anchor in text
    head, tail = text.split(anchor, 1)
    body_start = tail.index("{") + 1
    cu.write_text(head + anchor + tail[:body_start] + "\n    int qwen35_unused_probe = 1;" + tail[body_start:])
    with pytest.raises(tree.TreeError, match=r"qwen35_unused_probe|unused variable"):
        ggml_compile.compile_tu(broken, "80", cublas)


def test_test_backend_ops_cases_compile(promoted):
    """The pending patch's test-backend-ops cases compile (the CI build has only the series)."""
    ggml_compile.check_test_backend_ops(promoted)


def test_pending_patches_apply_on_the_series():
    """The draft ggml wiring (cpp_patches/pending/) still applies on top of the series, so a
    GPU machine can promote it; a series change that breaks it shows here."""
    llama = ROOT / "build" / "src" / "vendor" / "llama.cpp"
    assert (llama / ".git").exists(), "the prepared tree is missing: `make setup` prepares it before the tests"
    pending = sorted((ROOT / "cpp_patches" / "pending").glob("*.patch"))
    assert pending
    for patch in pending:
        r = subprocess.run(["git", "apply", "--check", str(patch)], cwd=llama, capture_output=True, text=True)
        assert r.returncode == 0, f"{patch.name} no longer applies: {r.stderr.strip()}"
