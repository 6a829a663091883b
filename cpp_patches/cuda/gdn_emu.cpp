// The chunked GATED_DELTA_NET CUDA kernels (gated_delta_net_chunked.cuh) compiled as plain C++
// and run on the CPU by simt_emu.h. Driven from Python (cpp_patches/cuda/emulate.py); it also
// exports the GPU harness's entry points (gdn_harness.cu) over host memory, so that
// run_harness.py's correctness pass and benchmark run here unchanged:
//   g++ -O2 -std=c++17 -shared -fPIC -DGDN_CHUNKED_EMULATE -I cpp_patches/cuda
//       -o libgdn_emu.so cpp_patches/cuda/gdn_emu.cpp  (one command)
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simt_emu.h"

namespace simt {
inline bool fast_math = false;
}

namespace gdn_chunked {
// ggml's CUDA backend is built with -use_fast_math, where expf is __expf: ex2.approx of
// x * log2(e) rounded to float (relative error ~|x| * 2^-24), results below FLT_MIN flushed.
inline float expf(float x) {
    if (!simt::fast_math) return ::expf(x);
    const float r = ::exp2f(x * 1.44269504088896341f);
    return r < FLT_MIN ? 0.0f : r;
}
} // namespace gdn_chunked

#include "gated_delta_net_chunked.cuh"
#include "gdn_driver.h"

namespace {
float * guarded_copy(const float * src, int64_t n, const char * name) {
    float * p = (float *) simt::alloc_guarded((size_t) n * sizeof(float), name);
    memcpy(p, src, (size_t) n * sizeof(float));
    simt::protect_readonly(p, (size_t) n * sizeof(float));
    return p;
}

float * guarded_nan(int64_t n, const char * name) {
    float * p = (float *) simt::alloc_guarded((size_t) n * sizeof(float), name);
    memset(p, 0xff, (size_t) n * sizeof(float));
    return p;
}
} // namespace

