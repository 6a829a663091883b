// What the drivers of the chunked GATED_DELTA_NET kernels share: the GPU harness
// (gdn_harness.cu) and the CPU emulator (gdn_emu.cpp) take the op's buffers, ggml's strides as
// one array and the sizes, launch through these params, and answer the same questions about the
// device. Include after gated_delta_net_chunked.cuh.
#pragma once

// strides (in floats): sq1 sq2 sq3 sv1 sv2 sv3 sb1 sb2 sb3 (ggml's nb / 4). out holds T_out tokens
// per sequence; the kernels write tokens [0, T).
inline gdn_chunked::params gdn_driver_params(const float * q, const float * k, const float * v, const float * g,
                                             const float * beta, const float * state, float * out, float * state_out,
                                             float * scratch, const int64_t * strides, int64_t S, int64_t H,
                                             int64_t H_k, int64_t T, int64_t T_out, int64_t B, int64_t rq3) {
    gdn_chunked::params p{};
    p.q = q; p.k = k; p.v = v; p.g = g; p.beta = beta; p.state_in = state;
    p.out = out; p.state_out = state_out;
    p.H = H; p.H_k = H_k; p.T = T; p.T_out = T_out; p.n_seqs = B; p.rq3 = rq3;
    gdn_chunked::bind_scratch(p, scratch);
    p.sq1 = strides[0]; p.sq2 = strides[1]; p.sq3 = strides[2];
    p.sv1 = strides[3]; p.sv2 = strides[4]; p.sv3 = strides[5];
    p.sb1 = strides[6]; p.sb2 = strides[7]; p.sb3 = strides[8];
    p.scale = 1.0f / sqrtf((float) S);
    return p;
}

// The value-column tile the launch chooses on the current device for H heads, B sequences.
inline int gdn_driver_choose_bv(int64_t S, int64_t H, int64_t B) {
    return S == 64 ? gdn_chunked::choose_bv_here<64>(H, B) : gdn_chunked::choose_bv_here<128>(H, B);
}

// Whether a device of compute capability cc (e.g. 900) with smem_optin bytes of opt-in shared
// memory per block runs head size S with tile bv (0: the launch's choice): usable() as ggml's
// dispatcher asks it, and room for a forced 64-column tile.
inline bool gdn_driver_usable(int64_t S, int bv, int cc, size_t smem_optin) {
    if (!gdn_chunked::usable(S, cc, smem_optin)) return false;
    return bv != 64 || (S == 128 && gdn_chunked::state_smem<128, 64>() <= smem_optin);
}

// The harness's stage numbers (0 both kernels, 1 prep alone, 2 the state pass alone) as the
// launch's stage; false for any other number.
inline bool gdn_driver_stage(int n, gdn_chunked::stage & which) {
    switch (n) {
        case 0: which = gdn_chunked::stage::all;   return true;
        case 1: which = gdn_chunked::stage::prep;  return true;
        case 2: which = gdn_chunked::stage::state; return true;
        default: return false;
    }
}
