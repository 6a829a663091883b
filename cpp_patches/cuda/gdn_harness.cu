// Standalone driver for the chunked GATED_DELTA_NET CUDA kernel: compiles in seconds, no ggml.
// Built as a shared library and driven from Python (cpp_patches/cuda/run_harness.py), which
// owns device memory (torch) and compares with the numpy reference.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//        -I cpp_patches/cuda -o libgdn_harness.so gdn_harness.cu
#include "gated_delta_net_chunked.cuh"

extern "C" size_t gdn_harness_scratch_floats(int64_t T, int64_t H, int64_t B) {
    return gdn_chunked::scratch_floats(T, H, B);
}

// Contiguous inputs in ggml layout: q,k [S,H_k,T,B_qk], v [S,H,T,B], g,beta [1,H,T,B],
// state [S,S,H,B]; out [S,H,T,B]; state_out [S,S,H,B]. Returns a cudaError_t.
extern "C" int gdn_harness_run(const float * q, const float * k, const float * v, const float * g,
                               const float * beta, const float * state, float * out, float * state_out,
                               float * scratch, int64_t S, int64_t H, int64_t H_k, int64_t T,
                               int64_t B, int64_t B_qk, void * stream) {
    gdn_chunked::params p{};
    p.q = q; p.k = k; p.v = v; p.g = g; p.beta = beta; p.state_in = state;
    p.out = out; p.state_out = state_out;
    const size_t per = (size_t) B * H * gdn_chunked::n_chunks(T) * gdn_chunked::C * gdn_chunked::C;
    p.Tm = scratch; p.QKm = scratch + per; p.cum = scratch + 2 * per;
    p.H = H; p.H_k = H_k; p.T = T; p.T_out = T; p.n_seqs = B; p.rq3 = B / B_qk;
    p.sq1 = S; p.sq2 = S * H_k; p.sq3 = S * H_k * T;
    p.sv1 = S; p.sv2 = S * H;   p.sv3 = S * H * T;
    p.sb1 = 1; p.sb2 = H;       p.sb3 = H * T;
    p.scale = 1.0f / sqrtf((float) S);
    return (int) gdn_chunked::launch(p, S, (cudaStream_t) stream);
}
