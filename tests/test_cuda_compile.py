"""Compile-check the CUDA sources of the patch work with nvcc (no GPU needed), so a build break
cannot land; run the kernels on a GPU with cpp_patches/cuda/run_harness.py."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cpp_patches" / "cuda"))

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90a"])
def test_chunked_gdn_kernel_compiles(tmp_path, arch):
    from run_harness import nvcc_cmd

    cmd = nvcc_cmd(tmp_path / "libgdn.so", arch) + ["-Xptxas", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "libgdn.so").stat().st_size > 0
    # no register spills in the state kernel (they would cost more than the chunking gains)
    spills = [line for line in r.stderr.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")
              and " 0 bytes spill stores, 0 bytes spill loads" not in line]
    assert not spills, spills


def test_pending_patches_apply_on_the_series():
    """The draft ggml wiring (cpp_patches/pending/) still applies on top of the series, so a
    GPU session (make cuda-bundle) can promote it; a series change that breaks it shows here."""
    llama = ROOT / "build" / "src" / "vendor" / "llama.cpp"
    assert (llama / ".git").exists(), "the prepared tree is missing: `make setup` prepares it before the tests"
    pending = sorted((ROOT / "cpp_patches" / "pending").glob("*.patch"))
    assert pending
    for patch in pending:
        r = subprocess.run(["git", "apply", "--check", str(patch)], cwd=llama, capture_output=True, text=True)
        assert r.returncode == 0, f"{patch.name} no longer applies: {r.stderr.strip()}"
