#!/usr/bin/env python3
"""Pinned llama.cpp source tree: fetch, verify, patch, build, and re-export the patch series.

The source is the llama-cpp-python sdist from PyPI, which vendors llama.cpp under
``vendor/llama.cpp``. Patches in ``cpp_patches/`` apply to that llama.cpp tree in the
order listed by ``cpp_patches/series``.

Subcommands (all idempotent; each re-run with unchanged inputs returns in seconds):

    fetch                         download the sdist into .cache/ and verify its sha256
    prepare DEST [--upstream]     extract into DEST and apply the series (a git repo with one
                                  commit per patch on top of a ``base`` tag)
    build SRC BUILD_DIR           one CMake build of the libraries and tools
    bindings SRC BUILD_DIR        install llama-cpp-python from SRC without a native build and
                                  point it at BUILD_DIR's libraries
    export SRC                    regenerate cpp_patches/*.patch and series from SRC's commits
    series-id                     print the id the patched library reports

Only the standard library is used: this runs before the virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e570"

ROOT = Path(__file__).resolve().parent.parent
# QWEN35_PATCH_DIR points the tool at another copy of the series (tests use it).
PATCH_DIR = Path(os.environ.get("QWEN35_PATCH_DIR") or ROOT / "cpp_patches").resolve()
CACHE = Path(os.environ.get("QWEN35_CACHE_DIR") or ROOT / ".cache")
STAMP = ".qwen35-stamp"

# The tools the toolkit drives, besides the shared libraries.
TOOL_TARGETS = [
    "llama",
    "llama-quantize",
    "llama-imatrix",
    "llama-perplexity",
    "llama-bench",
    "ggml-rpc-server",
    "llama-gguf-split",
    "mtmd",  # libmtmd: images (the vision projector), for llama_cpp.mtmd_cpp
]


class TreeError(Exception):
    """A failure with a one-line explanation that names the fix."""


def log(msg: str) -> None:
    print(f"[llama-tree] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_series(patch_dir: Path = PATCH_DIR) -> list[Path]:
    """Patch files in apply order; blank lines and ``#`` comments are ignored."""
    series = patch_dir / "series"
    if not series.exists():
        return []
    patches = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = patch_dir / name
        if not path.is_file():
            raise TreeError(f"cpp_patches/series lists {name!r} but the file is missing; restore it or remove the line")
        patches.append(path)
    return patches


def series_id(patch_dir: Path = PATCH_DIR) -> str:
    """Content hash of the series: changes whenever any patch or the order changes."""
    h = hashlib.sha256(SDIST_SHA256.encode())
    for p in read_series(patch_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return "qwen35-" + h.hexdigest()[:16]


def run(
    cmd: list[str], cwd: Path | None = None, env: dict | None = None, capture: bool = False
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, check=False, text=True, capture_output=capture)


# --------------------------------------------------------------------------- fetch


def fetch() -> Path:
    CACHE.mkdir(exist_ok=True)
    sdist = CACHE / SDIST_FILE
    if sdist.exists() and sha256_file(sdist) == SDIST_SHA256:
        return sdist
    if sdist.exists():
        log(f"{sdist.name}: sha256 mismatch, downloading again")
        sdist.unlink()
    log(f"downloading {SDIST_NAME}=={SDIST_VERSION} sdist from PyPI")
    tmp = CACHE / "download.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    r = run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(tmp),
            f"{SDIST_NAME}=={SDIST_VERSION}",
        ]
    )
    got = tmp / SDIST_FILE
    if r.returncode != 0 or not got.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise TreeError(
            f"could not download {SDIST_NAME}=={SDIST_VERSION} from PyPI; "
            f"check the network or place {SDIST_FILE} in .cache/"
        )
    digest = sha256_file(got)
    if digest != SDIST_SHA256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TreeError(
            f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}; refusing to build from an unverified source"
        )
    os.replace(got, sdist)
    shutil.rmtree(tmp, ignore_errors=True)
    return sdist


# --------------------------------------------------------------------------- prepare


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="qwen35",
        GIT_AUTHOR_EMAIL="qwen35@localhost",
        GIT_COMMITTER_NAME="qwen35",
        GIT_COMMITTER_EMAIL="qwen35@localhost",
        GIT_AUTHOR_DATE="2026-10-01T00:00:00Z",
        GIT_COMMITTER_DATE="2026-10-01T00:00:00Z",
    )
    return run(
        ["git", "-c", "core.autocrlf=false", "-c", "commit.gpgsign=false", *args], cwd=cwd, env=env, capture=True
    )


