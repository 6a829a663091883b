#!/usr/bin/env bash
# The GPU checks and measurements of the chunked GATED_DELTA_NET kernel, on the device machine.
#
# Here first: `make cuda-bundle` packs .device/ (the machine has no network). Then, from the
# repository root on the device (carry: [".device"]), give one or more steps per call:
#
#   build   unpack the patched llama.cpp (chunked kernel promoted) and start its CUDA build
#           (sm_90a; test-backend-ops, llama-bench, llama-perplexity) in the background
#   check   harness: the correctness grid of cases.py on the GPU (upstream's kernel on the same
#           buffers beside it), then compute-sanitizer (memcheck, racecheck, synccheck) on the
#           quick cases
#   bench   harness: op time at Qwen3.5-27B / 35B-A3B shapes, T 512..32768: upstream's kernel,
#           the chunked one (both tiles) and flash-linear-attention's chunk_gated_delta_rule,
#           on the same inputs in one process; then T 16..512 for the chunked path's threshold
#   wait    block until the background build is done (up to 9 minutes; call again if it is not)
#   ops     test-backend-ops -o GATED_DELTA_NET: eval (CUDA vs CPU) and perf, chunked kernel vs
#           upstream's (GGML_CUDA_GDN_CHUNKED=0)
#   e2e     tests/test_gdn_cuda_gpu.py's end-to-end test: the trained tiny checkpoint (S_v 64)
#           as F32 GGUF, KL divergence of CUDA logits (chunked, and upstream's kernel) against
#           CPU logits (llama-perplexity)
#   model   a Qwen3.5-4B-shaped GGUF (synthetic weights, 32 layers, BF16); llama-bench pp2048,
#           pp8192, tg128, chunked vs upstream kernel
#
# A plan that fits one 30-minute lease (the machine goes back 30 s after a call returns):
#   call 1: build check bench     call 2: wait ops e2e     call 3: model
# Everything lands in $OUT (logs, JSON); the summary lines are printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gdn-out}
mkdir -p "$OUT"
BUNDLE=.device
SRC=build/cuda-src
BLD=build/cuda
BIN=$BLD/bin
JOBS=$(nproc)

need_bundle() {
    [ -f "$BUNDLE/llama-src.tar.xz" ] || { echo "error: $BUNDLE/ is missing: run 'make cuda-bundle' here and carry .device" >&2; exit 2; }
}

