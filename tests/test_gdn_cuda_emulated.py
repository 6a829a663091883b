"""The chunked GATED_DELTA_NET CUDA kernels (cpp_patches/cuda/gated_delta_net_chunked.cuh), run
on the CPU by cpp_patches/cuda/simt_emu.h, against the float64 numpy reference.

The emulator runs every CUDA thread as a fiber, evaluates mma.sync and shuffles across the
warp in the PTX ISA's fragment layouts, fills shared memory with NaN and ends every buffer at a
guard page; so this checks the kernels' indexing, fragment layouts, barriers, chunk carry and
bounds on every commit, with no GPU. The mutation tests break the kernel on purpose and require
the emulator to notice, so a passing run means something.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "cpp_patches" / "cuda"
sys.path.insert(0, str(CUDA_DIR))

from cases import TOL_REL_RMS, case_id, correctness_cases  # noqa: E402
from emulate import SOURCES  # noqa: E402

EMULATE = CUDA_DIR / "emulate.py"

needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler (g++/c++) on PATH"
)


def _emulate(*args, cwd=ROOT, timeout=900):
    return subprocess.run(
        [sys.executable, str(EMULATE), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Every case of the grid (T = 8192 included) and the thread-schedule check, in one child
    process: a memory fault in a kernel ends that process with the emulator's message, not pytest."""
    out = tmp_path_factory.mktemp("emu") / "rows.json"
    r = _emulate("--long", "--orders", "--json", str(out))
    if not out.exists():
        pytest.fail(
            f"the emulated kernels did not finish (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )
    rows = json.loads(out.read_text())
    return {(row.get("check", "grid"), case_id(row)): row for row in rows}


@needs_cxx
@pytest.mark.parametrize("case", correctness_cases(long=True), ids=case_id)
def test_emulated_kernel_matches_reference(case, grid):
    row = grid[("grid", case_id(case))]
    assert not row["nan"], "NaN in the output or state: a read of unwritten memory or padding"
    assert row["tail_untouched"], "the kernel wrote output tokens at or past T"
    assert row["err_out"] <= TOL_REL_RMS, row
    assert row["err_state"] <= TOL_REL_RMS, row


@needs_cxx
def test_thread_schedules_give_the_same_bits(grid):
    """Forward, reverse and shuffled thread orders between barriers, cp.async copies landing at
    issue or at the wait: a race, or a copy into a buffer still being read, would change bits."""
    rows = [r for (check, _), r in grid.items() if check == "orders"]
    assert len(rows) == 4
    assert all(r["orders_agree"] for r in rows), rows


# (name, text in gated_delta_net_chunked.cuh, replacement, what the emulator must report)
MUTATIONS = [
    (
        "A-fragment rows and columns swapped",
        "split_tf32(a(m0 + gr + 8, k0 + tg),     ah[1], al[1]);\n    split_tf32(a(m0 + gr,     k0 + tg + 4), ah[2], al[2]);",
        "split_tf32(a(m0 + gr,     k0 + tg + 4), ah[1], al[1]);\n    split_tf32(a(m0 + gr + 8, k0 + tg),     ah[2], al[2]);",
        "FAIL",
    ),
    (
        "barrier after the delta phase dropped",
        "        __syncthreads();\n        if (more) {\n            copy_vt(chunk + 1);",
        "        if (more) {\n            copy_vt(chunk + 1);",
        "FAIL",
    ),
    (
        "next chunk's Q copied in while phase 1 still reads it",
        "        __syncthreads();\n        if (more) {\n            copy_qk(Qs, p.q, chunk + 1);\n        }",
        "        if (more) {\n            copy_qk(Qs, p.q, chunk + 1);\n        }\n        __syncthreads();",
        "thread schedules disagree",
    ),
    (
        "cp.async copies never awaited",
        "        async_wait_all();\n        stash();",
        "        stash();",
        "cp.async copies never awaited",
    ),
    (
        "barrier between the blocked inverse's two products dropped",
        "            As[(16 * j + r) * LDA + 16 * i + c] = acc;   // Y_ij\n        }\n        __syncthreads();",
        "            As[(16 * j + r) * LDA + 16 * i + c] = acc;   // Y_ij\n        }",
        "thread schedules disagree",
    ),
    (
        "decays from float cumulative sums",
        "const float decay = s <= t ? expf((float) (cd[t] - cd[s])) : 0.0f;",
        "const float decay = s <= t ? expf(cs[t] - cs[s]) : 0.0f;",
        "FAIL",
    ),
    ("prefix sum off by one lane", "if (lane >= o) s += n;", "if (lane > o) s += n;", "FAIL"),
    (
        "output rows past T written",
        "if (t < n) {\n                    p.out",
        "if (true) {\n                    p.out",
        "past the end of 'out'",
    ),
    (
        "prep shared memory one value short",
        "return sizeof(float) * (2 * C * (S + 4) + C * (C + 1) + 2 * C) + sizeof(double) * C; }",
        "return sizeof(float) * (2 * C * (S + 4) + C * (C + 1) + 2 * C) + sizeof(double) * (C - 1); }",
        "past the end of 'dynamic shared memory'",
    ),
    (
        "last chunk read as a full chunk",
        "auto tokens = [&](int64_t chunk) { return (int) min((int64_t) C, p.T - chunk * C); };",
        "auto tokens = [&](int64_t chunk) { return C + 0 * (int) chunk; };",
        "memory fault in gdn_chunk_state",
    ),
]


@needs_cxx
@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_emulator_catches_a_broken_kernel(mutation, tmp_path):
    name, old, new, expect = mutation
    for f in SOURCES:
        shutil.copy(CUDA_DIR / f, tmp_path / f)
    kernel = tmp_path / "gated_delta_net_chunked.cuh"
    text = kernel.read_text()
    assert text.count(old) == 1, f"mutation '{name}' no longer matches the kernel source: update MUTATIONS"
    kernel.write_text(text.replace(old, new))
    r = _emulate("--quick", "--orders", "--fail-fast", "--source-dir", str(tmp_path))
    log = r.stdout + r.stderr
    assert r.returncode != 0, f"the emulator passed a kernel with '{name}':\n{log[-2000:]}"
    assert expect in log, log[-2000:]


@needs_cxx
def test_state_pass_fits_in_one_wave():
    """The state pass walks every chunk in each block, so a second wave of blocks would double
    its time: on an H100 (132 SMs, 227 KiB per block) Qwen3.5-27B's 48 value heads take 64-column
    blocks (96 blocks, where 32 columns would make 192 with one resident per SM), 35B-A3B's 32
    heads keep 32 columns (128 blocks); an A100 (163 KiB) cannot hold the 64-column block."""
    from emulate import Emulator, build

    emu = Emulator(build())
    h100 = dict(n_sm=132, smem_optin=232448, smem_per_sm=233472)
    a100 = dict(n_sm=108, smem_optin=166912, smem_per_sm=167936)
    assert emu.choose_bv(128, 48, 1, **h100) == 64
    assert emu.choose_bv(128, 32, 1, **h100) == 32
    assert emu.choose_bv(128, 16, 1, **h100) == 32
    assert emu.choose_bv(128, 48, 1, **a100) == 32
    assert emu.choose_bv(64, 48, 1, **h100) == 32


# (compute capability, multiprocessors, opt-in shared memory per block, per multiprocessor)
DEVICES = {
    "H100": (900, 132, 232448, 233472),
    "A100": (800, 108, 166912, 167936),
    "RTX 3090": (860, 82, 101376, 102400),
    "RTX 4090": (890, 128, 101376, 102400),
    "RTX 5090": (1200, 170, 101376, 102400),
    "T4": (750, 40, 65536, 65536),
}


@needs_cxx
@pytest.mark.parametrize("device", DEVICES)
def test_dispatcher_takes_the_chunked_path_only_where_it_launches(device):
    """ggml's dispatcher asks usable(S_v, cc, smpbo) before the chunked path; where it says yes
    the kernels must launch (and be right) on that device, where it says no they could not (the
    launch refuses the shared memory): GeForce cards (99 KiB) keep the token kernel for Qwen3.5's
    S_v = 128 instead of failing, A100/H100 take both head sizes, pre-Ampere neither."""
    import gated_delta_net as ref  # cpp_patches/reference, on the path once emulate is imported
    from emulate import Emulator, build, inputs_for

    cc, n_sm, optin, per_sm = DEVICES[device]
    emu = Emulator(build())
    usable = {S: emu.usable(S, cc, optin) for S in (64, 128)}
    assert usable == {"H100": {64: True, 128: True}, "A100": {64: True, 128: True}, "T4": {64: False, 128: False}}.get(
        device, {64: True, 128: False}
    )
    if cc < 800:
        return  # no tf32 mma / cp.async: nothing to launch
    emu.set_device(n_sm=n_sm, smem_optin=optin, smem_per_sm=per_sm)
    try:
        for S in (128, 64):  # a refused launch first: it must leave no error behind for the next one
            case = dict(S=S, T=65, H_k=1, H_v=2, B=1, B_qk=1, g_scale=1.0)
            x = inputs_for(case)
            try:
                out, st = emu.run(*x)
            except RuntimeError as e:
                assert not usable[S], f"usable() says yes for S_v {S} on the {device} but the launch fails: {e}"
                continue
            assert usable[S], f"the launch fits S_v {S} on the {device} but usable() sends it to the token kernel"
            o_ref, s_ref = ref.recurrent(*x)
            assert ref.rel_rms(out, o_ref) <= TOL_REL_RMS and ref.rel_rms(st, s_ref[0]) <= TOL_REL_RMS
    finally:
        emu.reset_device()


@needs_cxx
def test_gpu_harness_driver_runs_on_the_emulator():
    """run_harness.py's correctness pass (the first thing a GPU session runs) unchanged on the
    emulator, which exports the harness's entry points over host memory: NaN-poisoned buffers,
    the kept tail, strided rows, q/k shared across sequences, the token-sequential stand-in for
    upstream's kernel on the same buffers, and on a GeForce-sized device the refused launch."""
    import ctypes

    import run_harness
    from emulate import Emulator, build, quick_cases

    lib = run_harness.bind(ctypes.CDLL(str(build())))
    run_harness.require_device(lib)
    rows = run_harness.correctness(lib, quick_cases())
    assert len(rows) == 4 and all(r["ok"] and not r.get("not_on_this_gpu") for r in rows), rows
    both = [r for r in rows if "upstream_ok" in r]
    assert {case_id(r) for r in both} == {case_id(c) for c in quick_cases() if not c["extra"]}
    assert all(r["upstream_ok"] and r["upstream_err_out"] > 0 for r in both), both

    _cc, n_sm, optin, per_sm = DEVICES["RTX 4090"]
    emu = Emulator(build())  # the same loaded library: its device limits are the harness's
    emu.set_device(n_sm=n_sm, smem_optin=optin, smem_per_sm=per_sm)
    try:
        cases = [
            dict(S=S, T=65, H_k=1, H_v=2, B=1, B_qk=1, g_scale=1.0, pad=0, extra=0, bv=0, spike=0) for S in (128, 64)
        ]
        s128, s64 = run_harness.correctness(lib, cases)
    finally:
        emu.reset_device()
    assert s128["not_on_this_gpu"] and s128["launch_refused"] and s128["ok"], s128
    assert s64["ok"] and not s64.get("not_on_this_gpu") and s64["upstream_ok"], s64


@needs_cxx
def test_gpu_harness_bench_runs_on_the_emulator(capsys):
    """run_harness.py's benchmark pass (what the first call of a GPU session measures) on the
    emulator with host tensors and tiny shapes: each row's upstream and chunked times, the tile
    that cannot be used left out, the timed kernels' results against each other, the threshold
    sweep's crossover by its definition, and the printed table."""
    import ctypes

    import run_harness
    import torch
    from emulate import build

    lib = run_harness.bind(ctypes.CDLL(str(build())))
    variants = {
        name: run_harness.bind(ctypes.CDLL(str(build(defines=macros))))
        for name, (macros, _, _) in run_harness.VARIANTS.items()
    }
    assert set(variants) == {"nw16", "1xtf32"}
    result = run_harness.bench(
        lib,
        torch,
        False,
        shapes=(("tiny", 1, 2),),
        lengths=(65, 130),
        sweep=(16, 64, 130),
        S=64,
        reps=1,
        sweep_reps=1,
        device="cpu",
        variants=variants,
    )
    rows = result["rows"]
    assert [(r["shape"], r["T"]) for r in rows] == [("tiny", 65), ("tiny", 130)]
    for r in rows:
        assert r["bv_chosen"] == 32 and r["chunked_bv64_ms"] is None  # S_v 64 has no 64-column tile
        assert r["chunked_ms"] == r["chunked_bv32_ms"] > 0 and r["upstream_ms"] > 0
        assert r["speedup_vs_upstream"] == pytest.approx(r["upstream_ms"] / r["chunked_ms"])
        assert 0 < r["chunked_bv32_vs_upstream_out"] <= TOL_REL_RMS
        assert 0 < r["chunked_bv32_vs_upstream_state"] <= TOL_REL_RMS
        # the chosen tile's two kernels timed apart, the state pass per chunk (64 tokens)
        assert r["prep_ms"] > 0 and r["state_ms"] > 0 and r["stages_reproduce_launch"] is True
        assert r["state_us_per_chunk"] == pytest.approx(1e3 * r["state_ms"] / -(-r["T"] // 64))
        # the variants beside it, their stages timed too: the 16-warp build really has 16 warps
        # and gives the same bits; the 1xTF32 build other bits, further from upstream's kernel
        for name in ("nw16", "1xtf32"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_prep_ms"] > 0 and r[f"{name}_state_ms"] > 0
            assert r[f"{name}_stages_reproduce_launch"] is True
        assert r["nw16_warps"] == 16 and r["nw16_same_bits"] is True
        assert r["nw16_vs_upstream_out"] == r["chunked_bv32_vs_upstream_out"]
        assert r["1xtf32_warps"] == 8 and r["1xtf32_same_bits"] is False
        assert 1e-5 < r["1xtf32_vs_upstream_out"] < 5e-3 and 1e-5 < r["1xtf32_vs_upstream_state"] < 5e-3

    sweep = result["threshold"]["tiny"]
    assert [r["T"] for r in sweep["rows"]] == [16, 64, 130]
    faster = {r["T"]: r["chunked_ms"] < r["upstream_ms"] for r in sweep["rows"]}
    start = sweep["chunked_faster_from"]
    if start is None:
        assert not faster[130]
    else:
        assert all(f for T, f in faster.items() if start <= T)
        earlier = [T for T in faster if start > T]
        assert not earlier or not faster[max(earlier)]  # the length just before it was not faster

    capsys.readouterr()
    run_harness.print_bench(result)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].startswith("tiny     T=    65 upstream ")
    assert " ms, " in printed[0] and "us/chunk" in printed[0] and "prep " in printed[0]
    assert "; nw16 " in printed[0] and ", same bits)" in printed[0] and "NOT the same bits" not in printed[0]
    assert re.search(r"; 1xtf32 [0-9.]+ ms \(prep [0-9.]+ \+ state [0-9.]+, [0-9.]+e-0[34] from upstream\)", printed[0])
    assert "chunked faster from" in printed[2]


@needs_cxx
def test_sixteen_warps_per_block(tmp_path):
    """The build the benchmark times beside ggml's (GDN_CHUNKED_NW=16: 512 threads, each warp
    half the tiles): the quick cases against the float64 reference and under every thread
    schedule and cp.async timing; and bit for bit the 8-warp kernel's results (each tile is
    summed in the same order, whichever warp owns it), checked with each library saying how
    many warps it runs."""
    import ctypes

    import gated_delta_net as ref
    import numpy as np
    import run_harness
    import torch
    from emulate import build, quick_cases

    out = tmp_path / "rows.json"
    r = _emulate("--quick", "--orders", "--define", "GDN_CHUNKED_NW=16", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * len(quick_cases()) and all(row["ok"] for row in rows), rows

    lib8 = run_harness.bind(ctypes.CDLL(str(build())))
    lib16 = run_harness.bind(ctypes.CDLL(str(build(defines=run_harness.warps_build(16)))))
    assert (lib8.gdn_harness_warps(), lib16.gdn_harness_warps()) == (8, 16)
    for S, bv in ((64, 32), (128, 32), (128, 64)):
        inputs = ref.random_inputs(np.random.default_rng(S + bv), B=2, T=130, H_k=1, H_v=2, S=S)
        results = []
        for lib in (lib8, lib16):
            go, o, st = run_harness.run_kernel(lib, torch, inputs, bv=bv, device="cpu")
            go()
            results.append((o, st))
        (o8, s8), (o16, s16) = results
        assert not torch.isnan(o8).any() and torch.equal(o8, o16) and torch.equal(s8, s16), (S, bv)


@needs_cxx
def test_a_harness_variant_that_fails_costs_only_itself(monkeypatch, capsys):
    """The 16-warp build is an extra of the benchmark: if it does not compile on the device, the
    other builds are still loaded (a line says which was left out), and if it does not run, each
    row keeps every other number and says why; a required build's failure still stops the run."""
    import ctypes
    import subprocess

    import run_harness
    import torch
    from emulate import build

    emu = build()

    def compile_harness(out, arch, llama, extra):
        if extra:
            raise subprocess.CalledProcessError(1, ["nvcc", *extra])
        return emu

    monkeypatch.setattr(run_harness, "compile_harness", compile_harness)
    builds = {"ggml": (Path("/x/lib.so"), ()), "nw16": (Path("/x/lib-nw16.so"), run_harness.VARIANTS["nw16"][0])}
    libs = run_harness.build_all(builds, "90a", Path("/x"))
    assert set(libs) == {"ggml"} and libs["ggml"].gdn_harness_warps() == 8
    assert "harness build nw16 left out" in capsys.readouterr().out
    with pytest.raises(subprocess.CalledProcessError):
        run_harness.build_all(builds, "90a", Path("/x"), required=("ggml", "nw16"))

    class Refusing:  # a 16-warp build whose launches fail
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            return getattr(self.lib, name)

        @staticmethod
        def gdn_harness_run(*args):
            return 1

    lib = run_harness.bind(ctypes.CDLL(str(emu)))
    result = run_harness.bench(
        lib,
        torch,
        False,
        shapes=(("tiny", 1, 2),),
        lengths=(65,),
        sweep=(),
        S=64,
        reps=1,
        device="cpu",
        variants={"nw16": Refusing(lib)},
    )
    (row,) = result["rows"]
    assert "cudaError 1" in row["nw16_error"] and "nw16_ms" not in row
    assert row["chunked_ms"] > 0 and row["state_ms"] > 0 and row["stages_reproduce_launch"] is True
    capsys.readouterr()
    run_harness.print_bench(result)
    assert "; nw16 failed: chunked kernel launch failed: cudaError 1" in capsys.readouterr().out


@needs_cxx
def test_gpu_harness_runs_each_stage_alone():
    """The harness's stage launches, which the benchmark times apart: the prep kernel alone
    writes the scratch and no output; the state pass alone reads that scratch and writes the
    outputs, and after prep they are the whole launch's bits (the oracle: the whole launch on
    the same inputs); on a NaN scratch it gives NaN (it really skips prep); a stage number the
    harness does not know is refused with cudaErrorInvalidValue, having launched nothing."""
    import ctypes

    import gated_delta_net as ref
    import numpy as np
    import run_harness
    import torch
    from emulate import build

    lib = run_harness.bind(ctypes.CDLL(str(build())))
    inputs = ref.random_inputs(np.random.default_rng(5), B=2, T=130, H_k=1, H_v=2, S=64)
    go, full_out, full_st = run_harness.run_kernel(lib, torch, inputs, device="cpu")
    go()
    assert not torch.isnan(full_out).any() and not torch.isnan(full_st).any()

    go, out, st = run_harness.run_kernel(lib, torch, inputs, device="cpu")
    scratch = go.buffers[3]
    scratch.fill_(float("nan"))
    go.stages["state"]()
    assert torch.isnan(out).all() and torch.isnan(st).all()  # NaN scratch in, NaN out
    go.stages["prep"]()
    assert not torch.isnan(scratch).any()
    assert torch.isnan(out).all() and torch.isnan(st).all()  # prep alone writes no output
    go.stages["state"]()
    assert torch.equal(out, full_out) and torch.equal(st, full_st)

    out.fill_(float("nan"))
    bad = run_harness.Launch(lib.gdn_harness_run_stage, "stage 3", go.buffers, go.stages["state"].args[:-2] + (3, None))
    with pytest.raises(RuntimeError, match="cudaError 1"):
        bad()
    assert torch.isnan(out).all()


@needs_cxx
def test_gpu_harness_bench_with_fla(tmp_path, monkeypatch):
    """The benchmark's FLA path (run_harness --fla) on the emulator, with a stand-in for FLA
    (tests/standin_fla.py): FLA timed in both dtypes on every row, the count of kernels Triton
    compiled while it was timed, FLA's accuracy rows."""
    import ctypes

    import run_harness
    import standin_fla
    import torch
    from emulate import build

    site = standin_fla.install(tmp_path)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STANDIN_LOG", str(log))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    lib = run_harness.bind(ctypes.CDLL(str(build())))
    shapes, lengths = (("tiny", 1, 2),), (65, 130)
    monkeypatch.syspath_prepend(str(site))
    try:
        result = run_harness.bench(
            lib, torch, True, shapes=shapes, lengths=lengths, sweep=(), S=64, reps=1, device="cpu"
        )
        timed = standin_fla.calls(log)
    finally:
        for mod in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[mod]

    for r in result["rows"]:
        assert r["fla_float32_ms"] > 0 and r["fla_bfloat16_ms"] > 0, r
    accuracy_calls = 4  # two dtypes, with and without the forget-gate spike
    assert set(result["fla_accuracy"]) == {
        f"fla_{dt}{s}_err_{x}" for dt in ("float32", "bfloat16") for s in ("", "_spike") for x in ("out", "state")
    }
    # each call of the stand-in "compiled" one kernel; the accuracy calls come after the count
    assert result["fla_kernels_compiled_while_timed"] == len(timed) - accuracy_calls >= 2 * len(lengths)
    assert len({c["args"][0][0][1] for c in timed}) == 3  # T 65, 130 and the accuracy's 1000


@needs_cxx
def test_gpu_harness_precision_probe_on_the_emulator(capsys):
    """run_harness.py --precision on the emulator: the kernel built with one TF32 product
    (PRECISION_PROBE) is a different kernel, worse than the float32-accurate one ggml runs but
    bounded, against the float64 reference and against upstream's kernel; both are timed."""
    import ctypes

    import run_harness
    import torch
    from emulate import build

    lib = run_harness.bind(ctypes.CDLL(str(build())))
    lib_1x = run_harness.bind(ctypes.CDLL(str(build(defines=run_harness.PRECISION_PROBE))))
    probe = run_harness.precision_probe(
        lib,
        lib_1x,
        torch,
        shapes=(("tiny", 2, 4),),
        lengths=(130,),
        S=64,
        reps=1,
        accuracy=dict(S=64, T=200, H_k=2, H_v=4),
        device="cpu",
    )
    (row,) = probe["rows"]
    assert row["3xtf32_ms"] > 0 and row["1xtf32_ms"] > 0
    assert row["time_1x_over_3x"] == pytest.approx(row["1xtf32_ms"] / row["3xtf32_ms"])
    assert row["3xtf32_vs_upstream_out"] <= TOL_REL_RMS and row["3xtf32_vs_upstream_state"] <= TOL_REL_RMS
    assert 1e-5 < row["1xtf32_vs_upstream_out"] < 5e-3 and 1e-5 < row["1xtf32_vs_upstream_state"] < 5e-3, row
    acc = probe["reference"]
    assert acc["3xtf32_err_out"] <= TOL_REL_RMS and acc["3xtf32_err_state"] <= TOL_REL_RMS, acc
    assert 1e-5 < acc["1xtf32_err_out"] < 5e-3 and 1e-5 < acc["1xtf32_err_state"] < 5e-3, acc
    capsys.readouterr()
    run_harness.print_precision(probe)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("tiny     T=   130 chunked 3xTF32 ")
    assert printed[1].startswith("vs the float64 reference (T 200, H_k 2, H_v 4, S 64): 3xTF32 out ")
