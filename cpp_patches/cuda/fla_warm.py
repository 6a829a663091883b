"""Compile flash-linear-attention's Triton kernels for run_harness.py's FLA timings ahead, in parallel.

    python3 cpp_patches/cuda/fla_warm.py [--jobs N] [--timeout SECONDS]

The first call of FLA's chunk_gated_delta_rule for new head counts or a new dtype autotunes each
of its kernels: every configuration (about 35 over the forward's kernels on a Hopper GPU) is
compiled by Triton, one after another, at one to two seconds each, and timed. run_harness.py
--fla meets six such variants (two Qwen3.5 shapes and its accuracy shape, float32 and bfloat16),
so in one process the compiles alone take minutes of a short device session.

Here each variant runs in its own process, all at once: one call of FLA at the variant's first
length (T does not enter the compiled kernels: FLA marks it do_not_specialize), through
run_harness's own fla_call, so the kernels Triton compiles are those the timed run asks for, and
they land in Triton's on-disk cache (TRITON_CACHE_DIR), which the timed run then reads.
FLA_CACHE_RESULTS=0 keeps the autotuning choices made here, with the other processes sharing the
GPU, out of that cache: the timed run still autotunes, on a quiet GPU, with nothing left to compile.
run_harness.py --fla reports how many kernels it still had to compile (0 when this did its work).

Prints a line per variant and one for the cache; exit status 1 when a variant failed (the timed
run then compiles what is missing itself).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_harness  # noqa: E402


def variants(shapes=run_harness.BENCH_SHAPES, lengths=run_harness.BENCH_T, S=128) -> list[dict]:
    """What run_harness.bench (with these arguments) and fla_accuracy call FLA with: head counts,
    dtype, and the first T (the compiled kernels do not depend on T)."""
    shapes = [dict(name=name, H_k=H_k, H_v=H_v, T=lengths[0], S=S) for name, H_k, H_v in shapes]
    acc = run_harness.FLA_ACCURACY_SHAPE
    shapes.append(dict(name="accuracy", H_k=acc["H_k"], H_v=acc["H_v"], T=acc["T"], S=acc["S"]))
    return [dict(shape, dtype=dtype) for shape in shapes for dtype in run_harness.FLA_DTYPES]


def label(v: dict) -> str:
    return f"{v['name']} (H_k {v['H_k']}, H_v {v['H_v']}) {v['dtype']}"


def spec(v: dict) -> str:
    return f"{v['H_k']}:{v['H_v']}:{v['T']}:{v['S']}:{v['dtype']}"


def warm_one(text: str, device: str) -> None:
    """One variant, in this process: FLA once on inputs of its shape."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla  # noqa: N813

    H_k, H_v, T, S, dtype = text.split(":")
    inputs = run_harness.ref.random_inputs(np.random.default_rng(0), B=1, T=int(T), H_k=int(H_k),
                                           H_v=int(H_v), S=int(S))
    run_harness.fla_call(fla, torch, inputs, getattr(torch, dtype), device=device)()
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=0, help="processes at once (default: one per variant)")
    ap.add_argument("--timeout", type=float, default=540, help="seconds a variant may take")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)   # the tests' stand-in FLA runs on the CPU
    ap.add_argument("--one", help=argparse.SUPPRESS)                       # a worker: H_k:H_v:T:S:dtype
    args = ap.parse_args(argv)
    if args.one:
        warm_one(args.one, args.device)
        return 0

    todo = variants()
    env = dict(os.environ, FLA_CACHE_RESULTS="0", PYTHONUNBUFFERED="1")
    cache = run_harness.triton_cache_dir()
    before = run_harness.triton_kernels()
    t0 = time.monotonic()

    def run(v: dict) -> tuple[dict, int | str, float, str]:
        t = time.monotonic()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", spec(v), "--device", args.device]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                               stdin=subprocess.DEVNULL)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = f"timed out after {args.timeout:.0f} s"
            out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        return v, rc, time.monotonic() - t, out

    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs or len(todo)) as pool:
        for v, rc, secs, out in pool.map(run, todo):
            if rc == 0:
                print(f"warm: {label(v)}: ok in {secs:.1f} s", flush=True)
                continue
            failed += 1
            why = f"exit {rc}" if isinstance(rc, int) else rc
            print(f"warm: {label(v)}: FAILED ({why}) in {secs:.1f} s", flush=True)
            for line in out.strip().splitlines()[-6:]:
                print("   " + line, flush=True)
    after = run_harness.triton_kernels()
    print(f"warm: {len(todo) - failed} of {len(todo)} variants in {time.monotonic() - t0:.1f} s; Triton's cache "
          f"({cache}) went from {before} to {after} compiled kernels", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
