"""What the GPU session's CUDA build finds on the device machine, and the CMake arguments it needs.

    python3 cpp_patches/cuda/device_env.py               # the probe: one line per fact
    python3 cpp_patches/cuda/device_env.py --cmake-args  # one CMake argument per line (maybe none)

ggml-cuda links cuBLAS, cuBLASLt and the driver library through CMake's FindCUDAToolkit, which
looks beside nvcc. A full toolkit has them there; a compiler-only one (nvcc from a minimal image,
the pip `nvidia-cuda-nvcc` packages) does not, while the Python wheels torch depends on do carry
cuBLAS (`site-packages/nvidia/cu13/lib/libcublas.so.13`, versioned names only, which
find_library never matches). Where nvcc's toolkit lacks one, this names the wheel's file as the
CMake cache variable FindCUDAToolkit would have set (CUDA_cublas_LIBRARY, ...), and the headers
(the wheel's, else the bundle's .device/cublas-include) through CMAKE_CUDA_FLAGS. The driver
library, where the toolkit has no stub, is the one the dynamic loader knows (ldconfig -p).
cpp_patches/cuda/rehearse_build.py builds against exactly that layout here, so the path the
device takes when its toolkit is incomplete is the one rehearsed.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BUNDLE_HEADERS = ROOT / ".device" / "cublas-include"
LIBS = ("cublas", "cublasLt")


class EnvError(RuntimeError):
    pass


def toolkit_root(nvcc: str | None = None) -> Path:
    """The toolkit nvcc belongs to (its TOP; nvcc on PATH may be a link or a wrapper)."""
    nvcc = nvcc or shutil.which("nvcc")
    if not nvcc:
        raise EnvError("nvcc is not on PATH: this machine has no CUDA compiler")
    r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                       capture_output=True, text=True)
    m = re.search(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, re.M)
    return Path(m.group(1).strip()).resolve() if m else Path(nvcc).resolve().parent.parent


def _lib_dirs(top: Path) -> list[Path]:
    return [d for d in (top / "lib64", top / "lib", *sorted(top.glob("targets/*/lib"))) if d.is_dir()]


def _include_dirs(top: Path) -> list[Path]:
    return [d for d in (top / "include", *sorted(top.glob("targets/*/include"))) if d.is_dir()]


def _wheel_dirs(part: str, search_path: list[str]) -> list[Path]:
    """nvidia/<pkg>/<part> of every installed NVIDIA wheel on the path (cu13, cublas, ...)."""
    out = []
    for entry in search_path:
        for d in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*", part))):
            if Path(d).is_dir() and Path(d) not in out:
                out.append(Path(d))
    return out


def _find(dirs: list[Path], name: str) -> Path | None:
    """lib<name>.so in dirs, else its highest versioned file (lib<name>.so.13)."""
    for d in dirs:
        if (d / f"lib{name}.so").exists():
            return d / f"lib{name}.so"
    for d in dirs:
        versioned = sorted(d.glob(f"lib{name}.so.*"), key=lambda p: [int(x) if x.isdigit() else 0
                                                                     for x in p.name.split(".so.")[1].split(".")])
        if versioned:
            return versioned[-1]
    return None


def _ldconfig_libcuda() -> Path | None:
    try:
        r = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True)
    except OSError:
        return None
    m = re.search(r"^\s*libcuda\.so\.1 \([^)]*x86-64[^)]*\) => (\S+)$", r.stdout, re.M)
    return Path(m.group(1)) if m else None


@dataclass
class CudaEnv:
    top: Path
    cublas: dict[str, Path | None] = field(default_factory=dict)   # name -> file, None: the toolkit has it
    cublas_include: Path | None = None                               # None: the toolkit has it
    driver: Path | None = None                                       # None: the toolkit has it (or its stub)
    notes: list[str] = field(default_factory=list)

    def cmake_args(self) -> list[str]:
        args = [f"-DCUDA_{name}_LIBRARY={path}" for name, path in self.cublas.items() if path is not None]
        if self.driver is not None:
            args.append(f"-DCUDA_cuda_driver_LIBRARY={self.driver}")
        if self.cublas_include is not None:
            args.append(f"-DCMAKE_CUDA_FLAGS=-I{self.cublas_include}")
        return args


def discover(top: Path, search_path: list[str] | None = None, bundle_headers: Path = BUNDLE_HEADERS,
             libcuda: Path | None | bool = False) -> CudaEnv:
    """Where cuBLAS, its headers and the driver library come from for a build with this toolkit.
    search_path: where the Python wheels are (default sys.path); libcuda: the loader's
    libcuda.so.1 (default: ldconfig -p)."""
    search_path = sys.path if search_path is None else search_path
    env = CudaEnv(top=top)
    lib_dirs = _lib_dirs(top)
    wheel_libs = _wheel_dirs("lib", search_path)
    for name in LIBS:
        if any((d / f"lib{name}.so").exists() for d in lib_dirs):   # what find_library matches
            env.cublas[name] = None
            continue
        found = _find(lib_dirs, name) or _find(wheel_libs, name)
        if found is None:
            raise EnvError(f"no lib{name}.so in {top} and no NVIDIA wheel with it on the Python path "
                           f"({len(wheel_libs)} nvidia/*/lib folders): install cuBLAS (a full CUDA toolkit, or "
                           "pip's nvidia-cublas) for the CUDA build")
        env.cublas[name] = found
        env.notes.append(f"lib{name}: {found} (not in nvcc's toolkit)")
    if any((d / "cublas_v2.h").exists() for d in _include_dirs(top)):
        env.cublas_include = None
    else:
        heads = [d for d in _wheel_dirs("include", search_path) if (d / "cublas_v2.h").exists()]
        if (bundle_headers / "cublas_v2.h").exists():
            heads.append(bundle_headers)
        if not heads:
            raise EnvError(f"no cublas_v2.h in {top}, in an NVIDIA wheel or in {bundle_headers}: run "
                           "`make cuda-bundle` (it packs the pinned cuBLAS headers) or install a full toolkit")
        env.cublas_include = heads[0]
        env.notes.append(f"cublas_v2.h: {heads[0]} (not in nvcc's toolkit)")
    stub_dirs = [d / "stubs" for d in lib_dirs] + lib_dirs
    if any((d / "libcuda.so").exists() for d in stub_dirs):
        env.driver = None
    else:
        real = _ldconfig_libcuda() if libcuda is False else libcuda
        if not real:
            raise EnvError(f"no libcuda.so (stub) in {top} and no libcuda.so.1 known to the loader: "
                           "is the NVIDIA driver installed?")
        env.driver = Path(real)
        env.notes.append(f"libcuda: {real} (no stub in nvcc's toolkit)")
    return env


def _version(cmd: list[str], pattern: str = r"(\d+\.\d+[\w.]*)") -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not found ({type(e).__name__})"
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(1) if m else (r.stdout + r.stderr).strip()[:80]


def probe() -> int:
    """The facts a session's plan depends on, one per line; 1 if the CUDA build cannot work here."""
    nvcc = _version(["nvcc", "--version"], r"release ([\d.]+)")
    print(f"nvcc: {nvcc} at {shutil.which('nvcc')}")
    print(f"cmake: {_version(['cmake', '--version'])}; ninja: {_version(['ninja', '--version'])}")
    print(f"python: {sys.version.split()[0]} at {sys.executable}")
    try:
        import torch

        print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    except ImportError:
        print("torch: not installed")
    du = shutil.disk_usage("/tmp")
    print(f"cores: {os.cpu_count()}; /tmp free: {du.free / 2**30:.0f} GiB")
    try:
        top = toolkit_root()
        env = discover(top)
    except EnvError as e:
        print(f"CUDA build: impossible here: {e}")
        return 1
    print(f"toolkit: {top}")
    for note in env.notes or ["cuBLAS, its headers and the driver library: all in nvcc's toolkit"]:
        print(f"  {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cmake-args", action="store_true", help="print the CMake arguments, one per line")
    ap.add_argument("--lib-dirs", action="store_true",
                    help="print the toolkit's and the NVIDIA wheels' library folders, ':'-joined (CMake leaves "
                         "nvcc's own out of the tools' RUNPATH: the loader must know it)")
    args = ap.parse_args(argv)
    if args.lib_dirs:
        try:
            dirs = _lib_dirs(toolkit_root()) + _wheel_dirs("lib", sys.path)
        except EnvError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(":".join(map(str, dirs)))
        return 0
    if not args.cmake_args:
        return probe()
    try:
        env = discover(toolkit_root())
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for a in env.cmake_args():
        print(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
