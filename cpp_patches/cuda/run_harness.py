"""Check and time the chunked GATED_DELTA_NET CUDA kernel through its standalone harness.

Runs on a machine with a CUDA GPU and nvcc; the benchmark also needs torch (and FLA for --fla):

    python3 cpp_patches/cuda/run_harness.py [--quick | --no-check] [--bench] [--fla] [--precision] [--json FILE]

1. compiles gdn_harness.cu for this GPU (seconds): gated_delta_net_chunked.cuh, and beside it
   llama.cpp's own token-sequential kernel taken from the tree's ggml-cuda/gated_delta_net.cu
   (--llama; default: build/src/vendor/llama.cpp from `make setup`);
2. correctness: every case of cases.py (the grid the CPU emulator, emulate.py, also runs)
   against the float64 numpy reference (cpp_patches/reference/gated_delta_net.py), outputs
   poisoned with NaN before each run; upstream's kernel on the same inputs as a check that
   both read the buffers alike;
3. --bench: median op time over several runs at Qwen3.5-27B / 35B-A3B shapes, chunked against
   upstream's kernel, and with --fla flash-linear-attention's chunk_gated_delta_rule, all on
   the same inputs in the same run, and the chosen tile's prep kernel and state pass timed
   apart (the state pass also per chunk: the sequential walk), and beside it the VARIANTS
   builds (--variant: 16 warps per block; one TF32 product); then short prompts (T 16..512),
   upstream against chunked, for the dispatcher's threshold (GGML_CUDA_GDN_CHUNK_MIN);
4. --precision: the chunked kernel built a second time with one TF32 product instead of three
   (PRECISION_PROBE, never in ggml), timed beside the float32-accurate one: what accuracy costs.
Prints a table last; --json FILE writes every number.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reference"))
sys.path.insert(0, str(HERE))
import gated_delta_net as ref  # noqa: E402
from cases import TOL_REL_RMS, case_id, correctness_cases, ggml_layout  # noqa: E402
from emulate import inputs_for, quick_cases  # noqa: E402

ROOT = HERE.parent.parent
TREES = [ROOT / "build" / "src" / "vendor" / "llama.cpp"]
GDN_CU = Path("ggml") / "src" / "ggml-cuda" / "gated_delta_net.cu"
# upstream's kernel template: everything from it to its host-side launcher
UPSTREAM_KERNEL = re.compile(
    r"template\s*<\s*int S_v,\s*bool KDA,\s*bool keep_rs_t\s*>.*?(?=template\s*<\s*bool KDA,"
    r"\s*bool keep_rs_t\s*>\s*static void launch_gated_delta_net\b)",
    re.S,
)
# Upstream's kernel is a sequential float32 recurrence. The emulator's token-sequential stand-in
# for it is within 3.4e-7 of the reference on this whole grid (T 8192 included), the pinned CPU
# op within 2e-5 on tests/test_gdn_reference.py's grid; 5x the latter for __expf (a few ulp per
# decay, more near g = -20) and the warp sums' order.
UPSTREAM_TOL_REL_RMS = 1e-4


def llama_tree(given: Path | None = None) -> Path:
    for tree in [given] if given else TREES:
        if (tree / GDN_CU).exists():
            return tree
    raise RuntimeError(
        f"no llama.cpp tree with {GDN_CU} at {given or ' or '.join(map(str, TREES))} (its "
        "token-sequential kernel runs beside the chunked one): run `make setup`"
    )


def upstream_kernel_text(llama: Path) -> str:
    """llama.cpp's gated_delta_net_cuda kernel template from the tree, as a header."""
    src = llama / GDN_CU
    m = UPSTREAM_KERNEL.search(src.read_text())
    if m is None:
        raise RuntimeError(
            f"{src}: no gated_delta_net_cuda kernel before launch_gated_delta_net; this llama.cpp "
            "lays the file out differently: update UPSTREAM_KERNEL in run_harness.py"
        )
    return f"// llama.cpp's token-sequential kernel, from {GDN_CU}\n#pragma once\n\n" + m.group(0)


def write_upstream_kernel(llama: Path, dest_dir: Path) -> Path:
    """dest_dir/gdn_upstream_kernel.cuh: upstream_kernel_text (rewritten only when it changes)."""
    text = upstream_kernel_text(llama)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / "gdn_upstream_kernel.cuh"
    if not dest.exists() or dest.read_text() != text:
        dest.write_text(text)
    return dest


def cublas_include() -> Path | None:
    """Where cublas_v2.h is (ggml-cuda's common.cuh includes it), or None when nvcc finds it:
    the pinned headers of `make cuda-deps`, else those of an installed
    nvidia-cublas wheel (torch's)."""
    import ggml_compile

    if ggml_compile.nvcc_finds_cublas():
        return None
    for inc in (ggml_compile.CUBLAS_INCLUDE,):
        if (inc / "cublas_v2.h").exists():
            return inc
    for d in filter(None, sys.path):  # nvidia/<cu13 or cublas>/include/ of the wheel
        for header in sorted(Path(d).glob("nvidia/*/include/cublas_v2.h")):
            return header.parent
    raise RuntimeError("nvcc finds no cuBLAS headers: run `make cuda-deps`, or install the CUDA toolkit's cuBLAS")


