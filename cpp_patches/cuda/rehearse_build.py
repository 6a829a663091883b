"""Rehearse a GPU session's CUDA build on a machine without a GPU or cuBLAS libraries.

    make cuda-rehearse        # = make cuda-bundle, then python3 cpp_patches/cuda/rehearse_build.py

gpu_session.sh's `build` step configures, compiles and links the patched llama.cpp (chunked
kernel promoted) for sm_90a on the device. That full build needs more than the compile checks in
CI: CMake's CUDA toolkit detection, cuBLAS and the driver library to link against, every
ggml-cuda translation unit, and the three tools the session runs. This script runs that very step
(`gpu_session.sh --one build`) here, in a copy of the working tree as the device receives it (the
files git tracks or would track, plus .device/), against:

* a copy of nvcc's toolkit without cuBLAS (as a compiler-only install is), and the pinned
  nvidia-cublas wheel (checked by sha256) laid out as pip installs it, on PYTHONPATH: the build
  step's cuda/device_env.py must find it there, as it finds torch's cuBLAS on a device whose
  toolkit lacks one, and the tools must then resolve it through their RPATH;
* a stand-in libcuda.so (lib/stubs, where a full toolkit keeps NVIDIA's own stub) that defines
  the driver functions libggml-cuda.so imports: the first pass links libggml-cuda, the names are
  read from it, then the step runs again and links the tools.

Then it checks that test-backend-ops, llama-bench and llama-perplexity exist with every symbol
resolved, that libggml-cuda.so has the chunked kernels (what tests/test_gdn_cuda_gpu.py's
end-to-end test looks for), and reports the build's CPU time from ninja's log, with what that
means for the device's 16 cores. Nothing runs on a GPU. About 35 minutes on 2 cores and 2 GB of
disk under build/cuda-rehearsal/ (wiped at the start of the next run); not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import tree  # noqa: E402
import device_env  # noqa: E402
from ggml_compile import download_cublas_wheel, extract_cublas  # noqa: E402

WORK = ROOT / "build" / "cuda-rehearsal"
BUNDLE = ROOT / ".device"
TOOLS = ["test-backend-ops", "llama-bench", "llama-perplexity"]
DEVICE_CORES = 16


def log(msg: str) -> None:
    print(f"[cuda-rehearse] {msg}", file=sys.stderr, flush=True)


def toolkit_root() -> Path:
    """The CUDA toolkit nvcc belongs to (device_env's answer, as on the device), checked whole."""
    try:
        top = device_env.toolkit_root()
    except device_env.EnvError as e:
        raise tree.TreeError(f"{e}; install the CUDA toolkit (the compiler is enough)") from None
    if not (top / "include" / "cuda_runtime.h").exists():
        raise tree.TreeError(f"{top} has no include/cuda_runtime.h; is nvcc's toolkit complete?")
    return top


def write_driver_stub(lib: Path, symbols: list[str]) -> Path:
    """lib/stubs/libcuda.so (soname libcuda.so.1) defining symbols; never loaded on a GPU."""
    stubs = lib / "stubs"
    stubs.mkdir(parents=True, exist_ok=True)
    src = stubs / "libcuda_stub.c"
    src.write_text("".join(f"int {s}(void) {{ return 999; }}\n" for s in symbols) or "int cuda_stub_empty;\n")
    so = stubs / "libcuda.so"
    r = subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(so), str(src)],
                       capture_output=True, text=True)
    if r.returncode:
        raise tree.TreeError(f"compiling the libcuda stand-in failed: {r.stderr.strip()[-300:]}")
    one = stubs / "libcuda.so.1"
    one.unlink(missing_ok=True)
    one.symlink_to("libcuda.so")
    return so


def driver_imports(lib: Path) -> list[str]:
    """The CUDA driver API functions (cu*) a shared library leaves undefined."""
    r = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True)
    names = {line.split()[-1].split("@")[0] for line in r.stdout.splitlines() if line.strip()}
    return sorted(n for n in names if re.fullmatch(r"cu[A-Z]\w*", n))


def make_toolkit(dest: Path, site: Path) -> Path:
    """dest: a copy of nvcc's toolkit (compiler only here: no cuBLAS), with the driver stand-in's
    folder; site: the pinned cuBLAS wheel laid out as pip installs it (nvidia/cu13/lib, include),
    where cuda/device_env.py finds torch's cuBLAS on a device whose toolkit lacks it."""
    top = toolkit_root()
    log(f"toolkit: a copy of {top}; the pinned cuBLAS as a pip install beside it (~420 MB download)")
    shutil.copytree(top, dest, symlinks=True)
    lib = dest / "lib64" if (dest / "lib64").is_dir() else dest / "lib"
    for stale in [*lib.glob("libcublas*"), *(dest / "include").glob("cublas*")]:
        stale.unlink()   # a full toolkit here: take it apart, so the device's other path is the one rehearsed
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        wheel = download_cublas_wheel(Path(tmp))
        extract_cublas(wheel, site / "nvidia" / "cu13" / "lib", "lib", (".so.13",))
        extract_cublas(wheel, site / "nvidia" / "cu13" / "include", "include", (".h",))
    write_driver_stub(lib, [])
    return lib


