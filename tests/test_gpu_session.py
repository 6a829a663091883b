"""The GPU session's tooling, on a machine without a GPU: the plan that runs gpu_session.sh's steps
within one device call (cpp_patches/cuda/session_plan.py), the discovery of cuBLAS and the
driver library for the device's CUDA build (cuda/device_env.py), and the build's portable flags.

The device's limits are the oracle: a call is killed at its limit and returns at most 8 files
from $OUT, named in letters, digits, '.', '_' and '-'; a process the call leaves in a session of
its own (the background build) lives on. The plan is driven here by stand-in steps (a bash script
with the real one's `--one STEP` interface) whose times and outcomes the tests choose, and once
by the real gpu_session.sh in a copy of its folder with no build and no bundle."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA = ROOT / "cpp_patches" / "cuda"
sys.path.insert(0, str(CUDA))
sys.path.insert(0, str(ROOT / "cpp_patches"))
import device_env  # noqa: E402
import standin_fla  # noqa: E402
import session_plan  # noqa: E402
import tree  # noqa: E402

OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# Stand-in steps. build: a background job in its own session (as gpu_session.sh's), done after
# BUILD_S; ops/e2e need it; bench outlives any budget; sanitize fails. Each step appends its
# name and start time to order.txt, and writes a log into $LOGS.
FAKE = r"""#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")"
[ "$1" = --one ] || exit 9
echo "$2 $(date +%s.%N)" >> order.txt
echo "log of $2" > "$LOGS/$2.log"
case $2 in
  probe) echo "GPU 0: stand-in" ;;
  build) mkdir -p build; rm -f build/cuda-build.rc
         setsid bash -c "echo compiling; sleep $BUILD_S; echo \$BUILD_RC > build/cuda-build.rc; echo linked" \
             > build/cuda-build.log 2>&1 < /dev/null &
         echo "build: started" ;;
  prep)  echo "prep: nothing to make" ;;
  check) sleep 0.5; echo "correctness: 42 passed, 0 failed" ;;
  warm)  [ "${WARM_RC:-0}" = 0 ] || { echo "warm: 27B float32: FAILED"; exit 1; }; echo "warm: compiled" ;;
  fla)   sleep 0.5; [ "${FLA_RC:-0}" = 0 ] || exit 1; echo "fla timed" ;;
  ops|e2e) [ "$(cat build/cuda-build.rc 2>/dev/null)" = 0 ] || { echo "error: no CUDA build" >&2; exit 1; }
         echo "$2 ran on the build" ;;
  bench) echo "bench: first row"; sleep "${BENCH_S:-601}"; echo "never printed" ;;
  sanitize) echo "compute-sanitizer memcheck: FAILED"; exit 1 ;;
  model) echo "model ran" ;;