def first_hunk_error(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("error:") and "patch failed" in line:
            return line[len("error:") :].strip()
    for line in output.splitlines():
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return output.strip().splitlines()[-1] if output.strip() else "unknown error"


def apply_series(llama_dir: Path, patches: list[Path]) -> None:
    """Turn llama_dir into a git repo: ``base`` = pristine source, one commit per patch."""
    gitfile = llama_dir / ".git"  # the sdist keeps its submodule's gitfile; it points nowhere useful
    if gitfile.is_file():
        gitfile.unlink()
    for cmd in (
        ["init", "-q"],
        ["add", "-A"],
        ["commit", "-q", "-m", f"llama.cpp {LLAMA_CPP_COMMIT} (llama-cpp-python {SDIST_VERSION} sdist)"],
        ["tag", "base"],
    ):
        r = _git(cmd, llama_dir)
        if r.returncode != 0:
            raise TreeError(f"git {cmd[0]} failed in {llama_dir}: {r.stderr.strip()}")
    for patch in patches:
        apply_patch(llama_dir, patch)


def apply_patch(llama_dir: Path, patch: Path) -> None:
    """Apply one patch as a commit (git am) to a prepared tree, or raise naming the patch."""
    r = _git(["am", "-q", "--keep-cr", "--whitespace=nowarn", str(patch)], llama_dir)
    if r.returncode != 0:
        detail = first_hunk_error(r.stdout + "\n" + r.stderr)
        _git(["am", "--abort"], llama_dir)
        raise TreeError(
            f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}: "
            f"{detail}; regenerate it with `make patches-export` from an edited tree"
        )


def prepare(dest: Path, upstream: bool = False) -> Path:
    """Extract the sdist into dest (replacing it) and apply the series unless upstream."""
    sdist = fetch()
    patches = [] if upstream else read_series()
    stamp = {"sdist": SDIST_SHA256, "series": "upstream" if upstream else series_id()}
    stamp_file = dest / STAMP
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return dest
    log(f"extracting {SDIST_FILE} into {dest}" + ("" if upstream else f" and applying {len(patches)} patch(es)"))
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    inner = tmp / f"llama_cpp_python-{SDIST_VERSION}"
    try:
        apply_series(inner / "vendor" / "llama.cpp", patches)
    except TreeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(inner, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    stamp_file.write_text(json.dumps(stamp))
    return dest


# --------------------------------------------------------------------------- build


def detect_backend() -> str:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    if shutil.which("nvcc") and shutil.which("nvidia-smi") and run(["nvidia-smi", "-L"], capture=True).returncode == 0:
        return "cuda"
    return "cpu"


# CPU code for any x86-64 of the last decade (AVX2, FMA, F16C, BMI2) instead of -march=native:
# for binaries built on one machine and run on another (the GPU session's prebuilt tools).
PORTABLE_X86 = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
]


def cmake_flags(backend: str, cuda_archs: str, sid: str, portable_cpu: bool = False) -> list[str]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DGGML_RPC=ON",
        f"-DLLAMA_QWEN35_SERIES_ID={sid}",
    ]
    if backend == "cuda":
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs or 'native'}"]
    elif backend == "metal":
        flags += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    elif backend == "vulkan":
        flags += ["-DGGML_VULKAN=ON"]
    elif backend != "cpu":
        raise TreeError(f"unknown BACKEND={backend!r}; use cpu, cuda, metal or vulkan")
    if portable_cpu:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise TreeError(f"--portable-cpu is for x86-64 builds; this machine is {platform.machine()}")
        flags += PORTABLE_X86
    return flags


def build(
    src: Path,
    build_dir: Path,
    backend: str,
    cuda_archs: str,
    jobs: int,
    targets: list[str],
    upstream: bool = False,
    portable_cpu: bool = False,
    cmake_args: list[str] | None = None,
) -> None:
    llama_dir = src / "vendor" / "llama.cpp"
    if not (llama_dir / "CMakeLists.txt").exists():
        raise TreeError(f"{llama_dir} is not a llama.cpp tree; run `make setup` to prepare it")
    if backend == "cuda" and not shutil.which("nvcc"):
        raise TreeError("BACKEND=cuda needs nvcc on PATH; install the CUDA toolkit or use BACKEND=cpu")
    sid = "upstream" if upstream else series_id()
    flags = cmake_flags(backend, cuda_archs, sid, portable_cpu) + list(cmake_args or [])
    flags_file = build_dir / ".qwen35-flags"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not flags_file.exists() or flags_file.read_text() != json.dumps(flags + gen):
        log(f"configuring {build_dir} ({backend})")
        build_dir.mkdir(parents=True, exist_ok=True)
        r = run(["cmake", "-S", str(llama_dir), "-B", str(build_dir), *gen, *flags], capture=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
            raise TreeError(f"CMake configure failed for BACKEND={backend}; see the log above")
        flags_file.write_text(json.dumps(flags + gen))
    log(f"building {', '.join(targets)} in {build_dir} with {jobs} job(s)")
    r = run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets])
    if r.returncode != 0:
        raise TreeError(f"the llama.cpp build in {build_dir} failed; see the compiler output above")


def shared_libs(build_dir: Path) -> list[Path]:
    ext = ".dylib" if sys.platform == "darwin" else ".so"
    return sorted(p for p in (build_dir / "bin").glob(f"lib*{ext}") if not p.is_symlink() or p.name.count(".") == 1)


