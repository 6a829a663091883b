// Standalone driver for the chunked GATED_DELTA_NET CUDA kernel: compiles in seconds, no ggml.
// Built as a shared library and driven from Python (cpp_patches/cuda/run_harness.py), which
// owns device memory (torch) and compares with the numpy reference. Same call as the CPU
// emulator's driver (gdn_emu.cpp), on device pointers:
//   nvcc -O3 -std=c++17 -use_fast_math -gencode=arch=compute_90a,code=sm_90a -shared \
//        -Xcompiler -fPIC -I cpp_patches/cuda -o libgdn_harness.so gdn_harness.cu
#include "gated_delta_net_chunked.cuh"

extern "C" size_t gdn_harness_scratch_floats(int64_t T, int64_t H, int64_t B) {
    return gdn_chunked::scratch_floats(T, H, B);
}

// The BV the launch would choose on this device for H heads and B sequences of head size S.
extern "C" int gdn_harness_choose_bv(int64_t S, int64_t H, int64_t B) {
    return S == 64 ? gdn_chunked::choose_bv_here<64>(H, B) : gdn_chunked::choose_bv_here<128>(H, B);
}

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
    if (!gdn_chunked::usable(S, 100 * major + 10 * minor, (size_t) optin)) return 0;
    return bv != 64 || (S == 128 && gdn_chunked::state_smem<128, 64>() <= (size_t) optin);
}

// strides (host array, in floats): sq1 sq2 sq3 sv1 sv2 sv3 sb1 sb2 sb3 (ggml's nb / 4).
// out holds T_out tokens per sequence; the kernel writes tokens [0, T). bv: value columns per
// state-pass block (32, 64; 0 = the launch's own choice). Returns a cudaError_t.
extern "C" int gdn_harness_run(const float * q, const float * k, const float * v, const float * g,
                               const float * beta, const float * state, float * out, float * state_out,
                               float * scratch, const int64_t * strides, int64_t S, int64_t H, int64_t H_k,
                               int64_t T, int64_t T_out, int64_t B, int64_t rq3, int bv, void * stream) {
    gdn_chunked::params p{};
    p.q = q; p.k = k; p.v = v; p.g = g; p.beta = beta; p.state_in = state;
    p.out = out; p.state_out = state_out;
    p.H = H; p.H_k = H_k; p.T = T; p.T_out = T_out; p.n_seqs = B; p.rq3 = rq3;
    gdn_chunked::bind_scratch(p, scratch);
    p.sq1 = strides[0]; p.sq2 = strides[1]; p.sq3 = strides[2];
    p.sv1 = strides[3]; p.sv2 = strides[4]; p.sv3 = strides[5];
    p.sb1 = strides[6]; p.sb2 = strides[7]; p.sb3 = strides[8];
    p.scale = 1.0f / sqrtf((float) S);
    return (int) gdn_chunked::launch(p, S, (cudaStream_t) stream, bv);
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
extern "C" int gdn_harness_sync(void) { return (int) cudaDeviceSynchronize(); }
extern "C" int gdn_harness_last_error(void) { return (int) cudaGetLastError(); }
extern "C" const char * gdn_harness_error(int err) { return cudaGetErrorString((cudaError_t) err); }