esac
"""


def _fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "fake.sh").write_text(FAKE)
    return root


def _session(root: Path, tmp_path: Path, steps: list[str], budget: float | None, lines: list[str]):
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    return session_plan.Session(session_plan.parse_steps(steps), budget, out, logs, root=root,
                                script=root / "fake.sh", echo=lines.append)


def _order(root: Path) -> list[str]:
    return [line.split()[0] for line in (root / "order.txt").read_text().splitlines()]


def _out_files(out: Path) -> dict[str, Path]:
    files = {p.name: p for p in out.iterdir()}
    assert len(files) <= 8 and all(OUT_NAME.match(n) for n in files), sorted(files)
    return files


def test_steps_that_need_the_build_wait_for_it_while_the_others_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_S", "3")
    monkeypatch.setenv("BUILD_RC", "0")
    root, lines = _fake_tree(tmp_path), []
    s = _session(root, tmp_path, ["build", "ops", "e2e", "check", "fla"], None, lines)
    assert s.run() == 0, "\n".join(lines)
    # ops and e2e come first among the steps given, but the build is running: check and fla go first
    assert _order(root) == ["probe", "build", "check", "fla", "ops", "e2e"]
    assert [r.status for r in s.results] == ["ok"] * 6
    assert any(line.startswith("== waiting for build") for line in lines), lines
    assert "ops ran on the build" in lines and "e2e ran on the build" in lines


def test_a_step_is_cut_at_the_deadline_and_the_out_folder_holds_what_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_S", "600")   # the background build outlives the call
    monkeypatch.setenv("BUILD_RC", "0")
    root, lines = _fake_tree(tmp_path), []
    budget = 20.0
    s = _session(root, tmp_path, ["build", "check", "bench", "ops", "sanitize"], budget, lines)
    t0 = time.monotonic()
    rc = s.run()
    elapsed = time.monotonic() - t0
    try:
        assert rc == 1
        # within the budget: the device's own limit (timeout_s) is set a little above it
        assert elapsed <= budget + 2, elapsed
        status = {r.step: r.status for r in s.results}
        assert status == {"probe": "ok", "build": "ok", "check": "ok", "bench": "cut", "ops": "not run",
                          "sanitize": "not run"}, status
        assert "bench: first row" in lines and "never printed" not in lines
        # the bench step's own processes are gone; the build (a session of its own) goes on
        assert not _running("sleep 601") and _running("sleep 600")
        assert not (root / "build" / "cuda-build.rc").exists()
        files = _out_files(tmp_path / "out")
        assert set(files) == {"summary.txt", "steps.json", "gdn-logs.tar.gz"}
        steps = json.loads(files["steps.json"].read_text())
        assert steps["budget_s"] == budget and [r["status"] for r in steps["steps"]] == list(status.values())
        summary = files["summary.txt"].read_text()
        assert "bench: first row" in summary and "== bench: cut at the deadline" in summary
        with tarfile.open(files["gdn-logs.tar.gz"]) as tar:
            names = set(tar.getnames())
            assert {"probe.log", "build.log", "check.log", "bench.log", "cuda-build.log"} <= names, names
            assert tar.extractfile("cuda-build.log").read() == b"compiling\n"
        # the build was still running when time ran out: its log is shown, and the next call
        # starts it again before the steps that need it
        assert any(line.startswith("== build (background): running") for line in lines), lines
        assert lines[-1].endswith("--budget SECONDS build bench ops sanitize"), lines[-1]
    finally:
        subprocess.run(["pkill", "-fx", "sleep 600"], check=False)


def _running(cmdline: str) -> list[str]:
    return subprocess.run(["pgrep", "-fx", cmdline], capture_output=True, text=True).stdout.split()


def test_a_failed_background_build_is_shown_and_its_steps_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_S", "0.2")
    monkeypatch.setenv("BUILD_RC", "2")
    root, lines = _fake_tree(tmp_path), []
    s = _session(root, tmp_path, ["build", "ops", "check"], 60, lines)
    assert s.run() == 1
    assert {r.step: r.status for r in s.results} == {"probe": "ok", "build": "ok", "check": "ok", "ops": "failed"}
    i = lines.index("== build (background): failed; the end of build/cuda-build.log:")
    assert lines[i + 1:i + 3] == ["   compiling", "   linked"]
    assert lines[-1].endswith("--budget SECONDS build ops"), lines[-1]


def test_warm_runs_before_fla_and_a_next_call_warms_again_only_for_fla(tmp_path, monkeypatch):
    """warm fills Triton's cache for fla on this machine: the next call (a fresh machine) repeats it
    before an unfinished fla, and does not repeat a failed warm once fla has run."""
    monkeypatch.setenv("BUILD_S", "0.2")
    monkeypatch.setenv("BUILD_RC", "0")
    monkeypatch.setenv("BENCH_S", "0")
    root, lines = _fake_tree(tmp_path), []
    _session(root, tmp_path, ["all"], None, lines).run()
    order = _order(root)
    assert order.index("warm") == order.index("fla") - 1, order
    assert lines[-1].endswith("--budget SECONDS sanitize"), lines[-1]   # the stand-in sanitize fails

    for case, (warm_rc, fla_rc, next_call) in enumerate([("1", "0", "sanitize"),    # fla compiled for itself
                                                         ("0", "1", "warm fla sanitize"),
                                                         ("1", "1", "warm fla sanitize")]):
        monkeypatch.setenv("WARM_RC", warm_rc)
        monkeypatch.setenv("FLA_RC", fla_rc)
        where, lines = tmp_path / str(case), []
        where.mkdir()
        _session(_fake_tree(where), where, ["fla", "warm", "sanitize"], None, lines).run()
        assert lines[-1].endswith("--budget SECONDS " + next_call), (case, lines[-1])


def test_steps_are_named_and_checked_before_anything_runs():
    assert session_plan.parse_steps(["all"]) == list(session_plan.ALL)
    assert session_plan.parse_steps(["fla", "probe", "fla"]) == ["probe", "fla"]
    assert session_plan.parse_steps(["fla", "warm", "build"]) == ["probe", "build", "warm", "fla"]
    with pytest.raises(SystemExit, match="unknown step 'bild'"):
        session_plan.parse_steps(["bild"])


def test_the_real_script_without_a_build_fails_each_step_with_its_fix(tmp_path):
    """gpu_session.sh and the plan as they are, in a copy of their folder with no .device and no
    build: steps that need the build fail at once with the step to run first; $OUT is complete."""
    tree_dir = tmp_path / "repo"
    (tree_dir / "cpp_patches").mkdir(parents=True)
    shutil.copytree(CUDA, tree_dir / "cpp_patches" / "cuda", ignore=shutil.ignore_patterns("__pycache__"))
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = dict(os.environ, OUT=str(out), LOGS=str(logs))
    script = str(tree_dir / "cpp_patches" / "cuda" / "gpu_session.sh")
    # without the bundle nothing runs: one line naming the fix, nothing in $OUT
    r = subprocess.run(["bash", script, "--budget", "120", "all"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    assert r.stderr.strip().splitlines() == [
        "error: .device/ is missing: run `make cuda-bundle` here and name .device in the device call's carry"]
    _touch(tree_dir / ".device" / "llama-src.tar.xz")
    (tree_dir / ".device" / "MANIFEST.json").write_text(json.dumps({"sources": session_plan.bundle_sources(tree_dir)}))
    r = subprocess.run(["bash", script, "--budget", "120", "ops", "model"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: no CUDA build in build/cuda: run the build step first" in r.stdout
    files = _out_files(out)
    assert set(files) == {"summary.txt", "steps.json", "gdn-logs.tar.gz"}
    steps = {s["step"]: s["status"] for s in json.loads(files["steps.json"].read_text())["steps"]}
    assert steps["ops"] == steps["model"] == "failed"
    assert r.stdout.rstrip().endswith("--budget SECONDS build prep ops model")
    bad = subprocess.run(["bash", script, "--one", "bild"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown step 'bild'" in bad.stderr


def test_a_bundle_packed_from_other_sources_is_refused_before_anything_runs(tmp_path):
    """The CUDA build on the device comes from .device's llama.cpp source, the harness from the
    working tree: after the kernel header or a patch changes here, an old bundle would build one
    kernel and time another. The plan compares the sources .device records (device_bundle.py
    writes them) with the tree's and refuses, with one line naming the first changed file and
    the fix, before anything runs; a probe alone needs no bundle."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "cpp_patches", root / "cpp_patches", ignore=shutil.ignore_patterns("__pycache__"))
    _touch(root / ".device" / "llama-src.tar.xz")
    manifest = root / ".device" / "MANIFEST.json"
    sources = session_plan.bundle_sources(root)
    header = "cpp_patches/cuda/gated_delta_net_chunked.cuh"
    assert {"cpp_patches/series", header} <= set(sources)
    assert any(f.startswith("cpp_patches/pending/") for f in sources) and any(f.startswith("cpp_patches/0001-")
                                                                              for f in sources)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), LOGS=str(tmp_path / "logs"))
    script = str(root / "cpp_patches" / "cuda" / "gpu_session.sh")

    def refused(*steps) -> str:
        r = subprocess.run(["bash", script, "--budget", "60", *steps], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and r.stdout == "" and not out.exists(), r.stdout + r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.endswith(": run `make cuda-bundle` here and name .device in the device call's carry"), line
        return line

    assert "no record of the sources" in refused("check")   # a bundle from before the record
    manifest.write_text(json.dumps({"sources": sources}))
    assert session_plan.bundle_problem(root) is None
    kernel = root / header
    kernel.write_text(kernel.read_text() + "// changed\n")
    assert refused("all") == (f"error: .device/ was packed before {header} changed: run `make cuda-bundle` here "
                              "and name .device in the device call's carry")
    (root / "cpp_patches" / "series").write_text("")
    assert f"before {header} and 1 more changed" in refused("bench")
    r = subprocess.run(["bash", script, "--budget", "60", "probe"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert "make cuda-bundle" not in r.stderr and out.exists()


# --------------------------------------------------------------------------- device_env

def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_full_toolkit_needs_no_cmake_arguments(tmp_path):
    top = tmp_path / "cuda"
    for f in ("lib64/libcublas.so", "lib64/libcublasLt.so", "lib64/stubs/libcuda.so", "include/cublas_v2.h"):
        _touch(top / f)
    env = device_env.discover(top, search_path=[], bundle_headers=tmp_path / "none", libcuda=None)
    assert env.cmake_args() == []


def test_a_compiler_only_toolkit_takes_cublas_from_the_python_wheels(tmp_path):
    top = tmp_path / "cuda"
    _touch(top / "bin" / "nvcc")
    _touch(top / "targets" / "x86_64-linux" / "lib" / "libcudart.so")
    site = tmp_path / "site"
    for f in ("libcublas.so.12", "libcublas.so.13", "libcublasLt.so.13"):
        _touch(site / "nvidia" / "cu13" / "lib" / f)
    _touch(site / "nvidia" / "cu13" / "include" / "cublas_v2.h")
    libcuda = _touch(tmp_path / "driver" / "libcuda.so.1")
    env = device_env.discover(top, search_path=["/nonexistent", str(site)], bundle_headers=tmp_path / "none",
                              libcuda=libcuda)
    wheel = site / "nvidia" / "cu13"
    assert env.cmake_args() == [f"-DCUDA_cublas_LIBRARY={wheel / 'lib' / 'libcublas.so.13'}",
                                f"-DCUDA_cublasLt_LIBRARY={wheel / 'lib' / 'libcublasLt.so.13'}",
                                f"-DCUDA_cuda_driver_LIBRARY={libcuda}",
                                f"-DCMAKE_CUDA_FLAGS=-I{wheel / 'include'}"]


def test_headers_from_the_bundle_and_clear_errors_when_cublas_is_nowhere(tmp_path):
    top = tmp_path / "cuda"
    _touch(top / "lib64" / "stubs" / "libcuda.so")
    site = tmp_path / "site"
    with pytest.raises(device_env.EnvError, match="no libcublas.so in .* install cuBLAS"):
        device_env.discover(top, search_path=[str(site)], bundle_headers=tmp_path / "none", libcuda=None)
    for f in ("libcublas.so.13", "libcublasLt.so.13"):
        _touch(site / "nvidia" / "cublas" / "lib" / f)
    with pytest.raises(device_env.EnvError, match="no cublas_v2.h .*make cuda-bundle"):
        device_env.discover(top, search_path=[str(site)], bundle_headers=tmp_path / "none", libcuda=None)
    bundle = tmp_path / "bundle"
    _touch(bundle / "cublas_v2.h")
    env = device_env.discover(top, search_path=[str(site)], bundle_headers=bundle, libcuda=None)
    assert env.cmake_args()[-1] == f"-DCMAKE_CUDA_FLAGS=-I{bundle}"
    assert not any("cuda_driver" in a for a in env.cmake_args())   # the toolkit's stub is found by CMake
    _touch(top / "lib64" / "libcublas.so")   # find_library matches the unversioned name: nothing to say
    _touch(top / "lib64" / "libcublasLt.so")
    assert device_env.discover(top, search_path=[str(site)], bundle_headers=bundle,
                               libcuda=None).cmake_args() == [f"-DCMAKE_CUDA_FLAGS=-I{bundle}"]
    (top / "lib64" / "stubs" / "libcuda.so").unlink()
    with pytest.raises(device_env.EnvError, match="NVIDIA driver"):
        device_env.discover(top, search_path=[], bundle_headers=bundle, libcuda=None)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_toolkit_root_is_nvccs_own():
    top = device_env.toolkit_root()
    assert (top / "include" / "cuda_runtime.h").exists() and (top / "bin").is_dir()


# --------------------------------------------------------------------------- tree.py

def test_the_session_build_is_portable_and_takes_extra_cmake_arguments():
    flags = tree.cmake_flags("cuda", "90a", "sid", portable_cpu=True)
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags and "-DCMAKE_CUDA_ARCHITECTURES=90a" in flags
    assert "-DGGML_NATIVE=OFF" not in tree.cmake_flags("cuda", "90a", "sid")
    script = (CUDA / "gpu_session.sh").read_text()
    assert "--portable-cpu" in script and "device_env.py --cmake-args" in script


# --------------------------------------------------------------------------- the harness's reuse

def test_the_harness_is_recompiled_exactly_when_what_it_is_made_of_changes(tmp_path, monkeypatch):
    """Later steps of a session (and compute-sanitizer's runs) reuse the compiled harness; a key of
    its sources, upstream's kernel from the tree, the arch and the flags decides, not file times
    (a copied tree's times say nothing). nvcc is replaced by a recorder: the decision is tested."""
    import run_harness

    prepared = ROOT / "build" / "src" / "vendor" / "llama.cpp"
    assert (prepared / run_harness.GDN_CU).exists(), "the prepared tree is missing: `make setup` prepares it"
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"lib")

    monkeypatch.setattr(run_harness.subprocess, "run", fake_run)
    monkeypatch.setattr(run_harness, "cublas_include", lambda: None)
    lib = tmp_path / "libgdn.so"
    run_harness.compile_harness(lib, "90a", prepared)
    run_harness.compile_harness(lib, "90a", prepared)
    assert len(calls) == 1 and "-gencode=arch=compute_90a,code=sm_90a" in calls[0]
    run_harness.compile_harness(lib, "80", prepared)        # another arch
    assert len(calls) == 2
    key = lib.with_name(lib.name + ".key")
    assert key.read_text() == run_harness.harness_key("80", prepared) != run_harness.harness_key("90a", prepared)
    key.write_text("0" * 64)                                  # made from other sources
    run_harness.compile_harness(lib, "80", prepared)
    assert len(calls) == 3 and key.read_text() == run_harness.harness_key("80", prepared)


# --------------------------------------------------------------------------- the build step

FAKE_NVCC = """#!/bin/sh
echo '#$ TOP={top}'
"""
FAKE_TREE = """import json, sys
from pathlib import Path
Path("build/tree-argv.json").write_text(json.dumps(sys.argv[1:]))
"""


@pytest.mark.parametrize("toolkit", ["full", "compiler-only"])
def test_the_build_step_hands_cmake_what_the_toolkit_lacks(tmp_path, toolkit):
    """gpu_session.sh's build step as it is (tree.py replaced by a recorder of its arguments, nvcc
    by a stand-in naming a made-up toolkit): a compiler-only toolkit gets the wheel's cuBLAS files
    as CMake arguments, each one word (paths with spaces included); a full one gets none."""
    repo = tmp_path / "re po"
    shutil.copytree(CUDA, repo / "cpp_patches" / "cuda", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "cpp_patches" / "tree.py").write_text(FAKE_TREE)
    src = tmp_path / "src" / "llama.cpp"
    _touch(src / "CMakeLists.txt")
    (repo / ".device").mkdir()
    with tarfile.open(repo / ".device" / "llama-src.tar.xz", "w:xz") as tar:
        tar.add(src, arcname="llama.cpp")
    top = tmp_path / "cuda kit"
    _touch(top / "lib64" / "stubs" / "libcuda.so")
    site = tmp_path / "site packages"
    if toolkit == "full":
        for f in ("lib64/libcublas.so", "lib64/libcublasLt.so", "include/cublas_v2.h"):
            _touch(top / f)
    else:
        for f in ("lib/libcublas.so.13", "lib/libcublasLt.so.13", "include/cublas_v2.h"):
            _touch(site / "nvidia" / "cu13" / f)
    bin_dir = tmp_path / "bin"
    _touch(bin_dir / "nvcc").write_text(FAKE_NVCC.format(top=top))
    (bin_dir / "nvcc").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(site), LOGS=str(tmp_path / "logs"))
    r = subprocess.run(["bash", str(repo / "cpp_patches" / "cuda" / "gpu_session.sh"), "--one", "build"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rc = repo / "build" / "cuda-build.rc"
    deadline = time.monotonic() + 60
    while not rc.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rc.read_text().strip() == "0", (repo / "build" / "cuda-build.log").read_text()
    argv = json.loads((repo / "build" / "tree-argv.json").read_text())
    assert argv[:3] == ["build", "build/cuda-src", "build/cuda"] and "--portable-cpu" in argv
    assert argv[argv.index("--targets") + 1:] == ["test-backend-ops", "llama-bench", "llama-perplexity"]
    extra = [a for a in argv if a.startswith("--cmake-arg")]
    if toolkit == "full":
        assert extra == [] and "" not in argv
    else:
        wheel = site / "nvidia" / "cu13"
        assert extra == [f"--cmake-arg=-DCUDA_cublas_LIBRARY={wheel / 'lib' / 'libcublas.so.13'}",
                         f"--cmake-arg=-DCUDA_cublasLt_LIBRARY={wheel / 'lib' / 'libcublasLt.so.13'}",
                         f"--cmake-arg=-DCMAKE_CUDA_FLAGS=-I{wheel / 'include'}"]
        assert "CMake arguments for this toolkit" in r.stdout


def _standin_fla(tmp_path: Path, monkeypatch) -> Path:
    site = standin_fla.install(tmp_path)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("STANDIN_LOG", str(log))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.delenv("FLA_CACHE_RESULTS", raising=False)
    return log


def test_fla_warm_calls_fla_once_per_variant_in_parallel_processes(tmp_path, monkeypatch):
    """fla_warm.py calls FLA once per shape and dtype of the timed run (run_harness --fla), each in
    a process of its own, all at once, with FLA's autotuning results kept out of Triton's cache,
    and reports the kernels the shared cache gained. (That its calls are those the timed run makes
    is tested with the harness on the CPU emulator, tests/test_gdn_cuda_emulated.py.)"""
    import run_harness

    log = _standin_fla(tmp_path, monkeypatch)
    monkeypatch.setenv("STANDIN_SLEEP", "2")
    p = subprocess.run([sys.executable, str(CUDA / "fla_warm.py"), "--device", "cpu"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    warm, lines = standin_fla.calls(log), p.stdout.splitlines()
    pids = {c["pid"] for c in warm}
    assert len(warm) == 6 and len(pids) == 6 and os.getpid() not in pids
    assert {c["fla_cache_results"] for c in warm} == {"0"}
    heads = {(c["args"][0][0][2], c["args"][2][0][2], c["args"][0][1]) for c in warm}   # H_k, H_v, dtype
    acc = run_harness.FLA_ACCURACY_SHAPE
    assert heads == {(H_k, H_v, "torch." + dt) for _n, H_k, H_v in run_harness.BENCH_SHAPES + (("", acc["H_k"], acc["H_v"]),)
                     for dt in run_harness.FLA_DTYPES}
    spans = sorted((c["start"], c["end"]) for c in warm)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans   # one began before another ended
    assert sum(" ok in " in line for line in lines) == 6 and lines[-1].startswith("warm: 6 of 6 variants in ")
    assert lines[-1].endswith(f"({tmp_path / 'triton-cache'}) went from 0 to 6 compiled kernels"), lines


def test_fla_warm_names_a_variant_that_failed_and_keeps_the_others(tmp_path, monkeypatch):
    log = _standin_fla(tmp_path, monkeypatch)
    monkeypatch.setenv("STANDIN_FAIL_DTYPE", "torch.bfloat16")
    p = subprocess.run([sys.executable, str(CUDA / "fla_warm.py"), "--device", "cpu", "--jobs", "3"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    failed = [line for line in p.stdout.splitlines() if ": FAILED (exit 1) in " in line]
    assert len(failed) == 3 and all("bfloat16" in line for line in failed), p.stdout
    assert "RuntimeError: PTXASError: stand-in failure for torch.bfloat16" in p.stdout
    assert len(log.read_text().splitlines()) == 3
    assert p.stdout.splitlines()[-1].startswith("warm: 3 of 6 variants in ")


def test_the_e2e_step_imports_the_installed_toolkit_not_the_source_folder(tmp_path):
    """On the device the toolkit is a wheel installed with --target (python_env), and the steps run
    from the repository root, where the folder qwen35/ holds only the package's top (pyproject maps
    converter/ and bindings/ into it): `python3 -m pytest` puts the current folder first on sys.path,
    and the end-to-end test's `import qwen35.converter` then failed. The e2e step runs Python with -P.
    Here the device's condition is made with -S (no editable install's finder) and the wheel."""
    whl = tmp_path / "whl"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(whl),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    *map(str, whl.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    libs = [p for p in sys.path if p.endswith("site-packages")]   # numpy, gguf, ...; its .pth files stay unread
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *libs]))
    env.pop("PYTHONSAFEPATH", None)
    code = "import qwen35.converter.convert, qwen35.bindings.native; print(qwen35.__file__)"

    def python(*flags):
        return subprocess.run([sys.executable, "-S", *flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    shadowed = python()
    assert shadowed.returncode != 0 and "No module named 'qwen35.converter'" in shadowed.stderr, shadowed
    safe = python("-P")
    assert safe.returncode == 0, safe.stderr
    assert safe.stdout.strip() == str(site / "qwen35" / "__init__.py")
    body = re.search(r"^step_e2e\(\) \{.*?^\}", (CUDA / "gpu_session.sh").read_text(), re.S | re.M).group(0)
    assert re.search(r"\bpython3 -P -m pytest\b", body), body


def test_the_harness_arch_comes_from_nvidia_smi_and_defaults_to_the_h100(tmp_path, monkeypatch):
    """run_harness compiles for the GPU nvidia-smi names (8.9 -> 89, 9.0 -> 90a); with no
    nvidia-smi at all (no driver tools) it compiles for the H100 and require_device says the rest."""
    import run_harness

    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_harness.gpu_arch() == "90a"
    smi = tmp_path / "nvidia-smi"
    for cap, arch in (("8.9", "89"), ("9.0", "90a"), ("12.0", "120")):
        smi.write_text(f"#!/bin/sh\necho {cap}\n")
        smi.chmod(0o755)
        assert run_harness.gpu_arch() == arch, cap


def test_fla_warm_stops_a_variant_at_its_timeout(tmp_path, monkeypatch):
    _standin_fla(tmp_path, monkeypatch)
    monkeypatch.setenv("STANDIN_SLEEP", "120")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(CUDA / "fla_warm.py"), "--device", "cpu", "--timeout", "3"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and time.monotonic() - t0 < 60, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert sum(": FAILED (timed out after 3 s) in " in line for line in lines) == 6, p.stdout
    assert lines[-1].startswith("warm: 0 of 6 variants in ")


def test_the_harness_steps_ask_run_harness_for_what_they_are_for():
    """Each harness step's command line in gpu_session.sh, parsed by run_harness.py's own
    argument parser (a typo there would cost a device call): bench times the variant builds
    (16 warps, 1xTF32) and sweeps the threshold, fla adds FLA without repeating either,
    precision builds the 1xTF32 probe, check runs the correctness grid, sanitize the quick cases."""
    import shlex

    import run_harness

    text = (CUDA / "gpu_session.sh").read_text().replace("\\\n", " ")
    steps = {}
    for name, body in re.findall(r"^step_(\w+)\(\) \{\n(.*?)^\}", text, re.S | re.M):
        for line in body.splitlines():
            if "run_harness.py" in line:
                words = shlex.split(line.split("|")[0].split(">")[0].replace('"$LOGS', '"/tmp/logs'))
                steps[name] = run_harness.parser().parse_args(words[words.index("cpp_patches/cuda/run_harness.py") + 1:])
    assert set(steps) == {"check", "bench", "fla", "precision", "sanitize"}, sorted(steps)
    bench, fla, precision = steps["bench"], steps["fla"], steps["precision"]
    assert bench.bench and not bench.fla and bench.variant == list(run_harness.VARIANTS) and not bench.no_sweep
    assert bench.no_check and set(bench.variant) == {"nw16", "1xtf32"}
    assert fla.bench and fla.fla and fla.variant == [] and fla.no_sweep and fla.no_check
    assert precision.precision and not precision.bench
    assert not steps["check"].no_check and not steps["check"].quick and not steps["check"].bench
    assert steps["sanitize"].quick
    assert all(s.json is None or s.json.parent == Path("/tmp/logs") for s in steps.values())
