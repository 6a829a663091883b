"""Compile what the CUDA work changes in llama.cpp, as ggml's own build would, without a GPU.

    python3 cpp_patches/cuda/ggml_compile.py [--arch 86 90a ...] [--keep DIR] [--json]
    python3 cpp_patches/cuda/ggml_compile.py --fetch-only      # only the cuBLAS headers, if needed

1. exports ggml/ and tests/test-backend-ops.cpp from the prepared tree (`make setup`) with
   `git archive` and promotes the chunked kernel there: cuda/gated_delta_net_chunked.cuh copied
   into ggml-cuda, the pending patches applied. That is the tree a CUDA build with the
   kernel promoted compiles.
2. compiles ggml-cuda/gated_delta_net.cu in its own translation unit with ggml-cuda's flags
   (-use_fast_math -extended-lambda, its definitions) and host warnings on, for each arch; fails
   on an error, on a warning from the changed files, on a missing chunked kernel, or on a
   register spill in one.
3. checks tests/test-backend-ops.cpp (the new cases) with the host compiler (-fsyntax-only).

ggml-cuda includes cuBLAS's headers. A toolkit without them (a compiler-only CUDA install) gets
those of the pinned nvidia-cublas wheel from PyPI, checked by sha256; only its include/ folder is
kept, under .cache/. Standard library only: `make test` runs --fetch-only before the venv is used.
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
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import tree  # noqa: E402

HEADER = HERE / "gated_delta_net_chunked.cuh"
CHANGED = ("gated_delta_net.cu", "gated_delta_net_chunked.cuh")
# The kernels the wiring must instantiate: prep for S_v 64/128, state for (S_v, tile) pairs.
KERNELS = (
    "gdn_chunk_prepILi64E",
    "gdn_chunk_prepILi128E",
    "gdn_chunk_stateILi64ELi32E",
    "gdn_chunk_stateILi128ELi32E",
    "gdn_chunk_stateILi128ELi64E",
)

# Every target of ggml's default (non-native) CUDA 13 build, compiled here as real code: the
# virtual ones (75, 80, 90) run as PTX JIT-compiled to the card, so their SASS is checked too.
# sm_75 gets the kernels' trap stubs (no TF32 mma or cp.async; never launched there).
DEFAULT_BUILD_ARCHS = ("75", "80", "86", "89", "90a", "120a", "121a")

# Headers only (they do not depend on the platform), so the one x86-64 file is pinned everywhere.
CUBLAS = "nvidia-cublas"
CUBLAS_VERSION = "13.0.0.19"
CUBLAS_FILE = f"nvidia_cublas-{CUBLAS_VERSION}-py3-none-manylinux_2_27_x86_64.whl"
CUBLAS_SHA256 = "f6723af2e8e2600a11dc384037d90d9bf93070e346c24ef2e8f9001658c99896"
CUBLAS_INCLUDE = tree.CACHE / f"cublas-{CUBLAS_VERSION}" / "include"

# ggml/src/ggml-cuda/CMakeLists.txt and ggml/src/CMakeLists.txt, for a Release shared build
DEFINES = [
    "NDEBUG",
    "GGML_CUDA_USE_GRAPHS",
    "GGML_SCHED_MAX_COPIES=4",
    "_GNU_SOURCE",
    "_XOPEN_SOURCE=600",
    "GGML_BACKEND_BUILD",
    "GGML_BACKEND_SHARED",
    "GGML_SHARED",
]


def log(msg: str) -> None:
    print(f"[ggml-compile] {msg}", file=sys.stderr, flush=True)


def have_nvcc() -> bool:
    return shutil.which("nvcc") is not None


def nvcc_finds_cublas() -> bool:
    """Whether nvcc's own include path has cublas_v2.h (a full toolkit does)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("#include <cublas_v2.h>\n")
        r = subprocess.run(["nvcc", "-E", str(src), "-o", os.devnull], capture_output=True, text=True)
        return r.returncode == 0


