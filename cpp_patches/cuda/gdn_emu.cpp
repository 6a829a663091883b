// The chunked GATED_DELTA_NET CUDA kernels (gated_delta_net_chunked.cuh) compiled as plain C++
// and run on the CPU by simt_emu.h. Driven from Python (cpp_patches/cuda/emulate.py):
//   g++ -O2 -std=c++17 -shared -fPIC -DGDN_CHUNKED_EMULATE -I cpp_patches/cuda
//       -o libgdn_emu.so cpp_patches/cuda/gdn_emu.cpp  (one command)
#include <cfloat>
#include <cmath>

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
    gdn_chunked::params p{};
    p.q = guarded_copy(q, sizes[0], "q");
    p.k = guarded_copy(k, sizes[0], "k");
    p.v = guarded_copy(v, sizes[1], "v");
    p.g = guarded_copy(g, sizes[2], "g");
    p.beta = guarded_copy(beta, sizes[2], "beta");
    p.state_in = guarded_copy(state, sizes[3], "state_in");
    p.out = guarded_nan(sizes[4], "out");
    p.state_out = guarded_nan(sizes[3], "state_out");
    p.H = H; p.H_k = H_k; p.T = T; p.T_out = T_out; p.n_seqs = B; p.rq3 = rq3;
    gdn_chunked::bind_scratch(p, guarded_nan((int64_t) gdn_chunked::scratch_floats(T, H, B), "scratch"));
    p.sq1 = strides[0]; p.sq2 = strides[1]; p.sq3 = strides[2];
    p.sv1 = strides[3]; p.sv2 = strides[4]; p.sv3 = strides[5];
    p.sb1 = strides[6]; p.sb2 = strides[7]; p.sb3 = strides[8];
    p.scale = 1.0f / sqrtf((float) S);
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
    const int bv = S == 64 ? gdn_chunked::choose_bv_here<64>(H, B) : gdn_chunked::choose_bv_here<128>(H, B);
    simt::device = saved;
    return bv;
}

} // extern "C"