def device_tree(dest: Path) -> None:
    """The working tree as the device tool copies it: files git tracks or would track, and .device/."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True, check=True)
    for rel in filter(None, r.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copytree(BUNDLE, dest / ".device")


def build_step(tree_dir: Path, env: dict) -> int:
    """gpu_session.sh's build step, waited for; its exit status."""
    rc_file = tree_dir / "build" / "cuda-build.rc"
    subprocess.run(["bash", "cpp_patches/cuda/gpu_session.sh", "--one", "build"], cwd=tree_dir, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 3 * 3600
    while not rc_file.exists():
        if time.monotonic() > deadline:
            raise tree.TreeError(f"the build step wrote no exit status in 3 hours; see {rc_file.parent / 'cuda-build.log'}")
        time.sleep(5)
    time.sleep(0.5)   # the rc is written by echo; let it land
    return int(rc_file.read_text().strip() or 1)


def unresolved(binary: Path, env: dict) -> list[str]:
    r = subprocess.run(["ldd", "-r", str(binary)], capture_output=True, text=True, env=env)
    return [line.strip() for line in (r.stdout + r.stderr).splitlines()
            if "undefined symbol" in line or "not found" in line]


def ninja_times(build: Path) -> dict:
    last = {}   # ninja appends a line per run of a step; the relinks of pass 2 come twice
    for line in (build / ".ninja_log").read_text().splitlines()[1:]:
        start, end, _, out = line.split("\t")[:4]
        last[out] = (int(end) - int(start)) / 1000
    rows = [(t, out) for out, t in last.items()]
    cpu = sum(t for t, _ in rows)
    longest = max(rows)
    return {"steps": len(rows), "cpu_min": round(cpu / 60, 1),
            "cuda_tus": sum(out.endswith(".cu.o") for _, out in rows),
            "longest_s": round(longest[0], 1), "longest": Path(longest[1]).name,
            f"estimate_{DEVICE_CORES}_cores_min": round(max(cpu / DEVICE_CORES, longest[0]) / 60, 1)}


def run() -> dict:
    if not (BUNDLE / "llama-src.tar.xz").exists():
        raise tree.TreeError(".device/ is missing: run `make cuda-bundle` first (or `make cuda-rehearse`)")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    t0 = time.monotonic()
    site = WORK / "site"
    lib = make_toolkit(WORK / "toolkit", site)
    tree_dir = WORK / "tree"
    device_tree(tree_dir)
    toolkit = WORK / "toolkit"
    env = dict(os.environ, PATH=f"{toolkit / 'bin'}:{os.environ['PATH']}", CUDAToolkit_ROOT=str(toolkit),
               CUDACXX=str(toolkit / "bin" / "nvcc"), LD_LIBRARY_PATH=f"{lib}:{lib / 'stubs'}",
               PYTHONPATH=str(site))
    bindir = tree_dir / "build" / "cuda" / "bin"
    log("build step, pass 1 (stops at the tools' link: the driver stand-in is still empty)")
    rc = build_step(tree_dir, env)
    ggml_cuda = bindir / "libggml-cuda.so"
    if not ggml_cuda.exists():
        raise tree.TreeError(f"the build step failed before linking libggml-cuda (exit {rc}); "
                             f"see {tree_dir / 'build' / 'cuda-build.log'}")
    imports = driver_imports(ggml_cuda)
    write_driver_stub(lib, imports)
    if rc != 0:
        log(f"build step, pass 2 (the stand-in now defines {len(imports)} driver functions)")
        rc = build_step(tree_dir, env)
    if rc != 0:
        raise tree.TreeError(f"the build step failed (exit {rc}); see {tree_dir / 'build' / 'cuda-build.log'}")
    missing = [t for t in TOOLS if not (bindir / t).exists()]
    if missing:
        raise tree.TreeError(f"the build step succeeded without {', '.join(missing)}")
    problems = {t: unresolved(bindir / t, env) for t in TOOLS}
    problems = {t: p for t, p in problems.items() if p}
    if problems:
        raise tree.TreeError(f"unresolved symbols: {json.dumps(problems)[:400]}")
    if b"gdn_chunk_state" not in ggml_cuda.resolve().read_bytes():
        raise tree.TreeError("libggml-cuda.so has no chunked GATED_DELTA_NET kernel: was the bundle's tree promoted?")
    return {"ok": True, "wall_min": round((time.monotonic() - t0) / 60, 1), "tools": TOOLS,
            "driver_functions": imports, **ninja_times(tree_dir / "build" / "cuda")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        res = run()
    except (tree.TreeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"CUDA build rehearsal: configured, compiled and linked {', '.join(TOOLS)} (sm_90a, chunked kernel "
              f"in libggml-cuda) in {res['wall_min']} min; {res['steps']} build steps, {res['cuda_tus']} CUDA "
              f"translation units, {res['cpu_min']} CPU-min (longest {res['longest']}, {res['longest_s']} s): "
              f"about {res[f'estimate_{DEVICE_CORES}_cores_min']} min on the device's {DEVICE_CORES} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