def download_cublas_wheel(dest: Path) -> Path:
    """The pinned nvidia-cublas wheel (~420 MB) downloaded into dest and checked by sha256."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_27_x86_64",
            "-d",
            str(dest),
            f"{CUBLAS}=={CUBLAS_VERSION}",
        ]
    )
    wheel = dest / CUBLAS_FILE
    if r.returncode != 0 or not wheel.exists():
        raise tree.TreeError(
            f"could not download {CUBLAS}=={CUBLAS_VERSION} from PyPI; check the network "
            "or install a CUDA toolkit with cuBLAS"
        )
    digest = tree.sha256_file(wheel)
    if digest != CUBLAS_SHA256:
        raise tree.TreeError(
            f"{CUBLAS_FILE} has sha256 {digest}, expected {CUBLAS_SHA256}; refusing an unverified cuBLAS"
        )
    return wheel


def extract_cublas(wheel: Path, dest: Path, part: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The wheel's nvidia/*/PART/* files whose names end in one of suffixes, flat into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) == 4 and parts[0] == "nvidia" and parts[2] == part and parts[3].endswith(suffixes):
                (dest / parts[3]).write_bytes(z.read(info))
                out.append(dest / parts[3])
    return out


def fetch_cublas_headers() -> Path:
    """.cache/cublas-VERSION/include from the pinned wheel (downloaded once, ~420 MB, then deleted)."""
    if (CUBLAS_INCLUDE / "cublas_v2.h").exists():
        return CUBLAS_INCLUDE
    tree.CACHE.mkdir(exist_ok=True)
    tmp = tree.CACHE / "cublas.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"nvcc has no cuBLAS headers: taking them from {CUBLAS}=={CUBLAS_VERSION} (PyPI, ~420 MB download)")
    try:
        wheel = download_cublas_wheel(tmp)
        inc = tmp / "include"
        extract_cublas(wheel, inc, "include", (".h",))
        if not (inc / "cublas_v2.h").exists():
            raise tree.TreeError(f"{CUBLAS_FILE} has no include/cublas_v2.h")
        CUBLAS_INCLUDE.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(CUBLAS_INCLUDE, ignore_errors=True)
        os.replace(inc, CUBLAS_INCLUDE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CUBLAS_INCLUDE


def cublas_include() -> Path | None:
    """Extra include folder for cuBLAS, or None when nvcc finds it on its own."""
    if (CUBLAS_INCLUDE / "cublas_v2.h").exists() or not nvcc_finds_cublas():
        return fetch_cublas_headers()
    return None


def pending_patches() -> list[Path]:
    return sorted((HERE.parent / "pending").glob("*.patch"))


def promote(llama: Path, commit: bool) -> list[Path]:
    """Copy the kernel header into ggml-cuda and apply the pending patches: as commits (git am) in
    a prepared tree, or with `git apply` in an exported one. Returns the patches applied."""
    shutil.copy(HEADER, llama / "ggml" / "src" / "ggml-cuda")
    patches = pending_patches()
    for patch in patches:
        if commit:
            tree.apply_patch(llama, patch)
            continue
        r = subprocess.run(
            ["git", "apply", "--whitespace=nowarn", str(patch)], cwd=llama, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise tree.TreeError(
                f"pending patch {patch.name} does not apply on the series: "
                f"{tree.first_hunk_error(r.stderr)}; rebase it on a `make setup` tree"
            )
    return patches


def export_promoted(prepared: Path, dest: Path) -> None:
    """ggml/ and tests/test-backend-ops.cpp of the prepared tree's HEAD, promoted, into dest."""
    if not (prepared / ".git").exists():
        raise tree.TreeError(f"{prepared} is not a prepared tree; run `make setup` first")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD", "ggml", "tests/test-backend-ops.cpp"], cwd=prepared, capture_output=True
    )
    if archive.returncode != 0:
        raise tree.TreeError(f"git archive failed in {prepared}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    promote(dest, commit=False)


def nvcc_tu_cmd(llama: Path, arch: str, out: Path, cublas: Path | None) -> list[str]:
    cuda = llama / "ggml" / "src" / "ggml-cuda"
    cmd = [
        "nvcc",
        "-c",
        str(cuda / "gated_delta_net.cu"),
        "-o",
        str(out),
        "-std=c++17",
        "-O3",
        "-use_fast_math",
        "-extended-lambda",
        "-Xcompiler",
        "-Wall,-Wextra,-Wno-pedantic",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
    ]
    cmd += [f"-D{d}" for d in DEFINES]
    cmd += ["-I", str(llama / "ggml" / "src"), "-I", str(llama / "ggml" / "include")]
    if cublas is not None:
        cmd += ["-I", str(cublas)]
    return cmd


def ptxas_report(stderr: str) -> dict[str, dict]:
    """{mangled kernel: {"registers": n, "spill_bytes": n}} from nvcc -Xptxas -v output."""
    kernels: dict[str, dict] = {}
    name = None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            kernels[name] = {"registers": None, "spill_bytes": 0}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[name]["registers"] = int(m.group(1))
    return kernels


def kernel_name(mangled: str) -> str:
    """'_ZN11gdn_chunked15gdn_chunk_stateILi128ELi32EEEvNS_6paramsE' -> 'gdn_chunk_state<128,32>'"""
    m = re.search(r"(gdn_chunk_[a-z]+)I((?:Li\d+E)+)E", mangled)
    if not m:
        return mangled
    args = re.findall(r"Li(\d+)E", m.group(2))
    return f"{m.group(1)}<{','.join(args)}>"


# "file.cu:12:5: warning: ..." (host compiler) and "file.cu(12): warning #177-D: ..." (nvcc front end)
CHANGED_WARNING = re.compile(
    r"(?:^|/)(?:" + "|".join(re.escape(f) for f in CHANGED) + r")(?:\(\d+\)|:\d+(?::\d+)?):\s+warning"
)


def warnings_in_changed_files(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CHANGED_WARNING.search(line)]


def compile_tu(llama: Path, arch: str, cublas: Path | None) -> dict:
    """Compile gated_delta_net.cu for arch; returns the report, raises TreeError on a failure."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            nvcc_tu_cmd(llama, arch, Path(tmp) / "gated_delta_net.o", cublas), capture_output=True, text=True
        )
    if r.returncode != 0:
        errors = [line for line in r.stderr.splitlines() if "error" in line] or r.stderr.strip().splitlines()[-1:]
        raise tree.TreeError(f"ggml-cuda/gated_delta_net.cu does not compile for sm_{arch}: {errors[0].strip()}")
    warnings = warnings_in_changed_files(r.stderr)
    if warnings:
        raise tree.TreeError(f"warning in the changed CUDA files (sm_{arch}): {warnings[0].strip()}")
    kernels = ptxas_report(r.stderr)
    ours = {k: v for k, v in kernels.items() if "gdn_chunked" in k}
    missing = [k for k in KERNELS if not any(k in name for name in ours)]
    if missing:
        raise tree.TreeError(f"the ggml wiring no longer instantiates {', '.join(missing)} (sm_{arch})")
    spills = {k: v["spill_bytes"] for k, v in ours.items() if v["spill_bytes"]}
    if spills:
        raise tree.TreeError(f"register spills in the chunked kernels for sm_{arch}: {spills}")
    return {"arch": arch, "kernels": ours}


def check_test_backend_ops(llama: Path) -> None:
    cxx = os.environ.get("CXX") or "c++"
    r = subprocess.run(
        [
            cxx,
            "-fsyntax-only",
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-I",
            str(llama / "ggml" / "include"),
            str(llama / "tests" / "test-backend-ops.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or "warning" in r.stderr:
        first = next((line for line in r.stderr.splitlines() if "error" in line or "warning" in line), r.stderr)
        raise tree.TreeError(f"tests/test-backend-ops.cpp with the pending patches: {first.strip()}")


def run(archs: list[str], prepared: Path, keep: Path | None = None) -> dict:
    if not have_nvcc():
        raise tree.TreeError("nvcc is not on PATH; install the CUDA toolkit (no GPU needed) or put its bin/ on PATH")
    cublas = cublas_include()
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise tree.TreeError(f"{keep} is not empty; give --keep a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        llama = Path(tmp) / "llama.cpp"
        export_promoted(prepared, llama)
        if keep is not None:  # only a complete export is moved there
            keep.parent.mkdir(parents=True, exist_ok=True)
            if keep.exists():
                keep.rmdir()  # empty, checked above
            llama = Path(shutil.move(str(llama), str(keep)))
        report = {
            "pending": [p.name for p in pending_patches()],
            "cublas": str(cublas) if cublas else "toolkit",
            "tu": [compile_tu(llama, a, cublas) for a in archs],
        }
        check_test_backend_ops(llama)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arch",
        nargs="+",
        default=list(DEFAULT_BUILD_ARCHS),
        help=f"nvcc archs (default: {' '.join(DEFAULT_BUILD_ARCHS)}, ggml's default CUDA 13 build)",
    )
    ap.add_argument(
        "--tree",
        type=Path,
        default=tree.ROOT / "build" / "src" / "vendor" / "llama.cpp",
        help="the prepared llama.cpp tree (default: make setup's)",
    )
    ap.add_argument("--keep", type=Path, help="export the promoted sources here and leave them")
    ap.add_argument(
        "--fetch-only",
        action="store_true",
        help="only make sure nvcc can find cuBLAS headers (does nothing without nvcc)",
    )
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        if args.fetch_only:
            if have_nvcc():
                inc = cublas_include()
                print(f"cuBLAS headers: {inc or 'from the CUDA toolkit'}")
            return 0
        report = run(args.arch, args.tree, args.keep)
    except tree.TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for tu in report["tu"]:
            regs = ", ".join(f"{kernel_name(k)} {v['registers']} regs" for k, v in sorted(tu["kernels"].items()))
            print(f"sm_{tu['arch']}: gated_delta_net.cu compiles, no spills ({regs})")
        print("tests/test-backend-ops.cpp: compiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