python_env() {   # the carried wheels (FLA, this toolkit) and the tree's gguf-py, once per machine
    need_bundle
    if [ ! -d /tmp/site/qwen35 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$BUNDLE"/whl/*.whl
    fi
    unpack
    export PYTHONPATH=/tmp/site:$PWD/$SRC/vendor/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
}

unpack() {
    if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
        mkdir -p "$SRC/vendor"
        tar -xJf "$BUNDLE/llama-src.tar.xz" -C "$SRC/vendor"
    fi
}

step_build() {
    need_bundle
    unpack
    rm -f build/cuda-build.rc
    setsid bash -c "python3 cpp_patches/tree.py build $SRC $BLD --backend cuda --cuda-archs 90a --jobs $JOBS \
        --targets test-backend-ops llama-bench llama-perplexity; echo \$? > build/cuda-build.rc" \
        > build/cuda-build.log 2>&1 < /dev/null &
    echo "build: started in the background (build/cuda-build.log)"
}

need_build() {
    [ -x "$BIN/llama-bench" ] || { echo "error: no CUDA build in $BLD: run the build and wait steps first" >&2; return 1; }
}

step_wait() {
    local waited=0
    [ -f build/cuda-build.log ] || { echo "error: no build was started on this machine: run the build step first" >&2; return 1; }
    while [ ! -f build/cuda-build.rc ]; do
        if [ $waited -ge 540 ]; then
            echo "wait: the build is still running after ${waited}s; call 'wait' again"; tail -3 build/cuda-build.log
            return 1
        fi
        sleep 10; waited=$((waited + 10))
    done
    cp build/cuda-build.log "$OUT/"
    if [ "$(cat build/cuda-build.rc)" != 0 ]; then
        echo "wait: the build failed"; tail -30 build/cuda-build.log; return 1
    fi
    echo "wait: build done"
}

step_check() {   # a failing grid still gets the sanitizers' word
    local rc=0
    need_bundle
    unpack   # upstream's kernel runs beside the chunked one in the harness
    python3 cpp_patches/cuda/run_harness.py --json "$OUT/harness-check.json" > "$OUT/harness-check.log" 2>&1 || rc=$?
    grep -E "^FAIL|^error" "$OUT/harness-check.log" | head -5 || true
    tail -1 "$OUT/harness-check.log"
    for tool in memcheck racecheck synccheck; do
        if compute-sanitizer --tool $tool --error-exitcode 9 python3 cpp_patches/cuda/run_harness.py --quick \
                > "$OUT/sanitizer-$tool.log" 2>&1; then
            echo "compute-sanitizer $tool: clean"
        else
            rc=1; echo "compute-sanitizer $tool: FAILED"; grep -m5 -E "=====|ERROR" "$OUT/sanitizer-$tool.log" || true
        fi
    done
    return $rc
}

step_bench() {
    python_env
    python3 cpp_patches/cuda/run_harness.py --no-check --bench --fla --json "$OUT/harness-bench.json" \
        | tee "$OUT/harness-bench.log" | grep -v '^{'
}

step_ops() {   # a failing eval still gets its perf numbers, then fails the step
    local rc=0
    need_build
    "$BIN/test-backend-ops" -o GATED_DELTA_NET -b CUDA0 > "$OUT/ops-eval.log" 2>&1 || rc=$?
    grep -E "passed|FAIL" "$OUT/ops-eval.log" | tail -3 || true
    "$BIN/test-backend-ops" perf -o GATED_DELTA_NET -b CUDA0 > "$OUT/ops-perf-chunked.log" 2>&1
    GGML_CUDA_GDN_CHUNKED=0 "$BIN/test-backend-ops" perf -o GATED_DELTA_NET -b CUDA0 > "$OUT/ops-perf-upstream.log" 2>&1
    python3 - "$OUT/ops-perf-chunked.log" "$OUT/ops-perf-upstream.log" <<'EOF'
import re, sys
def read(path):
    rows = {}
    for line in open(path):
        m = re.search(r"(GATED_DELTA_NET\(.*?\)).*?([\d.]+) us/run", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows
new, old = read(sys.argv[1]), read(sys.argv[2])
for case in new:
    if case in old:
        print(f"{old[case]:10.1f} us -> {new[case]:10.1f} us  {old[case] / new[case]:5.2f}x  {case}")
EOF
    [ $rc = 0 ] || echo "ops: test-backend-ops eval failed (exit $rc): see ops-eval.log"
    return $rc
}

step_e2e() {   # tests/test_gdn_cuda_gpu.py's end-to-end test on this build (logs in $OUT)
    need_build
    python_env
    QWEN35_CUDA_BIN=$PWD/$BIN QWEN35_E2E_LOGS=$OUT python3 -m pytest -q -s -p no:cacheprovider \
        tests/test_gdn_cuda_gpu.py -k tiny_model 2>&1 | tee "$OUT/e2e-pytest.log" | grep -E "vs CPU|passed|failed|skipped|Error"
}

step_model() {
    need_build
    python_env
    local ck gguf=/tmp/q35-4b-shape-bf16.gguf
    ck=$(python3 bench/convert_bench.py --make-only --layers 32 --workdir /tmp/bench --tokenizer-from "$BUNDLE/tokenizer")
    qwen35-convert "$ck" -o $gguf --type BF16 --force > "$OUT/model-convert.log" 2>&1
    for chunked in 1 0; do
        GGML_CUDA_GDN_CHUNKED=$chunked "$BIN/llama-bench" -m $gguf -ngl 99 -p 2048,8192 -n 128 -ub 512,2048 -r 5 \
            -o json > "$OUT/llama-bench-chunked$chunked.json" 2> "$OUT/llama-bench-chunked$chunked.log"
    done
    python3 - "$OUT/llama-bench-chunked1.json" "$OUT/llama-bench-chunked0.json" <<'EOF'
import json, sys
new, old = (json.load(open(p)) for p in sys.argv[1:3])
key = lambda r: (r["n_prompt"], r["n_gen"], r["n_ubatch"])
old = {key(r): r for r in old}
for r in new:
    o = old[key(r)]
    name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    print(f"{name:7s} ub {r['n_ubatch']:5d}: upstream kernel {o['avg_ts']:9.1f} t/s, chunked {r['avg_ts']:9.1f} t/s, "
          f"{r['avg_ts'] / o['avg_ts']:.2f}x")
EOF
}

STEPS="build check bench wait ops e2e model"
if [ "${1:-}" = --one ]; then   # one step in its own process: its first failing command ends it
    set -E
    trap 'rc=$?; [[ $BASH_COMMAND == return* ]] || echo "  failed (exit $rc): $BASH_COMMAND"' ERR
    "step_$2"
    exit
fi
[ $# -gt 0 ] || { sed -n '2,25p' "$0"; exit 2; }
for step in "$@"; do
    case " $STEPS " in
        *" $step "*) ;;
        *) echo "error: unknown step '$step' ($STEPS)" >&2; exit 2 ;;
    esac
done
nvidia-smi -L
status=0
for step in "$@"; do   # a failed step is reported and the call goes on: device time is scarce
    echo "== $step"
    bash "$0" --one "$step" || { echo "== $step: FAILED"; status=1; }
done
exit $status