extern "C" {

// sizes[]: floats in q (= k), v, g (= beta), state, out; strides[]: sq1 sq2 sq3 sv1 sv2 sv3 sb1 sb2 sb3.
// out and state_out receive the kernel's results (out holds T_out tokens; tokens >= T stay NaN
// unless the kernel wrote them). order: thread schedule (simt::schedule_order); async_early:
// cp.async copies land at issue instead of at the wait. Returns 0, or the launch's cudaError_t.
int gdn_emu_run(const float * q, const float * k, const float * v, const float * g, const float * beta,
                const float * state, float * out, float * state_out, const int64_t * sizes,
                const int64_t * strides, int64_t S, int64_t H, int64_t H_k, int64_t T, int64_t T_out,
                int64_t B, int64_t rq3, int order, int fast_math, int bv, int async_early) {
    simt::schedule_order = order;
    simt::cp_async_early = async_early != 0;
    simt::fast_math = fast_math != 0;
    const gdn_chunked::params p = gdn_driver_params(
        guarded_copy(q, sizes[0], "q"), guarded_copy(k, sizes[0], "k"), guarded_copy(v, sizes[1], "v"),
        guarded_copy(g, sizes[2], "g"), guarded_copy(beta, sizes[2], "beta"), guarded_copy(state, sizes[3], "state_in"),
        guarded_nan(sizes[4], "out"), guarded_nan(sizes[3], "state_out"),
        guarded_nan((int64_t) gdn_chunked::scratch_floats(T, H, B), "scratch"), strides, S, H, H_k, T, T_out, B, rq3);
    const cudaError_t err = gdn_chunked::launch(p, S, nullptr, bv);
    if (err == cudaSuccess) {
        memcpy(out, p.out, (size_t) sizes[4] * sizeof(float));
        memcpy(state_out, p.state_out, (size_t) sizes[3] * sizeof(float));
    }
    simt::free_guarded_all();
    return (int) err;
}

// The following calls emulate a device of n_sm multiprocessors with smem_optin bytes of opt-in
// shared memory per block and smem_per_sm per multiprocessor (gdn_emu_reset_device: the H100).
void gdn_emu_set_device(int n_sm, int smem_optin, int smem_per_sm) {
    simt::device.n_sm = n_sm;
    simt::device.smem_optin = smem_optin;
    simt::device.smem_per_sm = smem_per_sm;
}

void gdn_emu_reset_device(void) { simt::device = simt::device_limits{}; }

// gdn_chunked::usable: whether ggml's dispatcher takes the chunked path for head size S on a
// device of compute capability cc with smem_optin bytes of opt-in shared memory per block.
int gdn_emu_usable(int64_t S, int cc, int64_t smem_optin) {
    return gdn_chunked::usable(S, cc, (size_t) smem_optin) ? 1 : 0;
}

// The BV the launch chooses on an emulated device of n_sm multiprocessors, smem_optin bytes of
// opt-in shared memory per block and smem_per_sm per multiprocessor.
int gdn_emu_choose_bv(int64_t S, int64_t H, int64_t B, int n_sm, int smem_optin, int smem_per_sm) {
    const simt::device_limits saved = simt::device;
    simt::device.n_sm = n_sm;
    simt::device.smem_optin = smem_optin;
    simt::device.smem_per_sm = smem_per_sm;
    const int bv = gdn_driver_choose_bv(S, H, B);
    simt::device = saved;
    return bv;
}

// ---------------------------------------------------------------------------------------------
// The entry points of gdn_harness.cu, on the emulator: "device" memory is host memory, the
// device is simt::device (sm_90 with its limits), launches run at once (schedule 0, fast math).

size_t gdn_harness_scratch_floats(int64_t T, int64_t H, int64_t B) { return gdn_chunked::scratch_floats(T, H, B); }

int gdn_harness_chunk_tokens(void) { return gdn_chunked::C; }

int gdn_harness_warps(void) { return gdn_chunked::NW; }

int gdn_harness_choose_bv(int64_t S, int64_t H, int64_t B) { return gdn_driver_choose_bv(S, H, B); }

int gdn_harness_usable(int64_t S, int bv) {
    return gdn_driver_usable(S, bv, 900, (size_t) simt::device.smem_optin) ? 1 : 0;
}

int gdn_harness_run_stage(const float * q, const float * k, const float * v, const float * g, const float * beta,
                          const float * state, float * out, float * state_out, float * scratch,
                          const int64_t * strides, int64_t S, int64_t H, int64_t H_k, int64_t T, int64_t T_out,
                          int64_t B, int64_t rq3, int bv, int stage, void *) {
    simt::schedule_order = 0;
    simt::cp_async_early = false;
    simt::fast_math = true;
    const gdn_chunked::params p = gdn_driver_params(q, k, v, g, beta, state, out, state_out, scratch, strides, S, H,
                                                    H_k, T, T_out, B, rq3);
    gdn_chunked::stage which;
    if (!gdn_driver_stage(stage, which)) return (int) cudaErrorInvalidValue;
    return (int) gdn_chunked::launch(p, S, nullptr, bv, which);
}

int gdn_harness_run(const float * q, const float * k, const float * v, const float * g, const float * beta,
                    const float * state, float * out, float * state_out, float * scratch, const int64_t * strides,
                    int64_t S, int64_t H, int64_t H_k, int64_t T, int64_t T_out, int64_t B, int64_t rq3, int bv,
                    void * stream) {
    return gdn_harness_run_stage(q, k, v, g, beta, state, out, state_out, scratch, strides, S, H, H_k, T, T_out, B,
                                 rq3, bv, 0, stream);
}

// In place of llama.cpp's token-sequential CUDA kernel: the same recurrence, token by token in
// float32 from the op's definition (state stored transposed, M[col][i] = S[i][col]; value head h
// reads key head h % H_k of q/k sequence seq / rq3; output scaled by 1/sqrt(S)).
int gdn_harness_run_upstream(const float * q, const float * k, const float * v, const float * g,
                             const float * beta, const float * state, float * out, float * state_out,
                             const int64_t * sd, int64_t S, int64_t H, int64_t H_k, int64_t T, int64_t B,
                             int64_t rq3, void *) {
    if (S != 64 && S != 128) return (int) cudaErrorInvalidValue;
    const float scale = 1.0f / sqrtf((float) S);
    std::vector<float> M((size_t) (S * S));
    for (int64_t seq = 0; seq < B; seq++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t iq1 = h % H_k, iq3 = seq / rq3;
            const int64_t st = (seq * H + h) * S * S;
            std::copy(state + st, state + st + S * S, M.begin());
            for (int64_t t = 0; t < T; t++) {
                const float * q_t = q + iq3 * sd[2] + t * sd[1] + iq1 * sd[0];
                const float * k_t = k + iq3 * sd[2] + t * sd[1] + iq1 * sd[0];
                const float * v_t = v + seq * sd[5] + t * sd[4] + h * sd[3];
                const int64_t gb = seq * sd[8] + t * sd[7] + h * sd[6];
                const float decay = ::expf(g[gb]);
                float * o = out + ((seq * T + t) * H + h) * S;
                for (int64_t col = 0; col < S; col++) {
                    float * m = M.data() + col * S;
                    float kv = 0.0f;
                    for (int64_t i = 0; i < S; i++) kv += m[i] * k_t[i];
                    const float delta = (v_t[col] - decay * kv) * beta[gb];
                    float acc = 0.0f;
                    for (int64_t i = 0; i < S; i++) {
                        m[i] = decay * m[i] + k_t[i] * delta;
                        acc += m[i] * q_t[i];
                    }
                    o[col] = acc * scale;
                }
            }
            std::copy(M.begin(), M.end(), state_out + st);
        }
    }
    return (int) cudaSuccess;
}

int gdn_harness_alloc(void ** p, size_t bytes) {
    *p = malloc(bytes);
    return *p ? (int) cudaSuccess : 2;   // cudaErrorMemoryAllocation
}
int gdn_harness_free(void * p) { free(p); return (int) cudaSuccess; }
int gdn_harness_upload(void * dst, const void * src, size_t bytes) {
    memcpy(dst, src, bytes);
    return (int) cudaSuccess;
}
int gdn_harness_download(void * dst, const void * src, size_t bytes) {
    memcpy(dst, src, bytes);
    return (int) cudaSuccess;
}
int gdn_harness_fill_nan(void * p, size_t bytes) { memset(p, 0xff, bytes); return (int) cudaSuccess; }
int gdn_harness_device_count(int * n) { *n = 1; return (int) cudaSuccess; }
int gdn_harness_sync(void) { return (int) cudaSuccess; }
int gdn_harness_last_error(void) { return (int) cudaGetLastError(); }
const char * gdn_harness_error(int err) { return err == 0 ? "no error" : "emulated CUDA error"; }

} // extern "C"