NVCC_FLAGS = ["-O3", "-std=c++17", "-use_fast_math", "-extended-lambda", "-shared", "-Xcompiler", "-fPIC"]
HARNESS_SOURCES = ("gdn_harness.cu", "gdn_driver.h", "gated_delta_net_chunked.cuh")


def nvcc_cmd(out: Path, arch: str, llama: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The harness's compile command (writes the upstream kernel's header beside out); ggml-cuda's
    flags and definitions: -use_fast_math as it builds (expf is __expf there). extra: more macros
    (PRECISION_PROBE for --precision's second build)."""
    from ggml_compile import DEFINES

    inc = write_upstream_kernel(llama, out.parent / f"{out.stem}.include").parent
    cmd = ["nvcc", *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    cmd += [f"-D{d}" for d in (*DEFINES, *extra)]
    cmd += ["-I", str(HERE), "-I", str(inc), "-I", str(llama / "ggml" / "src"), "-I", str(llama / "ggml" / "include")]
    cublas = cublas_include()
    if cublas is not None:
        cmd += ["-I", str(cublas)]
    return cmd + ["-o", str(out), str(HERE / "gdn_harness.cu")]


def harness_key(arch: str, llama: Path, extra: tuple[str, ...] = ()) -> str:
    """What a compiled harness is made of: its sources, upstream's kernel as the tree has it, the
    arch and the flags (file times say nothing once a tree is copied to another machine)."""
    from ggml_compile import DEFINES

    h = hashlib.sha256()
    for name in HARNESS_SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes() + b"\0")
    h.update(upstream_kernel_text(llama).encode() + b"\0")
    h.update(" ".join([arch, *NVCC_FLAGS, *DEFINES, *extra]).encode())
    return h.hexdigest()


def gpu_arch() -> str:
    """This machine's GPU as an nvcc arch (8.9 -> 89, 9.0 -> 90a); 90a when nvidia-smi cannot say."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True
        )
    except FileNotFoundError:  # no driver tools here: compile for the H100 (require_device says the rest)
        return "90a"
    first = r.stdout.split()[0] if r.returncode == 0 and r.stdout.strip() else ""
    cap = first.replace(".", "") if re.fullmatch(r"\d+\.\d+", first) else "90"
    return cap + "a" if cap == "90" else cap


def compile_harness(out: Path, arch: str | None = None, llama: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
    """out, compiled unless out.key shows it was compiled from these very sources (the session's
    later steps, compute-sanitizer's runs, reuse it)."""
    llama = llama_tree(llama)
    arch = arch or gpu_arch()
    key = harness_key(arch, llama, extra)
    stamp = out.with_name(out.name + ".key")
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    stamp.unlink(missing_ok=True)
    t = time.time()
    subprocess.run(nvcc_cmd(out, arch, llama, extra), check=True)
    stamp.write_text(key)
    print(f"compiled harness (sm_{arch}{''.join(' -D' + d for d in extra)}) in {time.time() - t:.1f}s", flush=True)
    return out


def build(out: Path, arch: str | None = None, llama: Path | None = None, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    return bind(ctypes.CDLL(str(compile_harness(out, arch, llama, extra))))


def build_all(
    builds: dict[str, tuple[Path, tuple[str, ...]]],
    arch: str | None = None,
    llama: Path | None = None,
    required: tuple[str, ...] = ("ggml",),
) -> dict[str, ctypes.CDLL]:
    """Several harness builds ({name: (library path, extra macros)}), compiled side by side. A
    build not in `required` that fails is left out with a line saying why (the others are still
    measured); a required one raises."""
    from concurrent.futures import ThreadPoolExecutor

    arch = arch or gpu_arch()
    libs = {}
    with ThreadPoolExecutor(max_workers=max(1, len(builds))) as pool:
        paths = {name: pool.submit(compile_harness, out, arch, llama, extra) for name, (out, extra) in builds.items()}
        for name, f in paths.items():
            try:
                libs[name] = bind(ctypes.CDLL(str(f.result())))
            except (subprocess.CalledProcessError, OSError) as e:
                if name in required:
                    raise
                print(f"harness build {name} left out: {e}", flush=True)
    return libs


# --precision: the chunked kernel built with one TF32 product per product instead of three
PRECISION_PROBE = ("GDN_CHUNKED_1XTF32",)


def warps_build(nw: int) -> tuple[str, ...]:
    """The chunked kernel built with nw warps per block (ggml's build has 8; its tiles split
    over 8 or 16)."""
    return (f"GDN_CHUNKED_NW={nw}",)


# --bench's variants of the chunked kernel, each timed at the chosen tile beside ggml's build:
# name -> (macros, whether its results must be ggml's build's bits, what it answers)
VARIANTS = {
    "nw16": (warps_build(16), True, "16 warps per block instead of 8: more to hide the state pass's latencies"),
    "1xtf32": (PRECISION_PROBE, False, "one TF32 product instead of three: what float32 accuracy costs"),
}


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The harness's entry points with their C types (gdn_harness.cu; the CPU emulator's
    gdn_emu.cpp exports the same ones)."""
    lib.gdn_harness_scratch_floats.restype = ctypes.c_size_t
    lib.gdn_harness_scratch_floats.argtypes = [ctypes.c_int64] * 3
    lib.gdn_harness_chunk_tokens.restype = ctypes.c_int
    lib.gdn_harness_chunk_tokens.argtypes = []
    lib.gdn_harness_warps.restype = ctypes.c_int
    lib.gdn_harness_warps.argtypes = []
    lib.gdn_harness_run.restype = ctypes.c_int
    lib.gdn_harness_run.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 7 + [ctypes.c_int, ctypes.c_void_p]
    lib.gdn_harness_run_stage.restype = ctypes.c_int
    lib.gdn_harness_run_stage.argtypes = (
        [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 7 + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    )
    lib.gdn_harness_run_upstream.restype = ctypes.c_int
    lib.gdn_harness_run_upstream.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    lib.gdn_harness_choose_bv.restype = ctypes.c_int
    lib.gdn_harness_choose_bv.argtypes = [ctypes.c_int64] * 3
    lib.gdn_harness_usable.restype = ctypes.c_int
    lib.gdn_harness_usable.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.gdn_harness_alloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    lib.gdn_harness_free.argtypes = [ctypes.c_void_p]
    lib.gdn_harness_upload.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.gdn_harness_download.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.gdn_harness_fill_nan.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.gdn_harness_error.restype = ctypes.c_char_p
    lib.gdn_harness_error.argtypes = [ctypes.c_int]
    lib.gdn_harness_device_count.argtypes = [ctypes.POINTER(ctypes.c_int)]
    return lib


def require_device(lib) -> None:
    n = ctypes.c_int(0)
    err = lib.gdn_harness_device_count(ctypes.byref(n))
    if err != 0 or n.value < 1:
        raise RuntimeError(
            "no CUDA device here ("
            + (lib.gdn_harness_error(err).decode() if err else "none found")
            + "): run the harness on a machine with an NVIDIA GPU"
        )


class Launch:
    """One kernel call, repeatable, on buffers it holds: the C call gets bare addresses, so the
    tensors (and the host strides array) must live as long as the call can be made."""

    def __init__(self, fn, what: str, buffers: tuple, args: tuple):
        self.fn, self.what, self.buffers, self.args = fn, what, buffers, args

    def __call__(self) -> None:
        err = self.fn(*self.args)
        if err != 0:
            raise RuntimeError(f"{self.what} launch failed: cudaError {err}")


# the harness's stage numbers (gdn_harness_run_stage): each of the chunked path's kernels alone
STAGES = {"prep": 1, "state": 2}


def run_kernel(lib, torch, inputs, *, pad=0, extra=0, bv=0, upstream=False, device="cuda"):
    """Device buffers for one call; returns (go, out (B, T + extra, H, S), state (B, H, S, S)).
    upstream: llama.cpp's token-sequential kernel instead of the chunked one (extra = 0).
    device "cpu": host tensors, for the emulator's harness entry points. The chunked kernel's
    go.stages["prep"] / ["state"] launch one of its two kernels alone on the same buffers (the
    state pass alone reads the scratch an earlier go() or prep left)."""
    B_qk, T, H_k, S = inputs[0].shape
    B, _, H, _ = inputs[2].shape
    *arrays, strides, T_out = ggml_layout(*inputs, pad=pad, extra=extra)
    dev = [torch.from_numpy(x).to(device) for x in arrays]
    out = torch.full((B, T_out, H, S), float("nan"), device=device)
    st = torch.full((B, H, S, S), float("nan"), device=device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else None
    ptrs = tuple(x.data_ptr() for x in dev) + (out.data_ptr(), st.data_ptr())
    if upstream:
        assert T_out == T, "upstream's kernel writes exactly T tokens per sequence"
        go = Launch(
            lib.gdn_harness_run_upstream,
            "upstream kernel",
            (dev, out, st, strides),
            ptrs + (strides.ctypes.data, S, H, H_k, T, B, B // B_qk, stream),
        )
        return go, out, st
    scratch = torch.empty(lib.gdn_harness_scratch_floats(T, H, B), device=device)
    buffers = (dev, out, st, scratch, strides)
    args = ptrs + (scratch.data_ptr(), strides.ctypes.data, S, H, H_k, T, T_out, B, B // B_qk, bv)
    go = Launch(lib.gdn_harness_run, "chunked kernel", buffers, args + (stream,))
    go.stages = {
        name: Launch(lib.gdn_harness_run_stage, f"chunked kernel ({name} alone)", buffers, args + (n, stream))
        for name, n in STAGES.items()
    }
    return go, out, st


class DeviceArrays:
    """Device copies of numpy arrays through the harness's own cudaMalloc / cudaMemcpy."""

    def __init__(self, lib):
        self.lib, self.ptrs = lib, []

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"{what}: {self.lib.gdn_harness_error(err).decode()}")

    def alloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        self._check(self.lib.gdn_harness_alloc(ctypes.byref(p), max(nbytes, 4)), f"cudaMalloc of {nbytes} bytes")
        self.ptrs.append(p.value)
        return p.value

    def upload(self, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x)
        p = self.alloc(x.nbytes)
        self._check(self.lib.gdn_harness_upload(p, x.ctypes.data, x.nbytes), "upload")
        return p

    def nan(self, n_floats: int) -> int:
        p = self.alloc(4 * n_floats)
        self._check(self.lib.gdn_harness_fill_nan(p, 4 * n_floats), "memset")
        return p

    def download(self, p: int, shape) -> np.ndarray:
        out = np.empty(shape, np.float32)
        self._check(self.lib.gdn_harness_download(out.ctypes.data, p, out.nbytes), "download")
        return out

    def free(self) -> None:
        for p in self.ptrs:
            self.lib.gdn_harness_free(p)
        self.ptrs = []


def run_once(lib, inputs, *, pad=0, extra=0, bv=0, upstream=False):
    """One call on fresh device buffers (outputs NaN-filled): (out (B, T + extra, H, S), state).
    upstream: llama.cpp's token-sequential kernel instead of the chunked one (extra = 0)."""
    B_qk, T, H_k, S = inputs[0].shape
    B, _, H, _ = inputs[2].shape
    *arrays, strides, T_out = ggml_layout(*inputs, pad=pad, extra=extra)
    mem = DeviceArrays(lib)
    try:
        ins = [mem.upload(x) for x in arrays]
        out, st = mem.nan(B * T_out * H * S), mem.nan(B * H * S * S)
        if upstream:
            assert T_out == T, "upstream's kernel writes exactly T tokens per sequence"
            err = lib.gdn_harness_run_upstream(*ins, out, st, strides.ctypes.data, S, H, H_k, T, B, B // B_qk, None)
        else:
            scratch = mem.nan(lib.gdn_harness_scratch_floats(T, H, B))
            err = lib.gdn_harness_run(
                *ins, out, st, scratch, strides.ctypes.data, S, H, H_k, T, T_out, B, B // B_qk, bv, None
            )
        mem._check(err, "kernel launch")
        mem._check(lib.gdn_harness_sync(), "kernel run")
        return mem.download(out, (B, T_out, H, S)), mem.download(st, (B, H, S, S))
    finally:
        mem.free()


def refused(lib, inputs, *, bv=0) -> bool:
    """A launch this GPU cannot hold returns an error (and leaves none behind) instead of running."""
    try:
        run_once(lib, inputs, bv=bv)
    except RuntimeError:
        return lib.gdn_harness_last_error() == 0 and lib.gdn_harness_sync() == 0
    return False


def correctness(lib, cases) -> list[dict]:
    """Every case against the reference; a case this GPU cannot run (usable(): S_v 128 on a
    99 KiB GeForce card, a forced 64-column tile on an A100) is not run but must be refused."""
    rows = []
    for c in cases:
        inputs = inputs_for(c)
        if not lib.gdn_harness_usable(c["S"], c["bv"]):
            row = dict(c, not_on_this_gpu=True, launch_refused=refused(lib, inputs, bv=c["bv"]))
            row["ok"] = row["launch_refused"]
            rows.append(row)
            print(
                ("--  " if row["ok"] else "FAIL")
                + f" {case_id(c):42s} not for this GPU"
                + ("; launch refused" if row["ok"] else "; the launch did not refuse it!"),
                flush=True,
            )
            continue
        o, s = run_once(lib, inputs, pad=c["pad"], extra=c["extra"], bv=c["bv"])
        T = c["T"]
        o_ref, s_ref = ref.recurrent(*inputs) if T <= 1000 else ref.chunked(*inputs)
        row = dict(
            c,
            nan=bool(np.isnan(o[:, :T]).any() or np.isnan(s).any()),
            tail_untouched=bool(np.isnan(o[:, T:]).all()),
            err_out=ref.rel_rms(o[:, :T], o_ref),
            err_state=ref.rel_rms(s, s_ref[0]),
        )
        row["ok"] = (
            not row["nan"]
            and row["tail_untouched"]
            and row["err_out"] <= TOL_REL_RMS
            and row["err_state"] <= TOL_REL_RMS
        )
        note = ""
        if c["extra"] == 0:  # upstream's kernel on the same buffers: both read the layout alike
            uo, us = run_once(lib, inputs, pad=c["pad"], upstream=True)
            row["upstream_err_out"], row["upstream_err_state"] = ref.rel_rms(uo, o_ref), ref.rel_rms(us, s_ref[0])
            row["upstream_ok"] = max(row["upstream_err_out"], row["upstream_err_state"]) <= UPSTREAM_TOL_REL_RMS
            note = f"  upstream {row['upstream_err_out']:.1e}" + ("" if row["upstream_ok"] else " UPSTREAM DISAGREES")
        rows.append(row)
        print(
            ("ok  " if row["ok"] else "FAIL") + f" {case_id(c):42s} out {row['err_out']:.2e} "
            f"state {row['err_state']:.2e}"
            + (" NaN!" if row["nan"] else "")
            + ("" if row["tail_untouched"] else " tail written!")
            + note,
            flush=True,
        )
    return rows


def median_ms(torch, fn, reps=20, warmup=3, device="cuda") -> float:
    """Median time of fn over reps runs after warmup: CUDA events on the GPU, the wall clock on
    the CPU (the emulator)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device != "cuda":
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def rel_rms_torch(torch, x, ref_x) -> float:
    """Relative RMS difference of two device tensors, in float64 on the device."""
    x, ref_x = x.double(), ref_x.double()
    return float(torch.linalg.vector_norm(x - ref_x) / torch.linalg.vector_norm(ref_x))


def fla_call(fla, torch, inputs, dtype, device="cuda"):
    """flash-linear-attention's chunk_gated_delta_rule on the reference's inputs: native grouped
    value heads (it reads key head h // (H_v / H_k) for value head h, where ggml tiles h % H_k:
    the same work, another pairing) and the state in ggml's [V, K] order (state_v_first)."""
    q, k, v, g, beta, s0 = (torch.from_numpy(np.ascontiguousarray(x)).to(device) for x in inputs)
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    S = q.shape[-1]
    return lambda: fla(
        qd,
        kd,
        vd,
        g[..., 0],
        beta[..., 0],
        scale=S**-0.5,
        initial_state=s0,
        output_final_state=True,
        state_v_first=True,
    )


def fla_accuracy(fla, torch, device="cuda") -> dict:
    """FLA's error against the float64 reference (H_v = H_k, where the head pairings agree), with
    float32 and bfloat16 inputs, on i.i.d. gates and with a strong forget gate early in each chunk
    (cases.py's spike): the accuracy its timings come with."""
    row = {}
    for label, spike in (("", 0), ("_spike", 300)):
        inputs = inputs_for(dict(FLA_ACCURACY_SHAPE, B=1, B_qk=1, g_scale=0.05 if spike else 1.0, spike=spike))
        o_ref, s_ref = ref.recurrent(*inputs)
        for dt in (getattr(torch, name) for name in FLA_DTYPES):
            o, st = fla_call(fla, torch, inputs, dt, device)()
            name = str(dt).split(".")[-1] + label
            row[f"fla_{name}_err_out"] = ref.rel_rms(o.float().cpu().numpy(), o_ref)
            row[f"fla_{name}_err_state"] = ref.rel_rms(st.float().cpu().numpy(), s_ref[0])
    print(json.dumps(row), flush=True)
    return row


# Qwen3.5's Gated DeltaNet layers (S = 128): (name, H_k, H_v)
BENCH_SHAPES = (("27B", 16, 48), ("35B-A3B", 16, 32))
BENCH_T = (512, 2048, 8192, 32768)
# FLA is timed with float32 and bfloat16 q/k/v; its accuracy is checked on this shape
FLA_DTYPES = ("float32", "bfloat16")
FLA_ACCURACY_SHAPE = dict(S=128, T=1000, H_k=4, H_v=4)


def triton_kernels() -> int:
    """How many compiled kernels Triton's on-disk cache holds (a first FLA call for new shapes fills it)."""
    return sum(1 for _ in triton_cache_dir().rglob("*.cubin"))  # rglob of a missing folder yields nothing


def triton_cache_dir() -> Path:
    """Triton's on-disk cache, as Triton itself chooses it (TRITON_CACHE_DIR, else under TRITON_HOME or ~)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME") or Path.home()) / ".triton" / "cache"


# short prompts, for the dispatcher's threshold (GGML_CUDA_GDN_CHUNK_MIN)
SWEEP_T = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bench(
    lib,
    torch,
    with_fla: bool,
    *,
    shapes=BENCH_SHAPES,
    lengths=BENCH_T,
    sweep=SWEEP_T,
    S=128,
    reps=20,
    sweep_reps=50,
    device="cuda",
    variants=None,
) -> dict:
    """Op times on the same inputs: upstream's kernel, the chunked one (both tiles; the launch's
    choice is chunked_ms, with its two kernels timed apart) and FLA (float32 and bfloat16
    inputs); then the threshold sweep. variants: {name of VARIANTS: its harness build}, each
    timed at the chosen tile beside ggml's build (variant_times)."""
    rng = np.random.default_rng(7)
    fla = None
    result = {"rows": []}
    if with_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla

        kernels_before = triton_kernels()
    for name, H_k, H_v in shapes:
        for T in lengths:
            inputs = ref.random_inputs(rng, B=1, T=T, H_k=H_k, H_v=H_v, S=S)
            row = dict(shape=name, T=T, H_k=H_k, H_v=H_v, bv_chosen=lib.gdn_harness_choose_bv(S, H_v, 1))
            go, up_out, up_st = run_kernel(lib, torch, inputs, upstream=True, device=device)
            row["upstream_ms"] = median_ms(torch, go, reps, device=device)
            for bv in (32, 64):  # both tiles, to check the choice
                if not lib.gdn_harness_usable(S, bv):
                    row[f"chunked_bv{bv}_ms"] = None  # this GPU cannot hold the tile
                    continue
                go, out, st = run_kernel(lib, torch, inputs, bv=bv, device=device)
                row[f"chunked_bv{bv}_ms"] = median_ms(torch, go, reps, device=device)
                # the timed kernels' own results, chunked against upstream's
                row[f"chunked_bv{bv}_vs_upstream_out"] = rel_rms_torch(torch, out, up_out)
                row[f"chunked_bv{bv}_vs_upstream_state"] = rel_rms_torch(torch, st, up_st)
                if bv == row["bv_chosen"]:
                    n_chunks = -(-T // lib.gdn_harness_chunk_tokens())
                    row.update(stage_times(torch, go, out, st, n_chunks, reps, device))
                    for vname, vlib in (variants or {}).items():
                        try:  # a variant that cannot run here is noted; the row is still measured
                            row.update(
                                variant_times(
                                    vname, vlib, torch, inputs, bv, out, st, up_out, up_st, n_chunks, reps, device
                                )
                            )
                        except RuntimeError as e:
                            row[f"{vname}_error"] = str(e)[:200]
                del out, st
            row["chunked_ms"] = row[f"chunked_bv{row['bv_chosen']}_ms"]
            if row["chunked_ms"]:
                row["speedup_vs_upstream"] = row["upstream_ms"] / row["chunked_ms"]
            del go, up_out, up_st
            if fla is not None:
                for dt in (getattr(torch, name) for name in FLA_DTYPES):
                    key = "fla_" + str(dt).split(".")[-1] + "_ms"
                    try:
                        row[key] = median_ms(torch, fla_call(fla, torch, inputs, dt, device), reps, device=device)
                    except Exception as e:
                        row[key.replace("_ms", "_error")] = f"{type(e).__name__}: {e}"[:200]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if fla is not None:  # after the timings: its own compiles (other head counts) come last
        # Triton compiles each of FLA's kernels once per autotuning configuration, head counts and
        # dtype (~1-2 s each) the first time a shape is met: 0 here means an earlier run compiled them
        result["fla_kernels_compiled_while_timed"] = triton_kernels() - kernels_before
        print(
            json.dumps(
                {
                    "fla_kernels_compiled_while_timed": result["fla_kernels_compiled_while_timed"],
                    "triton_cache": str(triton_cache_dir()),
                }
            ),
            flush=True,
        )
        result["fla_accuracy"] = fla_accuracy(fla, torch, device)
    if sweep and lib.gdn_harness_usable(S, 0):
        result["threshold"] = threshold_sweep(lib, torch, shapes, sweep, S, sweep_reps, device)
    return result


def variant_times(name, vlib, torch, inputs, bv, out, st, up_out, up_st, n_chunks, reps, device) -> dict:
    """A variant build (VARIANTS[name]) at tile bv on the same inputs, as {name}_*: its time, its
    two kernels apart, its warps per block, whether it gives ggml's build's results (out, st)
    bit for bit, and its difference from upstream's kernel (up_out, up_st)."""
    go, v_out, v_st = run_kernel(vlib, torch, inputs, bv=bv, device=device)
    row = {
        "ms": median_ms(torch, go, reps, device=device),
        "warps": vlib.gdn_harness_warps(),
        "same_bits": bool(torch.equal(v_out, out) and torch.equal(v_st, st)),
        "vs_upstream_out": rel_rms_torch(torch, v_out, up_out),
        "vs_upstream_state": rel_rms_torch(torch, v_st, up_st),
    }
    row.update(stage_times(torch, go, v_out, v_st, n_chunks, reps, device))
    return {f"{name}_{k}": v for k, v in row.items()}


def stage_times(torch, go, out, st, n_chunks, reps, device) -> dict:
    """The chunked path's two kernels timed apart, after go() has run on these buffers: the prep
    kernel (every chunk at once) and the state pass (the chunks one after another, per value
    tile and head), with the state pass's time per chunk; and whether the state pass alone, on
    the scratch the prep kernel left, gave the whole launch's bits (it must: the same kernel on
    the same inputs)."""
    full_out, full_st = out.clone(), st.clone()
    out.fill_(float("nan"))
    st.fill_(float("nan"))
    prep_ms = median_ms(torch, go.stages["prep"], reps, device=device)
    state_ms = median_ms(torch, go.stages["state"], reps, device=device)
    same = bool(torch.equal(out, full_out) and torch.equal(st, full_st))
    return {
        "prep_ms": prep_ms,
        "state_ms": state_ms,
        "state_us_per_chunk": 1e3 * state_ms / n_chunks,
        "stages_reproduce_launch": same,
    }


def threshold_sweep(lib, torch, shapes, lengths, S, reps, device) -> dict:
    """Upstream's kernel against the chunked one on short prompts, per shape: the times, and
    the shortest T from which the chunked path was faster at every longer T measured (None:
    not within the sweep). The dispatcher's GGML_CUDA_GDN_CHUNK_MIN comes from these."""
    rng = np.random.default_rng(11)
    result = {}
    for name, H_k, H_v in shapes:
        rows = []
        for T in lengths:
            inputs = ref.random_inputs(rng, B=1, T=T, H_k=H_k, H_v=H_v, S=S)
            go_up, *_ = run_kernel(lib, torch, inputs, upstream=True, device=device)
            go_ch, *_ = run_kernel(lib, torch, inputs, device=device)
            rows.append(
                dict(
                    T=T,
                    upstream_ms=median_ms(torch, go_up, reps, device=device),
                    chunked_ms=median_ms(torch, go_ch, reps, device=device),
                )
            )
        faster = [r["chunked_ms"] < r["upstream_ms"] for r in rows]
        from_T = next((r["T"] for i, r in enumerate(rows) if all(faster[i:])), None)
        result[name] = {"rows": rows, "chunked_faster_from": from_T}
        print(json.dumps({"threshold": name, **result[name]}), flush=True)
    return result


def precision_probe(
    lib,
    lib_1x,
    torch,
    *,
    shapes=BENCH_SHAPES,
    lengths=BENCH_T,
    S=128,
    reps=20,
    accuracy=FLA_ACCURACY_SHAPE,
    device="cuda",
) -> dict:
    """What float32 accuracy costs: the chunked kernel as ggml runs it (3xTF32 products) against
    the same kernel built with PRECISION_PROBE (one TF32 product each, ~5e-4 relative error in
    the emulator; never in ggml), timed on the same inputs at the bench shapes, each with its
    difference from upstream's kernel; then both against the float64 reference on `accuracy`.
    The time ratio says how much of the kernel's time the extra tensor-core products take."""
    rng = np.random.default_rng(7)
    builds = (("3xtf32", lib), ("1xtf32", lib_1x))
    result = {"rows": []}
    for name, H_k, H_v in shapes:
        for T in lengths:
            inputs = ref.random_inputs(rng, B=1, T=T, H_k=H_k, H_v=H_v, S=S)
            row = dict(shape=name, T=T, H_k=H_k, H_v=H_v)
            go, up_out, up_st = run_kernel(lib, torch, inputs, upstream=True, device=device)
            go()
            for label, build_lib in builds:
                go, out, st = run_kernel(build_lib, torch, inputs, device=device)
                row[f"{label}_ms"] = median_ms(torch, go, reps, device=device)
                row[f"{label}_vs_upstream_out"] = rel_rms_torch(torch, out, up_out)
                row[f"{label}_vs_upstream_state"] = rel_rms_torch(torch, st, up_st)
                del out, st
            row["time_1x_over_3x"] = row["1xtf32_ms"] / row["3xtf32_ms"]
            del go, up_out, up_st
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    inputs = inputs_for(dict(accuracy, B=1, B_qk=1, g_scale=1.0, spike=0))
    o_ref, s_ref = ref.recurrent(*inputs)
    acc = dict(accuracy)
    for label, build_lib in builds:
        go, out, st = run_kernel(build_lib, torch, inputs, device=device)
        go()
        acc[f"{label}_err_out"] = ref.rel_rms(out.cpu().numpy()[:, : accuracy["T"]], o_ref)
        acc[f"{label}_err_state"] = ref.rel_rms(st.cpu().numpy(), s_ref[0])
    result["reference"] = acc
    print(json.dumps({"precision_reference": acc}), flush=True)
    return result


def print_precision(probe: dict) -> None:
    for r in probe.get("rows", []):
        print(
            f"{r['shape']:8s} T={r['T']:6d} chunked 3xTF32 {r['3xtf32_ms']:.3f} ms, 1xTF32 {r['1xtf32_ms']:.3f} ms "
            f"({r['time_1x_over_3x']:.2f} of the time); vs upstream's kernel: 3xTF32 "
            f"{r['3xtf32_vs_upstream_out']:.1e}, 1xTF32 {r['1xtf32_vs_upstream_out']:.1e}"
        )
    a = probe.get("reference")
    if a:
        print(
            f"vs the float64 reference (T {a['T']}, H_k {a['H_k']}, H_v {a['H_v']}, S {a['S']}): 3xTF32 out "
            f"{a['3xtf32_err_out']:.1e} state {a['3xtf32_err_state']:.1e}; 1xTF32 out {a['1xtf32_err_out']:.1e} "
            f"state {a['1xtf32_err_state']:.1e}"
        )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the emulator's quick cases (for compute-sanitizer)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness grid")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--fla", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="with --bench: no short-prompt threshold sweep")
    ap.add_argument(
        "--precision",
        action="store_true",
        help="also time the chunked kernel with one TF32 product instead of three (what float32 costs)",
    )
    ap.add_argument(
        "--variant",
        nargs="*",
        choices=sorted(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help="with --bench: time these builds of the chunked kernel beside ggml's at the chosen tile: "
        + "; ".join(f"{n}: {d}" for n, (_, _, d) in VARIANTS.items())
        + " (default: all; none: --variant alone)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--lib", type=Path, default=Path("/tmp/libgdn_harness.so"))
    ap.add_argument("--arch", help="nvcc arch (default: this GPU's, e.g. 90a)")
    ap.add_argument(
        "--llama",
        type=Path,
        help="llama.cpp tree for upstream's kernel (default: "
        + " or ".join(str(t.relative_to(ROOT)) for t in TREES)
        + ")",
    )
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    variant = lambda tag: args.lib.with_name(f"{args.lib.stem}-{tag}{args.lib.suffix}")
    builds = {"ggml": (args.lib, ())}
    wanted = (args.variant if args.bench else []) + (["1xtf32"] if args.precision else [])
    builds.update({name: (variant(name), VARIANTS[name][0]) for name in wanted})
    # --bench's variants are extras (left out if they fail to build); --precision's is the point
    libs = build_all(builds, args.arch, args.llama, required=("ggml",) + (("1xtf32",) if args.precision else ()))
    lib = libs["ggml"]
    require_device(lib)
    cases = [] if args.no_check else quick_cases() if args.quick else correctness_cases(long=True)
    result = {"correctness": correctness(lib, cases)}
    if args.bench:
        import torch

        print(torch.cuda.get_device_name(0), flush=True)
        variants = {name: libs[name] for name in args.variant if name in libs}
        result["bench"] = bench(lib, torch, args.fla, sweep=() if args.no_sweep else SWEEP_T, variants=variants)
    if args.precision:
        import torch

        result["precision"] = precision_probe(lib, libs["1xtf32"], torch)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    bad = [r for r in result["correctness"] if not r["ok"]]
    ran = [r for r in result["correctness"] if not r.get("not_on_this_gpu")]
    print(
        f"correctness: {len(ran) - sum(not r['ok'] for r in ran)} passed, {len(bad)} failed, "
        f"{len(result['correctness']) - len(ran)} not for this GPU"
    )
    up = [r for r in ran if "upstream_ok" in r]
    up_bad = [r for r in up if not r["upstream_ok"]]
    if up:
        print(
            f"upstream kernel on the same buffers: {len(up) - len(up_bad)} of {len(up)} within "
            f"{UPSTREAM_TOL_REL_RMS:g} of the reference"
        )
    print_bench(result.get("bench", {}))
    print_precision(result.get("precision", {}))
    return 1 if bad or up_bad else 0


def print_bench(bench_result: dict) -> None:
    """The table: each time with its ratio to the chunked kernel's (above 1: the chunked one is faster)."""

    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    for r in bench_result.get("rows", []):
        extra = "".join(
            f"  {k[:-3]} {v:.3f} ms" + (f" ({v / r['chunked_ms']:.2f}x)" if r["chunked_ms"] else "")
            for k, v in r.items()
            if k.startswith("fla") and k.endswith("_ms")
        )
        speedup = f" ({r['speedup_vs_upstream']:.2f}x)" if r.get("speedup_vs_upstream") else ""
        stages = (
            f"; prep {ms(r['prep_ms'])} + state {ms(r['state_ms'])} ms, {r['state_us_per_chunk']:.1f} us/chunk"
            if "prep_ms" in r
            else ""
        )
        for name, (_, same, _) in VARIANTS.items():
            if f"{name}_ms" in r:
                v = {k[len(name) + 1 :]: x for k, x in r.items() if k.startswith(name + "_")}
                bits = (
                    ("same bits" if v["same_bits"] else "NOT the same bits")
                    if same
                    else f"{v['vs_upstream_out']:.1e} from upstream"
                )
                stages += f"; {name} {ms(v['ms'])} ms (prep {ms(v['prep_ms'])} + state {ms(v['state_ms'])}, {bits})"
            elif f"{name}_error" in r:
                stages += f"; {name} failed: {r[name + '_error']}"
        print(
            f"{r['shape']:8s} T={r['T']:6d} upstream {ms(r['upstream_ms'])} ms  chunked {ms(r['chunked_ms'])} ms"
            f"{speedup} (BV {r['bv_chosen']}; 32: {ms(r['chunked_bv32_ms'])}, 64: {ms(r['chunked_bv64_ms'])}"
            f"{stages}){extra}"
        )
    if "fla_kernels_compiled_while_timed" in bench_result:
        print(
            f"FLA: {bench_result['fla_kernels_compiled_while_timed']} Triton kernels compiled during its timings "
            "(0: all were compiled by an earlier run)"
        )
    for name, t in bench_result.get("threshold", {}).items():
        times = ", ".join(f"{r['T']}: {r['upstream_ms'] / r['chunked_ms']:.2f}x" for r in t["rows"])
        print(f"{name:8s} chunked faster from T = {t['chunked_faster_from']} (upstream / chunked: {times})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.CalledProcessError) as e:  # CUDA errors, nvcc failures
        sys.exit(f"error: {e}")
