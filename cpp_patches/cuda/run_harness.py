"""Check and time the chunked GATED_DELTA_NET CUDA kernel through its standalone harness.

Runs on a machine with a CUDA GPU, torch and nvcc (the device machine):

    python3 cpp_patches/cuda/run_harness.py [--bench] [--fla]

1. compiles gdn_harness.cu with gated_delta_net_chunked.cuh for sm_90a (seconds);
2. correctness: every case of the issue's grid against the float64 numpy reference
   (cpp_patches/reference/gated_delta_net.py), outputs poisoned with NaN before each run;
3. --bench: median op time over several runs at Qwen3.5-27B / 35B-A3B shapes, and with --fla
   flash-linear-attention's chunk_gated_delta_rule on the same shapes in the same run.
Prints a table last; --json FILE writes every number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reference"))
import gated_delta_net as ref  # noqa: E402

# Relative RMS error bound against the float64 reference. 3xTF32 products carry ~fp32 accuracy;
# what remains is float32 storage of the inputs and the chunk-to-chunk state carry.
TOL_REL_RMS = 1e-5


def nvcc_cmd(out: Path, arch: str = "90a") -> list[str]:
    return ["nvcc", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-shared",
            "-Xcompiler", "-fPIC", "-I", str(HERE), "-o", str(out), str(HERE / "gdn_harness.cu")]


def build(out: Path) -> ctypes.CDLL:
    cmd = nvcc_cmd(out)
    t = time.time()
    subprocess.run(cmd, check=True)
    print(f"compiled harness in {time.time() - t:.1f}s", flush=True)
    lib = ctypes.CDLL(str(out))
    lib.gdn_harness_scratch_floats.restype = ctypes.c_size_t
    lib.gdn_harness_scratch_floats.argtypes = [ctypes.c_int64] * 3
    lib.gdn_harness_run.restype = ctypes.c_int
    lib.gdn_harness_run.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    return lib


def run_kernel(lib, torch, inputs, S, H, H_k, T, B, B_qk):
    dev = [torch.from_numpy(np.ascontiguousarray(x)).cuda() for x in inputs]
    out = torch.full((B, T, H, S), float("nan"), device="cuda")
    st = torch.full((B, H, S, S), float("nan"), device="cuda")
    scratch = torch.empty(lib.gdn_harness_scratch_floats(T, H, B), device="cuda")
    args = [x.data_ptr() for x in dev] + [out.data_ptr(), st.data_ptr(), scratch.data_ptr()]
    stream = torch.cuda.current_stream().cuda_stream

    def go():
        err = lib.gdn_harness_run(*args, S, H, H_k, T, B, B_qk, stream)
        if err != 0:
            raise RuntimeError(f"kernel launch failed: cudaError {err}")

    return go, out, st


def correctness(lib, torch) -> list[dict]:
    rng = np.random.default_rng(1234)
    cases = []
    for S in (64, 128):
        for T in (1, 63, 64, 65, 1000):
            for ratio in (1, 2, 4):
                cases.append(dict(S=S, T=T, H_k=2, H_v=2 * ratio, B=1, B_qk=1, g_scale=1.0))
    cases += [
        dict(S=128, T=8192, H_k=2, H_v=4, B=1, B_qk=1, g_scale=1.0),
        dict(S=128, T=300, H_k=2, H_v=4, B=4, B_qk=4, g_scale=1.0),
        dict(S=128, T=300, H_k=2, H_v=4, B=3, B_qk=1, g_scale=1.0),   # q/k broadcast over sequences
        dict(S=64, T=200, H_k=1, H_v=4, B=2, B_qk=2, g_scale=1e-4),   # g near 0 (almost no decay)
        dict(S=128, T=200, H_k=2, H_v=4, B=2, B_qk=2, g_scale=20.0),  # g near -20 (state wiped each token)
    ]
    rows = []
    for c in cases:
        inputs = ref.random_inputs(rng, B=c["B"], B_qk=c["B_qk"], T=c["T"], H_k=c["H_k"], H_v=c["H_v"],
                                   S=c["S"], g_scale=c["g_scale"])
        go, out, st = run_kernel(lib, torch, inputs, c["S"], c["H_v"], c["H_k"], c["T"], c["B"], c["B_qk"])
        go()
        torch.cuda.synchronize()
        form = ref.recurrent if c["T"] <= 1000 else ref.chunked
        o_ref, s_ref = form(*inputs, K=1)
        o, s = out.cpu().numpy(), st.cpu().numpy()
        row = dict(c, nan=bool(np.isnan(o).any() or np.isnan(s).any()),
                   err_out=ref.rel_rms(o, o_ref), err_state=ref.rel_rms(s, s_ref[0]))
        row["ok"] = (not row["nan"]) and row["err_out"] <= TOL_REL_RMS and row["err_state"] <= TOL_REL_RMS
        rows.append(row)
        print(("ok  " if row["ok"] else "FAIL") + f" S={c['S']} T={c['T']} H_k={c['H_k']} H_v={c['H_v']} "
              f"B={c['B']} B_qk={c['B_qk']} g_scale={c['g_scale']}: out {row['err_out']:.2e} "
              f"state {row['err_state']:.2e}" + (" NaN!" if row["nan"] else ""), flush=True)
    return rows


def median_ms(torch, fn, reps=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def bench(lib, torch, with_fla: bool) -> list[dict]:
    rng = np.random.default_rng(7)
    fla = None
    if with_fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla  # noqa: N813
    rows = []
    for name, H_k, H_v in (("27B", 16, 48), ("35B-A3B", 16, 32)):
        for T in (512, 2048, 8192, 32768):
            S = 128
            inputs = ref.random_inputs(rng, B=1, T=T, H_k=H_k, H_v=H_v, S=S)
            go, out, st = run_kernel(lib, torch, inputs, S, H_v, H_k, T, 1, 1)
            row = dict(shape=name, T=T, H_k=H_k, H_v=H_v, chunked_ms=median_ms(torch, go))
            if fla is not None:
                q, k, v, g, beta, s0 = (torch.from_numpy(x).cuda() for x in inputs)
                rep = H_v // H_k
                # FLA reads key head h // rep for value head h; repeat q/k so every head has its own
                qf = q.repeat_interleave(rep, dim=2)
                kf = k.repeat_interleave(rep, dim=2)
                s0t = s0.transpose(-1, -2).contiguous()  # FLA state is [K, V]
                for dt in (torch.float32, torch.bfloat16):
                    args = [x.to(dt) for x in (qf, kf, v)]
                    fn = lambda a=args: fla(a[0], a[1], a[2], g[..., 0], beta[..., 0], scale=S ** -0.5,
                                            initial_state=s0t, output_final_state=True)
                    key = "fla_" + str(dt).split(".")[-1] + "_ms"
                    try:
                        row[key] = median_ms(torch, fn)
                    except Exception as e:  # noqa: BLE001  (record why FLA could not run)
                        row[key.replace("_ms", "_error")] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--fla", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--lib", type=Path, default=Path("/tmp/libgdn_harness.so"))
    args = ap.parse_args()
    import torch

    print(torch.cuda.get_device_name(0), flush=True)
    lib = build(args.lib)
    result = {"correctness": correctness(lib, torch)}
    if args.bench:
        result["bench"] = bench(lib, torch, args.fla)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    bad = [r for r in result["correctness"] if not r["ok"]]
    print(f"correctness: {len(result['correctness']) - len(bad)} passed, {len(bad)} failed")
    for r in result.get("bench", []):
        extra = "".join(f"  {k[:-3]} {v:.3f} ms" for k, v in r.items() if k.startswith("fla") and k.endswith("_ms"))
        print(f"{r['shape']:8s} T={r['T']:6d} chunked {r['chunked_ms']:.3f} ms{extra}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
