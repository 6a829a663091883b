// Standalone driver for the chunked GATED_DELTA_NET CUDA kernel: compiles in seconds, without
// the rest of ggml-cuda. Built as a shared library and driven from Python
// (cpp_patches/cuda/run_harness.py), which compares with the numpy reference. Same call as the
// CPU emulator's driver (gdn_emu.cpp), on device pointers. Beside it, llama.cpp's own
// token-sequential kernel (gated_delta_net_cuda, taken from the tree's ggml-cuda/gated_delta_net.cu
// into gdn_upstream_kernel.cuh by run_harness.py), so both run on the same buffers in one process:
//   nvcc -O3 -std=c++17 -use_fast_math -extended-lambda -gencode=arch=compute_90a,code=sm_90a \
//        -shared -Xcompiler -fPIC -I cpp_patches/cuda -I <dir of gdn_upstream_kernel.cuh> \
//        -I <llama.cpp>/ggml/src -I <llama.cpp>/ggml/include -o libgdn_harness.so gdn_harness.cu
#include "ggml-cuda/common.cuh"
#include "gated_delta_net_chunked.cuh"
#include "gdn_driver.h"
#include "gdn_upstream_kernel.cuh"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

// common.cuh's checks call ggml_abort, which lives in libggml-base; the harness links no ggml.
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "%s:%d: ", file, line);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    va_end(args);
    abort();
}

extern "C" size_t gdn_harness_scratch_floats(int64_t T, int64_t H, int64_t B) {
    return gdn_chunked::scratch_floats(T, H, B);
}

// Tokens per chunk: the state pass walks ceil(T / this) chunks one after another.
extern "C" int gdn_harness_chunk_tokens(void) { return gdn_chunked::C; }

// Warps per block this build's kernels run with (GDN_CHUNKED_NW; ggml's: 8).
extern "C" int gdn_harness_warps(void) { return gdn_chunked::NW; }

// The BV the launch would choose on this device for H heads and B sequences of head size S.
extern "C" int gdn_harness_choose_bv(int64_t S, int64_t H, int64_t B) { return gdn_driver_choose_bv(S, H, B); }

// Whether this device runs the kernels for head size S with value-column tile bv (0: the
// launch's choice): usable() as ggml's dispatcher asks it, and room for a forced 64-column tile.
extern "C" int gdn_harness_usable(int64_t S, int bv) {
    int dev = 0, major = 0, minor = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        (void) cudaGetLastError();
        return 0;
    }
    return gdn_driver_usable(S, bv, 100 * major + 10 * minor, (size_t) optin) ? 1 : 0;
}

// strides (host array, in floats): sq1 sq2 sq3 sv1 sv2 sv3 sb1 sb2 sb3 (ggml's nb / 4).
// out holds T_out tokens per sequence; the kernel writes tokens [0, T). bv: value columns per
// state-pass block (32, 64; 0 = the launch's own choice). stage (gdn_driver_stage): 0 both
// kernels, as ggml runs them; 1 the prep kernel alone, 2 the state pass alone (it reads the
// scratch an earlier launch on the same buffers left), to time them apart. Returns a cudaError_t.
extern "C" int gdn_harness_run_stage(const float * q, const float * k, const float * v, const float * g,
                                     const float * beta, const float * state, float * out, float * state_out,
                                     float * scratch, const int64_t * strides, int64_t S, int64_t H, int64_t H_k,
                                     int64_t T, int64_t T_out, int64_t B, int64_t rq3, int bv, int stage,
                                     void * stream) {
    const gdn_chunked::params p = gdn_driver_params(q, k, v, g, beta, state, out, state_out, scratch, strides, S, H,
                                                    H_k, T, T_out, B, rq3);
    gdn_chunked::stage which;
    if (!gdn_driver_stage(stage, which)) return (int) cudaErrorInvalidValue;
    return (int) gdn_chunked::launch(p, S, (cudaStream_t) stream, bv, which);
}

// Both kernels (stage 0).
extern "C" int gdn_harness_run(const float * q, const float * k, const float * v, const float * g,
                               const float * beta, const float * state, float * out, float * state_out,
                               float * scratch, const int64_t * strides, int64_t S, int64_t H, int64_t H_k,
                               int64_t T, int64_t T_out, int64_t B, int64_t rq3, int bv, void * stream) {
    return gdn_harness_run_stage(q, k, v, g, beta, state, out, state_out, scratch, strides, S, H, H_k, T, T_out, B,
                                 rq3, bv, 0, stream);
}

template <int S>
static void launch_upstream(const float * q, const float * k, const float * v, const float * g, const float * beta,
                            const float * state, float * out, float * state_out, const int64_t * sd, int64_t H,
                            int64_t H_k, int64_t T, int64_t B, int64_t rq3, cudaStream_t stream) {
    const int num_warps = 4;   // as ggml-cuda launches it: one value column per warp, K = 1
    const dim3 grid((unsigned) H, (unsigned) B, (unsigned) ((S + num_warps - 1) / num_warps));
    const dim3 block(32, num_warps, 1);
    gated_delta_net_cuda<S, false, false><<<grid, block, 0, stream>>>(
        q, k, v, g, beta, state, out, state_out, H, T, B, sd[0], sd[1], sd[2], sd[3], sd[4], sd[5], sd[6], sd[7],
        sd[8], init_fastdiv_values((uint64_t) H_k), init_fastdiv_values((uint64_t) rq3), 1.0f / sqrtf((float) S),
        (int64_t) 0, 1);
}

// llama.cpp's token-sequential kernel on the same buffers (no snapshots). out holds exactly T
// tokens per sequence, as that kernel lays it out. S 64 or 128. Returns a cudaError_t.
extern "C" int gdn_harness_run_upstream(const float * q, const float * k, const float * v, const float * g,
                                        const float * beta, const float * state, float * out, float * state_out,
                                        const int64_t * strides, int64_t S, int64_t H, int64_t H_k, int64_t T,
                                        int64_t B, int64_t rq3, void * stream) {
    const cudaStream_t st = (cudaStream_t) stream;
    if (S == 64) {
        launch_upstream<64>(q, k, v, g, beta, state, out, state_out, strides, H, H_k, T, B, rq3, st);
    } else if (S == 128) {
        launch_upstream<128>(q, k, v, g, beta, state, out, state_out, strides, H, H_k, T, B, rq3, st);
    } else {
        return (int) cudaErrorInvalidValue;
    }
    return (int) cudaGetLastError();
}

// Device memory for the correctness checks, so they need no framework (torch is only used by
// the benchmark, for FLA). Each returns a cudaError_t.
extern "C" int gdn_harness_alloc(void ** p, size_t bytes) { return (int) cudaMalloc(p, bytes); }
extern "C" int gdn_harness_free(void * p) { return (int) cudaFree(p); }
extern "C" int gdn_harness_upload(void * dst, const void * src, size_t bytes) {
    return (int) cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
}
extern "C" int gdn_harness_download(void * dst, const void * src, size_t bytes) {
    return (int) cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
}
extern "C" int gdn_harness_fill_nan(void * p, size_t bytes) { return (int) cudaMemset(p, 0xff, bytes); }
extern "C" int gdn_harness_device_count(int * n) { return (int) cudaGetDeviceCount(n); }
extern "C" int gdn_harness_sync(void) { return (int) cudaDeviceSynchronize(); }
extern "C" int gdn_harness_last_error(void) { return (int) cudaGetLastError(); }
extern "C" const char * gdn_harness_error(int err) { return cudaGetErrorString((cudaError_t) err); }
