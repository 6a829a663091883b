"""Run the chunked GATED_DELTA_NET CUDA kernels on the CPU and check them.

gated_delta_net_chunked.cuh compiles as plain C++ with simt_emu.h (one fiber per CUDA thread,
warp-collective mma.sync / shuffles evaluated in the PTX fragment layouts, NaN-filled shared
memory, guard pages after every buffer, reorderable thread schedules and cp.async timing), so
the kernels' indexing, fragment layouts, barriers, copies and chunk carry are tested here without
a GPU. Speed is not; that needs run_harness.py on a GPU.

    python3 cpp_patches/cuda/emulate.py [--long | --quick] [--orders] [--json FILE]

prints every case of cases.py with its error against the float64 numpy reference and exits
non-zero if one fails. tests/test_gdn_cuda_emulated.py runs the same checks under pytest.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent / "reference"))
sys.path.insert(0, str(HERE))
import gated_delta_net as ref  # noqa: E402
from cases import TOL_REL_RMS, case_id, correctness_cases, ggml_layout  # noqa: E402

SOURCES = ("gdn_emu.cpp", "gdn_driver.h", "simt_emu.h", "gated_delta_net_chunked.cuh")
ORDERS = {"lockstep": 0, "lockstep-reverse": 1, "warp-serial": 2, "warp-serial-reverse": 3, "shuffled": 7}
# (thread schedule, cp.async copies land at issue) pairs the race check compares
SCHEDULES = [
    ("lockstep", False),
    ("lockstep-reverse", True),
    ("warp-serial", True),
    ("warp-serial-reverse", False),
    ("shuffled", True),
]


def compile_cmd(out: Path, source_dir: Path = HERE, defines: tuple[str, ...] = ()) -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    return [
        cxx,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-DGDN_CHUNKED_EMULATE",
        *(f"-D{d}" for d in defines),
        "-I",
        str(source_dir),
        "-o",
        str(out),
        str(source_dir / "gdn_emu.cpp"),
    ]


def build(source_dir: Path = HERE, cache: Path = ROOT / "build" / "simt", defines: tuple[str, ...] = ()) -> Path:
    """Compiles the emulated kernels (a few seconds) unless this exact source is built already
    (defines: extra macros, e.g. GDN_CHUNKED_1XTF32 for run_harness.py's precision probe)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((source_dir / name).read_bytes())
    h.update(" ".join(defines).encode())
    out = cache / f"libgdn_emu-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run(compile_cmd(tmp, source_dir, defines), capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling the emulated kernels failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, out)
    return out


class Emulator:
    """The kernels of one build, called like the GPU harness but on numpy arrays."""

    def __init__(self, lib: Path):
        self.lib = ctypes.CDLL(str(lib))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self.lib.gdn_emu_run.argtypes = [p] * 10 + [i64] * 7 + [ctypes.c_int] * 4
        self.lib.gdn_emu_run.restype = ctypes.c_int
        self.lib.gdn_emu_choose_bv.argtypes = [i64] * 3 + [ctypes.c_int] * 3
        self.lib.gdn_emu_choose_bv.restype = ctypes.c_int
        self.lib.gdn_emu_set_device.argtypes = [ctypes.c_int] * 3
        self.lib.gdn_emu_set_device.restype = None
        self.lib.gdn_emu_reset_device.restype = None
        self.lib.gdn_emu_usable.argtypes = [i64, ctypes.c_int, i64]
        self.lib.gdn_emu_usable.restype = ctypes.c_int

    def set_device(self, *, n_sm: int, smem_optin: int, smem_per_sm: int) -> None:
        """Later runs emulate a device with these limits (reset_device: back to the H100)."""
        self.lib.gdn_emu_set_device(n_sm, smem_optin, smem_per_sm)

    def reset_device(self) -> None:
        self.lib.gdn_emu_reset_device()

    def usable(self, S: int, cc: int, smem_optin: int) -> bool:
        """The header's usable(): ggml takes the chunked path for S on this device."""
        return bool(self.lib.gdn_emu_usable(S, cc, smem_optin))

    def choose_bv(self, S: int, H: int, B: int, *, n_sm: int, smem_optin: int, smem_per_sm: int) -> int:
        """The value-column tile the launch picks on a device with these limits."""
        return self.lib.gdn_emu_choose_bv(S, H, B, n_sm, smem_optin, smem_per_sm)

    def run(
        self,
        q,
        k,
        v,
        g,
        beta,
        state,
        *,
        extra: int = 0,
        pad: int = 0,
        order: int = 0,
        fast_math: bool = True,
        bv: int = 0,
        async_early: bool = False,
    ):
        """Runs the op on the reference's layouts (reference/gated_delta_net.py), laid out by
        cases.ggml_layout (``pad``: strided rows with NaN padding; ``extra``: output tokens past
        T that must stay unwritten). ``order``: the thread schedule (ORDERS); ``bv``: value
        columns per state-pass block (0: the launch's choice on an emulated H100);
        ``async_early``: cp.async copies land at issue, not at the wait. Returns (out
        (B, T + extra, H, S), final state (B, H, S, S))."""
        B_qk, T, H_k, S = q.shape
        B, _, H, _ = v.shape
        qw, kw, vw, g, beta, state, strides, T_out = ggml_layout(q, k, v, g, beta, state, pad=pad, extra=extra)
        out = np.empty(B * T_out * H * S, np.float32)
        state_out = np.empty(state.size, np.float32)
        sizes = np.array([qw.size, vw.size, g.size, state.size, out.size], np.int64)
        ptrs = [x.ctypes.data for x in (qw, kw, vw, g, beta, state, out, state_out, sizes, strides)]
        err = self.lib.gdn_emu_run(
            *ptrs, S, H, H_k, T, T_out, B, B // B_qk, order, int(fast_math), bv, int(async_early)
        )
        if err != 0:
            raise RuntimeError(f"kernel launch failed: cudaError {err}")
        return out.reshape(B, T_out, H, S), state_out.reshape(state.shape)


def inputs_for(case: dict, seed: int = 1234):
    """The reference's random inputs for a case of cases.py (seeded by the case)."""
    rng = np.random.default_rng([seed, case["S"], case["T"], case["H_v"], case["B"], int(case["g_scale"] * 1e4)])
    q, k, v, g, beta, state = ref.random_inputs(
        rng,
        B=case["B"],
        B_qk=case["B_qk"],
        T=case["T"],
        H_k=case["H_k"],
        H_v=case["H_v"],
        S=case["S"],
        g_scale=case["g_scale"],
    )
    if case.get("spike"):
        g[:, 2::64] = -case["spike"]
    return q, k, v, g, beta, state


def check(emu: Emulator, case: dict, *, fast_math: bool = True, order: int = 0) -> dict:
    """One case against the float64 reference: errors, NaNs, the untouched tail."""
    x = inputs_for(case)
    t = time.time()
    out, st = emu.run(*x, extra=case["extra"], pad=case["pad"], order=order, fast_math=fast_math, bv=case["bv"])
    secs = time.time() - t
    T = case["T"]
    o_ref, s_ref = ref.recurrent(*x) if T <= 1000 else ref.chunked(*x)
    head = out[:, :T]
    row = dict(
        case,
        fast_math=fast_math,
        order=order,
        seconds=round(secs, 2),
        nan=bool(np.isnan(head).any() or np.isnan(st).any()),
        tail_untouched=bool(np.isnan(out[:, T:]).all()),
        err_out=ref.rel_rms(head, o_ref),
        err_state=ref.rel_rms(st, s_ref[0]),
    )
    row["ok"] = (
        not row["nan"] and row["tail_untouched"] and row["err_out"] <= TOL_REL_RMS and row["err_state"] <= TOL_REL_RMS
    )
    return row


def orders_agree(emu: Emulator, case: dict) -> bool:
    """Same bits under every thread schedule (ORDERS) and with cp.async copies landing at issue
    or at the wait: no data race between barriers, no copy into a buffer still being read."""
    x = inputs_for(case)
    runs = [
        emu.run(*x, extra=case["extra"], pad=case["pad"], order=ORDERS[o], bv=case["bv"], async_early=early)
        for o, early in SCHEDULES
    ]
    return all(np.array_equal(runs[0][i], r[i], equal_nan=True) for r in runs[1:] for i in (0, 1))


def quick_cases() -> list[dict]:
    """Small multi-chunk, multi-sequence cases (S 64 and 128, BV 32 and 64, a forget-gate spike)
    for fast checks."""
    by_id = {case_id(c): c for c in correctness_cases(long=False)}
    return [
        by_id["S64-T130-Hk2-Hv4-B2-Bqk2-g1-extra4"],
        by_id["S128-T130-Hk2-Hv4-B2-Bqk1-g1-pad24"],
        by_id["S128-T130-Hk2-Hv4-B2-Bqk2-g1-extra4-bv64"],
        by_id["S64-T130-Hk2-Hv4-B2-Bqk2-g0.05-spike3000"],
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", action="store_true", help="include T = 8192 (about 15 s more)")
    ap.add_argument("--quick", action="store_true", help="only four small cases (S 64 and 128, both tiles, a spike)")
    ap.add_argument(
        "--orders",
        action="store_true",
        help="also run the quick cases under other thread schedules and cp.async timings (race check)",
    )
    ap.add_argument("--exact-exp", action="store_true", help="libm expf instead of the fast-math __expf model")
    ap.add_argument("--source-dir", type=Path, default=HERE, help="directory holding the kernel sources")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failing check")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="MACRO[=VALUE]",
        help="compile the kernels with this macro too (e.g. GDN_CHUNKED_NW=16); repeatable",
    )
    args = ap.parse_args()
    src = args.source_dir.resolve()
    missing = [name for name in SOURCES if not (src / name).exists()]
    if missing:
        sys.exit(f"error: {src} lacks {', '.join(missing)}; point --source-dir at a copy of cpp_patches/cuda")
    try:
        emu = Emulator(build(src, ROOT / "build" / "simt" if src == HERE else src, tuple(args.define)))
    except RuntimeError as e:  # the compiler's output, then one line
        sys.exit(f"error: {e}")
    rows = []
    todo = quick_cases() if args.quick else correctness_cases(long=args.long)
    for c in todo:
        r = check(emu, c, fast_math=not args.exact_exp)
        rows.append(r)
        print(
            ("ok  " if r["ok"] else "FAIL") + f" {case_id(c):42s} out {r['err_out']:.2e}  state {r['err_state']:.2e}"
            f"  {r['seconds']:.2f}s"
            + ("  NaN!" if r["nan"] else "")
            + ("" if r["tail_untouched"] else "  tail written!"),
            flush=True,
        )
        if args.fail_fast and not r["ok"]:
            return 1
    if args.orders:
        for c in quick_cases():
            agree = orders_agree(emu, c)
            rows.append(dict(c, check="orders", orders_agree=agree, ok=agree))
            print(
                ("ok  " if agree else "FAIL")
                + f" {case_id(c):42s} "
                + (
                    "same bits under every thread schedule and cp.async timing"
                    if agree
                    else "thread schedules disagree (a data race)"
                ),
                flush=True,
            )
            if args.fail_fast and not agree:
                return 1
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - bad} passed, {bad} failed (relative RMS bound {TOL_REL_RMS:g})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