def install_bindings(src: Path, build_dir: Path, python: Path) -> None:
    """pip-install llama-cpp-python's Python code from src (no native build) and link our libs."""
    r = run([str(python), "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"], capture=True)
    stamp = build_dir / ".qwen35-bindings"
    want = json.dumps({"sdist": SDIST_SHA256, "python": str(python), "gguf-py": True})
    if r.returncode != 0 or r.stdout.strip() != SDIST_VERSION or not stamp.exists() or stamp.read_text() != want:
        log("installing llama-cpp-python bindings (no native build) and the tree's gguf-py")
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        r = run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--force-reinstall",
                str(src),
            ],
            env=env,
        )
        if r.returncode != 0:
            raise TreeError("installing the llama-cpp-python bindings failed; see pip's output above")
        # gguf-py of the pinned tree: the constants and writer its loader and converter use
        r = run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--force-reinstall",
                str(src / "vendor" / "llama.cpp" / "gguf-py"),
            ]
        )
        if r.returncode != 0:
            raise TreeError("installing the pinned tree's gguf-py failed; see pip's output above")
        stamp.write_text(want)
    r = run(
        [
            str(python),
            "-c",
            "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)",
        ],
        capture=True,
    )
    if r.returncode != 0:
        raise TreeError("llama_cpp is not importable after installing it; re-run `make setup`")
    lib_dir = Path(r.stdout.strip()) / "lib"
    lib_dir.mkdir(exist_ok=True)
    for old in lib_dir.iterdir():
        if old.is_symlink() or old.suffix in (".so", ".dylib"):
            old.unlink()
    for lib in (build_dir / "bin").iterdir():
        if lib.name.startswith("lib") and (".so" in lib.name or lib.suffix == ".dylib"):
            (lib_dir / lib.name).symlink_to(lib.resolve())


# --------------------------------------------------------------------------- export


def export(src: Path) -> None:
    """Write one patch per commit since ``base`` in src into cpp_patches/ and rewrite series."""
    llama_dir = src / "vendor" / "llama.cpp"
    r = _git(["status", "--porcelain", "--untracked-files=no"], llama_dir)
    if r.returncode != 0:
        raise TreeError(f"{llama_dir} is not a prepared tree; run `make setup` first")
    if r.stdout.strip():
        raise TreeError(f"{llama_dir} has uncommitted changes; commit them (one commit per patch) first")
    for old in read_series():
        old.unlink()
    r = _git(
        ["format-patch", "--no-signature", "--zero-commit", "--no-numbered", "-o", str(PATCH_DIR), "base..HEAD"],
        llama_dir,
    )
    if r.returncode != 0:
        raise TreeError(f"git format-patch failed: {r.stderr.strip()}")
    names = [n for n in r.stdout.split() if n]
    (PATCH_DIR / "series").write_text(
        "# Patches against llama.cpp "
        + LLAMA_CPP_COMMIT
        + " (llama-cpp-python "
        + SDIST_VERSION
        + " sdist), in apply order.\n"
        + "".join(Path(n).name + "\n" for n in names)
    )
    log(f"wrote {len(names)} patch(es); series id {series_id()}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch")
    p = sub.add_parser("prepare")
    p.add_argument("dest", type=Path)
    p.add_argument("--upstream", action="store_true")
    p = sub.add_parser("build")
    p.add_argument("src", type=Path)
    p.add_argument("build_dir", type=Path)
    p.add_argument("--backend", default=os.environ.get("BACKEND") or "")
    p.add_argument("--cuda-archs", default=os.environ.get("CUDA_ARCHS") or "")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--targets", nargs="+", default=TOOL_TARGETS)
    p.add_argument("--upstream", action="store_true")
    p.add_argument(
        "--portable-cpu",
        action="store_true",
        help="CPU code for any x86-64 with AVX2 rather than this machine's (-march=native)",
    )
    p.add_argument(
        "--cmake-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more CMake argument (repeatable), e.g. -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc",
    )
    p = sub.add_parser("bindings")
    p.add_argument("src", type=Path)
    p.add_argument("build_dir", type=Path)
    p.add_argument("--python", type=Path, required=True)
    p = sub.add_parser("export")
    p.add_argument("src", type=Path)
    sub.add_parser("series-id")
    sub.add_parser("backend")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch())
        elif args.cmd == "prepare":
            prepare(args.dest, args.upstream)
        elif args.cmd == "build":
            build(
                args.src,
                args.build_dir,
                args.backend or detect_backend(),
                args.cuda_archs,
                args.jobs,
                args.targets,
                args.upstream,
                args.portable_cpu,
                args.cmake_arg,
            )
        elif args.cmd == "bindings":
            install_bindings(args.src, args.build_dir, args.python)
        elif args.cmd == "export":
            export(args.src)
        elif args.cmd == "series-id":
            print(series_id())
        elif args.cmd == "backend":
            print(detect_backend())
    except TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
