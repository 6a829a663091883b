#!/usr/bin/env bash
# The GPU checks and measurements of the chunked GATED_DELTA_NET kernel, on the device machine.
#
# Here first: `make cuda-bundle` packs .device/ (the machine has no network). Then one device
# call, from the repository root (carry: [".device"], timeout_s 510):
#
#   bash cpp_patches/cuda/gpu_session.sh --budget 480 all
#
# runs every step below within 480 s (cuda/session_plan.py schedules them: a step that needs the
# CUDA build waits while it builds in the background, the next one that does not runs first; a
# step is cut at the deadline). Its output and every log land in $OUT as summary.txt, steps.json
# and gdn-logs.tar.gz, rewritten after each step, so a call cut short still returns what ran. It
# ends by naming the steps left, for a second call: `... --budget 150 build warm fla sanitize`
# (15 minutes of device time a session, the machine's start included: about 5 are left).
#
#   probe     the machine: GPU, driver, nvcc, CMake, torch, where cuBLAS comes from (always first)
#   build     unpack the patched llama.cpp (chunked kernel promoted) and start its CUDA build
#             (sm_90a; test-backend-ops, llama-bench, llama-perplexity) in the background
#   prep      in the background: a Qwen3.5-4B-shaped GGUF (synthetic weights, 32 layers, BF16)
#   check     harness: the correctness grid of cases.py on the GPU (upstream's kernel on the same
#             buffers beside it)
#   bench     harness: op time at Qwen3.5-27B / 35B-A3B shapes, T 512..32768, upstream's kernel
#             against the chunked one (both tiles; the chosen one's prep and state pass apart, and
#             its builds with 16 warps per block and with one TF32 product); then T 16..512 for
#             the chunked path's threshold
#   ops       test-backend-ops -o GATED_DELTA_NET: eval (CUDA vs CPU) and perf, chunked kernel vs
#             upstream's (GGML_CUDA_GDN_CHUNKED=0)                                  [needs build]
#   e2e       tests/test_gdn_cuda_gpu.py's end-to-end test: the trained tiny checkpoint (S_v 64)
#             as F32 GGUF, KL divergence of CUDA logits (chunked, and upstream's kernel) against
#             CPU logits (llama-perplexity)                                         [needs build]
#   model     llama-bench pp2048, pp8192, tg128 on prep's GGUF, chunked vs upstream kernel
#                                                                             [needs build, prep]
#   warm      compile FLA's Triton kernels for `fla` ahead, one process per shape and dtype at once
#             (cuda/fla_warm.py; one process would spend minutes compiling its ~200 autotuning configs)
#   fla       harness: the bench shapes again with flash-linear-attention's chunk_gated_delta_rule
#             (float32 and bfloat16 inputs) beside both kernels, on the same inputs in one process
#   precision harness: the chunked kernel as ggml runs it (3xTF32) against a build of it with one
#             TF32 product (~5e-4 relative error), times at the bench shapes and both against the
#             float64 reference. Not in `all` (bench times that build too): for a second call
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck on the harness's quick cases
#   wait      block until the background build is done (up to 9 minutes)
#
#   bash cpp_patches/cuda/gpu_session.sh --one STEP    one step in this process, no plan
set -euo pipefail
cd "$(dirname "$0")/../.."
LOGS=${LOGS:-/tmp/gdn-logs}
mkdir -p "$LOGS"
BUNDLE=.device
SRC=build/cuda-src
BLD=build/cuda
BIN=$BLD/bin
JOBS=$(nproc)
GGUF=/tmp/q35-4b-shape-bf16.gguf

if [ "${1:-}" != --one ]; then
    exec python3 cpp_patches/cuda/session_plan.py "$@"
fi

need_bundle() {
    [ -f "$BUNDLE/llama-src.tar.xz" ] || { echo "error: $BUNDLE/ is missing: run 'make cuda-bundle' here and carry .device" >&2; exit 2; }
}

