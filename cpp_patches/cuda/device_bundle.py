"""Pack what a GPU session needs into .device/ (the device machine has no network).

    make cuda-bundle          # = python3 cpp_patches/cuda/device_bundle.py

writes, next to the working tree (ignored by git, ~10 MB; name `.device` in the device call's
carry):

* llama-src.tar.xz   the pinned llama.cpp with the series applied and the chunked kernel promoted
                     (cuda/gated_delta_net_chunked.cuh copied into ggml-cuda, the pending patches
                     applied), without the parts a CUDA build of test-backend-ops, llama-bench
                     and llama-perplexity never reads (models, docs, other backends); gguf-py kept
* whl/               flash-linear-attention and fla-core (the FLA peer of the benchmark) and this
                     toolkit as a wheel (the converter, for the end-to-end and llama-bench GGUFs)
* tokenizer/         the Qwen3.5 tokenizer files (tokenizer.json xz-compressed) for the synthetic
                     Qwen3.5-4B-shaped checkpoint
* cublas-include/    the pinned cuBLAS headers (ggml_compile.py's, 0.6 MB), which the harness
                     compiles against should the device's nvcc not find its own
* MANIFEST.json      what went in, with sha256s

cpp_patches/cuda/gpu_session.sh uses it on the device.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import tree  # noqa: E402
from ggml_compile import fetch_cublas_headers, pending_patches, promote  # noqa: E402
from session_plan import bundle_sources  # noqa: E402

OUT = ROOT / ".device"
TMP = ROOT / ".device.partial"   # built here, renamed to OUT when complete
SRC = ROOT / "build" / "cuda-src"
WHEELS = ["flash-linear-attention==0.6.0", "fla-core==0.6.0"]
# never read by a CUDA build of the tools the session runs
PRUNE = ["models", "docs", "media", "examples/model-conversion", "tools/server/public", "tools/ui",
         "ggml/src/ggml-vulkan", "ggml/src/ggml-sycl", "ggml/src/ggml-metal", "ggml/src/ggml-opencl",
         "ggml/src/ggml-cann", "ggml/src/ggml-hexagon", "ggml/src/ggml-webgpu", "ggml/src/ggml-zdnn",
         "ggml/src/ggml-openvino", "ggml/src/ggml-zendnn"]


def log(msg: str) -> None:
    print(f"[cuda-bundle] {msg}", file=sys.stderr, flush=True)


def promoted_tree() -> Path:
    """build/cuda-src: the series, then the chunked kernel header and the pending patches."""
    shutil.rmtree(SRC, ignore_errors=True)
    tree.prepare(SRC)
    llama = SRC / "vendor" / "llama.cpp"
    pending = promote(llama, commit=True)
    (SRC / tree.STAMP).unlink(missing_ok=True)   # not the series' tree any more
    log(f"prepared {llama} with {len(pending)} pending patch(es) and the chunked kernel header")
    return llama


def pack_source(llama: Path, dest: Path) -> None:
    def keep(info: tarfile.TarInfo):
        rel = info.name.split("/", 1)[1] if "/" in info.name else ""
        if rel == ".git" or rel.startswith(".git/") or any(rel == p or rel.startswith(p + "/") for p in PRUNE):
            return None
        return info

    tmp = dest.with_suffix(".partial")
    with lzma.open(tmp, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        tar.add(llama, arcname="llama.cpp", filter=keep)
    os.replace(tmp, dest)


def main() -> int:
    shutil.rmtree(TMP, ignore_errors=True)
    TMP.mkdir()
    llama = promoted_tree()
    src_tar = TMP / "llama-src.tar.xz"
    pack_source(llama, src_tar)
    log(f"{src_tar.name}: {src_tar.stat().st_size / 1e6:.1f} MB")

    whl = TMP / "whl"
    whl.mkdir()
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(whl), *WHEELS]).returncode:
        raise tree.TreeError(f"downloading {', '.join(WHEELS)} from PyPI failed; check the network")
    with tempfile.TemporaryDirectory() as tmp:   # build in a copy: no build/ or egg-info in the tree
        if subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(whl), str(ROOT)], cwd=tmp).returncode:
            raise tree.TreeError("building this toolkit's wheel failed; see pip's output above")
    log("wheels: " + ", ".join(sorted(p.name for p in whl.iterdir())))

    tok = TMP / "tokenizer"
    tok.mkdir()
    sys.path.insert(0, str(ROOT))
    from qwen35 import tiny

    tiny.write_tokenizer(tok)
    raw = tok / "tokenizer.json"   # 11 MB of JSON; xz makes it 2.4
    with lzma.open(raw.with_suffix(".json.xz"), "wb", preset=9) as f:
        f.write(raw.read_bytes())
    raw.unlink()
    shutil.copytree(fetch_cublas_headers(), TMP / "cublas-include")
    manifest = {
        "llama.cpp": tree.LLAMA_CPP_COMMIT, "series": tree.series_id(),
        "pending": [p.name for p in pending_patches()],
        "sources": bundle_sources(ROOT),   # session_plan.py refuses a bundle these no longer match
        "files": {str(p.relative_to(TMP)): tree.sha256_file(p) for p in sorted(TMP.rglob("*")) if p.is_file()},
    }
    (TMP / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    total = sum(p.stat().st_size for p in TMP.rglob("*") if p.is_file())
    tree_bytes = working_tree_bytes()
    if total + tree_bytes > CARRY_LIMIT:
        raise tree.TreeError(f"the working tree ({tree_bytes / 2**20:.1f} MiB) and .device ({total / 2**20:.1f} MiB) "
                             f"are over the {CARRY_LIMIT >> 20} MiB a device call takes: remove untracked files")
    shutil.rmtree(OUT, ignore_errors=True)
    os.replace(TMP, OUT)
    print(f"{OUT}: {total / 1e6:.1f} MB (carry it as .device); with the working tree "
          f"{(total + tree_bytes) / 2**20:.1f} MiB travel, of the {CARRY_LIMIT >> 20} MiB a device call takes")
    return 0


CARRY_LIMIT = 64 << 20   # what one device call takes: the working tree and the carried paths


def working_tree_bytes() -> int:
    """The files a device call sends: those git tracks, and those it would track."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=True)
    return sum((ROOT / f).stat().st_size for f in filter(None, r.stdout.decode().split("\0"))
               if (ROOT / f).is_file())


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tree.TreeError as e:
        shutil.rmtree(TMP, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