python_env() {   # the carried wheels (FLA, this toolkit) and the tree's gguf-py, once per machine
    need_bundle
    if [ ! -d /tmp/site/qwen35 ]; then
        python3 -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target /tmp/site "$BUNDLE"/whl/*.whl
    fi
    unpack
    export PYTHONPATH=/tmp/site:$PWD/$SRC/vendor/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}   # warm fills it, fla reads it
}

unpack() {
    if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
        mkdir -p "$SRC/vendor"
        tar -xJf "$BUNDLE/llama-src.tar.xz" -C "$SRC/vendor"
    fi
}

step_probe() {   # every fact, then fail if there is no GPU or no way to build
    local rc=0
    nvidia-smi -L || rc=1
    nvidia-smi --query-gpu=driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
    python3 cpp_patches/cuda/device_env.py || rc=1
    return $rc
}

step_build() {
    local found args=() arg extra=""
    need_bundle
    unpack
    [ ! -f build/cuda-build.log ] || [ -f build/cuda-build.rc ] || { echo "build: already running"; return 0; }
    found=$(python3 cpp_patches/cuda/device_env.py --cmake-args)   # cuBLAS where nvcc's toolkit lacks it
    while IFS= read -r arg; do [ -z "$arg" ] || args+=("--cmake-arg=$arg"); done <<< "$found"
    if [ ${#args[@]} -gt 0 ]; then
        echo "build: CMake arguments for this toolkit: ${args[*]}"
        extra=$(printf '%q ' "${args[@]}")
    fi
    rm -f build/cuda-build.rc
    setsid bash -c "python3 cpp_patches/tree.py build $SRC $BLD --backend cuda --cuda-archs 90a --jobs $JOBS \
        --portable-cpu $extra--targets test-backend-ops llama-bench llama-perplexity; \
        echo \$? > build/cuda-build.rc" > build/cuda-build.log 2>&1 < /dev/null &
    echo "build: started in the background (build/cuda-build.log)"
}

need_build() {   # and the libraries it loads: CMake leaves nvcc's own lib folder out of the RUNPATH
    [ -x "$BIN/llama-bench" ] || { echo "error: no CUDA build in $BLD: run the build step first (see build/cuda-build.log)" >&2; return 1; }
    if ldd "$BIN/libggml-cuda.so" | grep -q "not found"; then
        LD_LIBRARY_PATH=$(python3 cpp_patches/cuda/device_env.py --lib-dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export LD_LIBRARY_PATH
        if ldd "$BIN/libggml-cuda.so" | grep "not found"; then
            echo "error: libggml-cuda.so cannot load the libraries above, not even from $LD_LIBRARY_PATH" >&2
            return 1
        fi
    fi
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
    if [ "$(cat build/cuda-build.rc)" != 0 ]; then
        echo "wait: the build failed"; tail -30 build/cuda-build.log; return 1
    fi
    echo "wait: build done"
}

step_prep() {
    python_env
    [ ! -f build/model-prep.log ] || [ -f build/model-prep.rc ] || { echo "prep: already running"; return 0; }
    rm -f build/model-prep.rc
    setsid bash -c "(set -e; ck=\$(python3 bench/convert_bench.py --make-only --layers 32 --workdir /tmp/bench \
        --tokenizer-from $BUNDLE/tokenizer); qwen35-convert \"\$ck\" -o $GGUF --type BF16 --force; rm -rf /tmp/bench); \
        echo \$? > build/model-prep.rc" > build/model-prep.log 2>&1 < /dev/null &
    echo "prep: making $GGUF in the background (build/model-prep.log)"
}

step_check() {
    need_bundle
    unpack   # upstream's kernel runs beside the chunked one in the harness
    python3 cpp_patches/cuda/run_harness.py --json "$LOGS/harness-check.json" > "$LOGS/harness-check.log" 2>&1 \
        || { grep -E "^FAIL|^error|Error" "$LOGS/harness-check.log" | head -8; tail -2 "$LOGS/harness-check.log"; return 1; }
    tail -2 "$LOGS/harness-check.log"
}

step_bench() {
    python_env
    python3 cpp_patches/cuda/run_harness.py --no-check --bench --json "$LOGS/harness-bench.json" \
        | tee "$LOGS/harness-bench.log" | grep -v '^{'
}

step_warm() {
    python_env
    python3 cpp_patches/cuda/fla_warm.py 2>&1 | tee "$LOGS/fla-warm.log"
}

step_fla() {
    python_env
    # the variant builds were timed by bench: not again here
    python3 cpp_patches/cuda/run_harness.py --no-check --bench --fla --no-sweep --variant --json "$LOGS/harness-fla.json" \
        | tee "$LOGS/harness-fla.log" | grep -v '^{'
}

step_precision() {
    python_env
    python3 cpp_patches/cuda/run_harness.py --no-check --precision --json "$LOGS/harness-precision.json" \
        | tee "$LOGS/harness-precision.log" | grep -v '^{'
}

step_sanitize() {
    local rc=0 tool
    need_bundle
    unpack
    for tool in memcheck racecheck synccheck; do
        if compute-sanitizer --tool $tool --error-exitcode 9 python3 cpp_patches/cuda/run_harness.py --quick \
                > "$LOGS/sanitizer-$tool.log" 2>&1; then
            echo "compute-sanitizer $tool: clean"
        else
            rc=1; echo "compute-sanitizer $tool: FAILED"; grep -m5 -E "=====|ERROR|error" "$LOGS/sanitizer-$tool.log" || true
        fi
    done
    return $rc
}

step_ops() {   # a failing eval still gets its perf numbers, then fails the step
    local rc=0
    need_build
    "$BIN/test-backend-ops" -o GATED_DELTA_NET -b CUDA0 > "$LOGS/ops-eval.log" 2>&1 || rc=$?
    grep -E "passed|FAIL" "$LOGS/ops-eval.log" | tail -3 || true
    # without a working CUDA backend test-backend-ops skips every case and still says "passed"
    if ! grep -qE "^Backend [0-9]+/[0-9]+: CUDA0" "$LOGS/ops-eval.log" \
            || ! grep -qE "^  [1-9][0-9]*/[0-9]+ tests passed" "$LOGS/ops-eval.log"; then
        echo "ops: test-backend-ops tested no case on CUDA0 (see ops-eval.log)"; grep -m3 -i "cuda" "$LOGS/ops-eval.log" || true
        rc=1
    fi
    "$BIN/test-backend-ops" perf -o GATED_DELTA_NET -b CUDA0 > "$LOGS/ops-perf-chunked.log" 2>&1
    GGML_CUDA_GDN_CHUNKED=0 "$BIN/test-backend-ops" perf -o GATED_DELTA_NET -b CUDA0 > "$LOGS/ops-perf-upstream.log" 2>&1
    python3 - "$LOGS/ops-perf-chunked.log" "$LOGS/ops-perf-upstream.log" <<'EOF'
import re, sys
def read(path):
    rows = {}
    for line in open(path):
        m = re.search(r"(GATED_DELTA_NET\(.*?\)).*?([\d.]+) us/run", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows
new, old = read(sys.argv[1]), read(sys.argv[2])
both = [case for case in new if case in old]
for case in both:
    print(f"{old[case]:10.1f} us -> {new[case]:10.1f} us  {old[case] / new[case]:5.2f}x  {case}")
if not both:
    sys.exit("ops: test-backend-ops perf timed no GATED_DELTA_NET case on CUDA0 (see ops-perf-*.log)")
EOF
    [ $rc = 0 ] || echo "ops: test-backend-ops eval failed (exit $rc): see ops-eval.log"
    return $rc
}

step_e2e() {   # tests/test_gdn_cuda_gpu.py's end-to-end test on this build
    need_build
    python_env
    # -P: `python3 -m` would put this folder first on sys.path, and its qwen35/ (the package's top
    # alone: pyproject maps converter/ and bindings/ into it) would hide the installed toolkit
    QWEN35_CUDA_BIN=$PWD/$BIN QWEN35_E2E_LOGS=$LOGS python3 -P -m pytest -q -s -p no:cacheprovider \
        tests/test_gdn_cuda_gpu.py -k tiny_model 2>&1 | tee "$LOGS/e2e-pytest.log" | grep -E "vs CPU|passed|failed|skipped|Error"
}

step_model() {
    local waited=0
    need_build
    python_env
    while [ -f build/model-prep.log ] && [ ! -f build/model-prep.rc ]; do sleep 5; waited=$((waited + 5)); done
    [ $waited = 0 ] || echo "model: waited ${waited}s for prep"
    [ -f $GGUF ] || { echo "error: no $GGUF: run the prep step first (see build/model-prep.log)" >&2; tail -5 build/model-prep.log 2>/dev/null; return 1; }
    for chunked in 1 0; do
        GGML_CUDA_GDN_CHUNKED=$chunked "$BIN/llama-bench" -m $GGUF -ngl 99 -p 2048,8192 -n 128 -ub 512,2048 -r 5 \
            -o json > "$LOGS/llama-bench-chunked$chunked.json" 2> "$LOGS/llama-bench-chunked$chunked.log"
    done
    python3 - "$LOGS/llama-bench-chunked1.json" "$LOGS/llama-bench-chunked0.json" <<'EOF'
import json, statistics, sys
new, old = (json.load(open(p)) for p in sys.argv[1:3])
if not new or any(not r.get("gpu_info") for r in new + old):   # llama-bench runs on the CPU when CUDA fails
    sys.exit("model: llama-bench saw no GPU (see llama-bench-chunked*.log)")
key = lambda r: (r["n_prompt"], r["n_gen"], r["n_ubatch"])
med = lambda r: statistics.median(r["samples_ts"]) if r.get("samples_ts") else r["avg_ts"]
old = {key(r): r for r in old}
for r in new:
    o = old[key(r)]
    name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    print(f"{name:7s} ub {r['n_ubatch']:5d}: upstream kernel {med(o):9.1f} t/s, chunked {med(r):9.1f} t/s, "
          f"{med(r) / med(o):.2f}x (medians of {len(r.get('samples_ts') or [0])})")
EOF
}

case "${2:-}" in
    probe|build|prep|check|bench|warm|fla|precision|sanitize|wait|ops|e2e|model) ;;
    *) echo "error: unknown step '${2:-}' (probe build prep check bench warm fla precision sanitize wait ops e2e model)" >&2; exit 2 ;;
esac
set -E
NL=$'\n'
trap 'rc=$?; [[ $BASH_COMMAND == return* ]] || echo "  failed (exit $rc): ${BASH_COMMAND%%"$NL"*}"' ERR
"step_$2"
