#pragma once

// Chunked prefill for GGML_OP_GATED_DELTA_NET (scalar gate, S_v in {64, 128}).
//
// Self-contained (CUDA runtime only) so a standalone harness can compile it in seconds, and
// compiled as plain C++ with GDN_CHUNKED_EMULATE by the CPU emulator (simt_emu.h) that CI runs.
// The math is the WY/UT form of cpp_patches/reference/gated_delta_net.py::chunked.
// Within a chunk of C tokens with cumulative log-decay c_t = sum_{s<=t} g_s and S0 the
// state at the chunk start (S[i][j]: i = key index, j = value index):
//   A[t][s] = beta_t exp(c_t - c_s) k_t.k_s  (s < t),     Tm = (I + A)^-1      (prep kernel)
//   QKm[t][s] = scale exp(c_t - c_s) q_t.k_s (s <= t)                         (prep kernel)
//   R     = diag(beta) (V - diag(exp(c)) K S0)                                (state kernel)
//   delta = Tm R
//   O     = scale diag(exp(c)) Q S0 + QKm delta
//   S_C   = exp(c_C) S0 + K^T diag(exp(c_C - c)) delta
// The prep kernel runs over every (chunk, head, sequence) in parallel; the state kernel walks
// the chunks of one (value-column tile, head, sequence) in order. Products run on tensor
// cores in 3xTF32 (hi*hi + hi*lo + lo*hi), which keeps float32 accuracy.

#ifdef GDN_CHUNKED_EMULATE
#include "simt_emu.h"
#define GDN_DYNAMIC_SMEM(name) float * name = ::simt::dyn_smem
#define GDN_LAUNCH(kernel, grid, block, smem, stream, ...) \
    (void) ::simt::launch(kernel, #kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#include <cuda_runtime.h>
#define GDN_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define GDN_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
#include <stdint.h>

namespace gdn_chunked {

constexpr int C  = 64;      // tokens per chunk
constexpr int BV = 32;      // value columns per state-kernel block
constexpr int NW = 8;       // warps per block
constexpr int NT = NW * 32; // threads per block

struct params {
    // inputs, ggml layouts (strides in floats):
    //   q, k  [S, H_k, T, B_qk]  element (seq, t, hk, i) at iq3*sq3 + t*sq2 + hk*sq1 + i, iq3 = seq / rq3
    //   v     [S, H,   T, B]     element (seq, t, h, j)  at seq*sv3 + t*sv2 + h*sv1 + j
    //   g, b  [1, H,   T, B]     element (seq, t, h)     at seq*sb3 + t*sb2 + h*sb1
    //   s_in  [S, S, H, B]       transposed: s_in[((seq*H + h)*S + j)*S + i] = S[i][j]
    const float * q; const float * k; const float * v; const float * g; const float * beta;
    const float * state_in;
    float * out;        // [S, H, T_out, B]: token t of seq at ((seq*T_out + t)*H + h)*S + j
    float * state_out;  // same layout as state_in
    float * Tm;         // scratch [B, H, n_chunks, C, C]
    float * QKm;        // scratch [B, H, n_chunks, C, C]
    float * cum;        // scratch [B, H, n_chunks, C]
    int64_t H, H_k, T, T_out, n_seqs, rq3;
    int64_t sq1, sq2, sq3, sv1, sv2, sv3, sb1, sb2, sb3;
    float scale;
};

static __host__ __device__ inline int64_t n_chunks(int64_t T) { return (T + C - 1) / C; }

// ---------------------------------------------------------------- 3xTF32 tensor-core tile

// TF32 tensor cores exist from sm_80 on NVIDIA; other targets compile to a trap and the host
// dispatcher never launches these kernels there (see available()).
#if !defined(GDN_CHUNKED_EMULATE) && !defined(GGML_USE_HIP) && !defined(GGML_USE_MUSA) && \
    (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define GDN_CHUNKED_TF32 1
#endif

static __device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(GDN_CHUNKED_EMULATE)
    return ::simt::cvt_rna_tf32(x);
#elif defined(GDN_CHUNKED_TF32)
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    __trap();
    return __float_as_uint(x);
#endif
}

static __device__ __forceinline__ void split_tf32(float x, uint32_t & hi, uint32_t & lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - __uint_as_float(hi));
}

static __device__ __forceinline__ void mma_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(GDN_CHUNKED_EMULATE)
    ::simt::mma_m16n8k8_tf32(d, a, b);
#elif !defined(GDN_CHUNKED_TF32)
    __trap();
#else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d (16x8 tile at rows m0.., cols n0..) += sum_{k < kdim} a(m, k) * b(k, n), one warp.
// Fragment ownership: d[0] (m0+gr, n0+2tg), d[1] (m0+gr, n0+2tg+1), d[2]/d[3] the same at m0+gr+8.
template <typename FA, typename FB>
static __device__ __forceinline__ void mma_tile(float d[4], int m0, int n0, int kdim, FA a, FB b) {
    const int lane = threadIdx.x & 31;
    const int gr   = lane >> 2;
    const int tg   = lane & 3;
    for (int k0 = 0; k0 < kdim; k0 += 8) {
        uint32_t ah[4], al[4], bh[2], bl[2];
        split_tf32(a(m0 + gr,     k0 + tg),     ah[0], al[0]);
        split_tf32(a(m0 + gr + 8, k0 + tg),     ah[1], al[1]);
        split_tf32(a(m0 + gr,     k0 + tg + 4), ah[2], al[2]);
        split_tf32(a(m0 + gr + 8, k0 + tg + 4), ah[3], al[3]);
        split_tf32(b(k0 + tg,     n0 + gr), bh[0], bl[0]);
        split_tf32(b(k0 + tg + 4, n0 + gr), bh[1], bl[1]);
        mma_tf32(d, al, bh);
        mma_tf32(d, ah, bl);
        mma_tf32(d, ah, bh);
    }
}

// row/col of fragment element e (0..3) of the tile at (m0, n0)
static __device__ __forceinline__ int frag_row(int m0, int e) { return m0 + ((threadIdx.x & 31) >> 2) + (e >= 2 ? 8 : 0); }
static __device__ __forceinline__ int frag_col(int n0, int e) { return n0 + 2 * (threadIdx.x & 3) + (e & 1); }

// inclusive prefix sum of x[0..C) in place, by warp 0 (C == 64: two values per lane)
static __device__ __forceinline__ void warp_cumsum64(float * x) {
    const int lane = threadIdx.x & 31;
    float a = x[2 * lane];
    float b = a + x[2 * lane + 1];
    float s = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffff, s, o);
        if (lane >= o) s += n;
    }
    x[2 * lane]     = s - b + a;
    x[2 * lane + 1] = s;
}

// q/k row (seq, token t, value head h) -> pointer; tiled head broadcast h % H_k
static __device__ __forceinline__ const float * qk_row(const float * base, const params & p, int64_t seq, int64_t t, int64_t h) {
    return base + (seq / p.rq3) * p.sq3 + t * p.sq2 + (h % p.H_k) * p.sq1;
}

// ---------------------------------------------------------------- prep: Tm, QKm, cum per chunk
// grid (n_chunks, H, B), NT threads. smem: Ks, Qs [C][S+4]; As [C][C+1]; c, beta [C].
template <int S>
__global__ void __launch_bounds__(NT) gdn_chunk_prep(const params p) {
    constexpr int LDS = S + 4;
    constexpr int LDA = C + 1;
    GDN_DYNAMIC_SMEM(smem);
    float * Ks = smem;
    float * Qs = Ks + C * LDS;
    float * As = Qs + C * LDS;
    float * cs = As + C * LDA;
    float * bs = cs + C;

    const int64_t chunk = blockIdx.x, h = blockIdx.y, seq = blockIdx.z;
    const int64_t t0 = chunk * C;
    const int     n  = (int) min((int64_t) C, p.T - t0);
    const int64_t nc = n_chunks(p.T);
    const int64_t slot = (seq * p.H + h) * nc + chunk;

    // load K, Q rows (zero past the end), g and beta
    for (int idx = threadIdx.x; idx < C * S; idx += NT) {
        const int t = idx / S, i = idx % S;
        const bool in = t < n;
        Ks[t * LDS + i] = in ? qk_row(p.k, p, seq, t0 + t, h)[i] : 0.0f;
        Qs[t * LDS + i] = in ? qk_row(p.q, p, seq, t0 + t, h)[i] : 0.0f;
    }
    for (int t = threadIdx.x; t < C; t += NT) {
        const int64_t off = seq * p.sb3 + (t0 + t) * p.sb2 + h * p.sb1;
        cs[t] = t < n ? p.g[off]    : 0.0f;
        bs[t] = t < n ? p.beta[off] : 0.0f;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        warp_cumsum64(cs);
    }
    __syncthreads();

    // KK^T and QK^T on the lower triangle: 4x8 tiles of 16x8, 4 per warp
    const int warp = threadIdx.x >> 5;
    float * QKg = p.QKm + slot * C * C;
    for (int tile = warp; tile < (C / 16) * (C / 8); tile += NW) {
        const int m0 = (tile / (C / 8)) * 16, n0 = (tile % (C / 8)) * 8;
        float kk[4] = {0, 0, 0, 0}, qk[4] = {0, 0, 0, 0};
        if (n0 <= m0 + 15) {
            mma_tile(kk, m0, n0, S, [&](int m, int kk_) { return Ks[m * LDS + kk_]; },
                                    [&](int kk_, int nn) { return Ks[nn * LDS + kk_]; });
            mma_tile(qk, m0, n0, S, [&](int m, int kk_) { return Qs[m * LDS + kk_]; },
                                    [&](int kk_, int nn) { return Ks[nn * LDS + kk_]; });
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int t = frag_row(m0, e), s = frag_col(n0, e);
            const float decay = s <= t ? expf(cs[t] - cs[s]) : 0.0f;
            As[t * LDA + s]  = s < t ? bs[t] * decay * kk[e] : 0.0f;
            QKg[t * C + s]   = p.scale * decay * qk[e];
        }
    }
    __syncthreads();

    // Tm = (I + A)^-1 by forward substitution, one thread per column (columns are independent):
    // Tm[t][j] = [t == j] - sum_{j <= s < t} A[t][s] Tm[s][j]; Tm[t][j] = 0 for t < j.
    // Qs is free now and holds Tm (row stride LDS).
    float * Ts = Qs;
    if (threadIdx.x < C) {
        const int j = threadIdx.x;
        for (int t = 0; t < C; t++) {
            float acc = t == j ? 1.0f : 0.0f;
            for (int s = j; s < t; s++) {
                acc -= As[t * LDA + s] * Ts[s * LDS + j];
            }
            Ts[t * LDS + j] = t >= j ? acc : 0.0f;
        }
    }
    __syncthreads();
    float * Tg = p.Tm + slot * C * C;
    for (int idx = threadIdx.x; idx < C * C; idx += NT) {
        Tg[idx] = Ts[(idx / C) * LDS + idx % C];
    }
    for (int t = threadIdx.x; t < C; t += NT) {
        p.cum[slot * C + t] = cs[t];
    }
}

// ---------------------------------------------------------------- state pass: walk the chunks
// grid (S/BV, H, B), NT threads. Each block owns value columns [j0, j0+BV) of one head.
template <int S>
__global__ void __launch_bounds__(NT, 1) gdn_chunk_state(const params p) {
    constexpr int LDS = S + 4;   // Ks, Qs rows
    constexpr int LDV = BV + 8;  // St, R, D rows
    constexpr int LDC = C + 4;   // Ts, QKs rows
    constexpr int TILES_V = (C / 16) * (BV / 8);   // C x BV output tiles
    constexpr int TILES_S = (S / 16) * (BV / 8);   // S x BV state tiles
    static_assert(TILES_V % NW == 0 && TILES_S % NW == 0, "tiles must split evenly over warps");
    constexpr int PV = TILES_V / NW;
    constexpr int PS = TILES_S / NW;

    GDN_DYNAMIC_SMEM(smem);
    float * Ks  = smem;
    float * Qs  = Ks  + C * LDS;
    float * St  = Qs  + C * LDS;
    float * R   = St  + S * LDV;
    float * D   = R   + C * LDV;
    float * Ts  = D   + C * LDV;
    float * QKs = Ts  + C * LDC;
    float * cs  = QKs + C * LDC;
    float * bs  = cs  + C;

    const int64_t j0 = blockIdx.x * BV, h = blockIdx.y, seq = blockIdx.z;
    const int     warp = threadIdx.x >> 5;
    const int64_t nc = n_chunks(p.T);
    const int64_t state_off = (seq * p.H + h) * S * S;

    // S0 tile: St[i][j] = state[(j0 + j) * S + i]
    for (int idx = threadIdx.x; idx < S * BV; idx += NT) {
        const int j = idx / S, i = idx % S;
        St[i * LDV + j] = p.state_in[state_off + (j0 + j) * S + i];
    }

    for (int64_t chunk = 0; chunk < nc; chunk++) {
        const int64_t t0 = chunk * C;
        const int     n  = (int) min((int64_t) C, p.T - t0);
        const int64_t slot = (seq * p.H + h) * nc + chunk;

        for (int idx = threadIdx.x; idx < C * S; idx += NT) {
            const int t = idx / S, i = idx % S;
            const bool in = t < n;
            Ks[t * LDS + i] = in ? qk_row(p.k, p, seq, t0 + t, h)[i] : 0.0f;
            Qs[t * LDS + i] = in ? qk_row(p.q, p, seq, t0 + t, h)[i] : 0.0f;
        }
        for (int idx = threadIdx.x; idx < C * BV; idx += NT) {
            const int t = idx / BV, j = idx % BV;
            R[t * LDV + j] = t < n ? p.v[seq * p.sv3 + (t0 + t) * p.sv2 + h * p.sv1 + j0 + j] : 0.0f;
        }
        for (int idx = threadIdx.x; idx < C * C; idx += NT) {
            Ts [(idx / C) * LDC + idx % C] = p.Tm [slot * C * C + idx];
            QKs[(idx / C) * LDC + idx % C] = p.QKm[slot * C * C + idx];
        }
        for (int t = threadIdx.x; t < C; t += NT) {
            cs[t] = p.cum[slot * C + t];
            bs[t] = t < n ? p.beta[seq * p.sb3 + (t0 + t) * p.sb2 + h * p.sb1] : 0.0f;
        }
        __syncthreads();

        // P = K S0, O1 = Q S0 (C x BV); R = beta (V - exp(c) P) in place
        float o1[PV][4];
#pragma unroll
        for (int r = 0; r < PV; r++) {
            const int tile = warp * PV + r;
            const int m0 = (tile / (BV / 8)) * 16, n0 = (tile % (BV / 8)) * 8;
            float pk[4] = {0, 0, 0, 0};
            o1[r][0] = o1[r][1] = o1[r][2] = o1[r][3] = 0.0f;
            mma_tile(pk,    m0, n0, S, [&](int m, int kk) { return Ks[m * LDS + kk]; },
                                       [&](int kk, int nn) { return St[kk * LDV + nn]; });
            mma_tile(o1[r], m0, n0, S, [&](int m, int kk) { return Qs[m * LDS + kk]; },
                                       [&](int kk, int nn) { return St[kk * LDV + nn]; });
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int t = frag_row(m0, e), j = frag_col(n0, e);
                R[t * LDV + j] = bs[t] * (R[t * LDV + j] - expf(cs[t]) * pk[e]);
            }
        }
        __syncthreads();

        // delta = Tm R (Tm lower triangular: k < m0 + 16); weight K rows by exp(c_last - c_t)
#pragma unroll
        for (int r = 0; r < PV; r++) {
            const int tile = warp * PV + r;
            const int m0 = (tile / (BV / 8)) * 16, n0 = (tile % (BV / 8)) * 8;
            float d[4] = {0, 0, 0, 0};
            mma_tile(d, m0, n0, m0 + 16, [&](int m, int kk) { return Ts[m * LDC + kk]; },
                                         [&](int kk, int nn) { return R[kk * LDV + nn]; });
#pragma unroll
            for (int e = 0; e < 4; e++) {
                D[frag_row(m0, e) * LDV + frag_col(n0, e)] = d[e];
            }
        }
        const float c_last = cs[C - 1];
        for (int idx = threadIdx.x; idx < C * S; idx += NT) {
            const int t = idx / S, i = idx % S;
            Ks[t * LDS + i] *= expf(c_last - cs[t]);
        }
        __syncthreads();

        // O = scale exp(c) O1 + QKm delta  -> dst (QKm is zero above the diagonal)
#pragma unroll
        for (int r = 0; r < PV; r++) {
            const int tile = warp * PV + r;
            const int m0 = (tile / (BV / 8)) * 16, n0 = (tile % (BV / 8)) * 8;
            float o[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                o[e] = p.scale * expf(cs[frag_row(m0, e)]) * o1[r][e];
            }
            mma_tile(o, m0, n0, m0 + 16, [&](int m, int kk) { return QKs[m * LDC + kk]; },
                                         [&](int kk, int nn) { return D[kk * LDV + nn]; });
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int t = frag_row(m0, e), j = frag_col(n0, e);
                if (t < n) {
                    p.out[((seq * p.T_out + t0 + t) * p.H + h) * S + j0 + j] = o[e];
                }
            }
        }

        // S_C = exp(c_last) S0 + (w K)^T delta  (S x BV, inner C)
#pragma unroll
        for (int r = 0; r < PS; r++) {
            const int tile = warp * PS + r;
            const int m0 = (tile / (BV / 8)) * 16, n0 = (tile % (BV / 8)) * 8;
            float s[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[e] = expf(c_last) * St[frag_row(m0, e) * LDV + frag_col(n0, e)];
            }
            mma_tile(s, m0, n0, C, [&](int m, int kk) { return Ks[kk * LDS + m]; },
                                   [&](int kk, int nn) { return D[kk * LDV + nn]; });
#pragma unroll
            for (int e = 0; e < 4; e++) {
                St[frag_row(m0, e) * LDV + frag_col(n0, e)] = s[e];
            }
        }
        __syncthreads();
    }

    for (int idx = threadIdx.x; idx < S * BV; idx += NT) {
        const int j = idx / S, i = idx % S;
        p.state_out[state_off + (j0 + j) * S + i] = St[i * LDV + j];
    }
}

template <int S>
static size_t prep_smem() { return sizeof(float) * (2 * C * (S + 4) + C * (C + 1) + 2 * C); }

template <int S>
static size_t state_smem() {
    return sizeof(float) * (2 * C * (S + 4) + S * (BV + 8) + 2 * C * (BV + 8) + 2 * C * (C + 4) + 2 * C);
}

// Scratch floats launch() needs in p.Tm + p.QKm + p.cum.
static inline size_t scratch_floats(int64_t T, int64_t H, int64_t n_seqs) {
    return (size_t) n_seqs * H * n_chunks(T) * (2 * C * C + C);
}

template <int S>
static cudaError_t launch_s(const params & p, cudaStream_t stream) {
    const size_t sp = prep_smem<S>(), ss = state_smem<S>();
    cudaError_t err = cudaFuncSetAttribute(gdn_chunk_prep<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sp);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(gdn_chunk_state<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) ss);
    if (err != cudaSuccess) return err;
    GDN_LAUNCH(gdn_chunk_prep<S>, dim3((unsigned) n_chunks(p.T), (unsigned) p.H, (unsigned) p.n_seqs), NT, sp, stream, p);
    GDN_LAUNCH(gdn_chunk_state<S>, dim3(S / BV, (unsigned) p.H, (unsigned) p.n_seqs), NT, ss, stream, p);
    return cudaGetLastError();
}

// True when the chunked path covers this shape (S_v, scalar gate) on a device of compute
// capability cc (major * 100 + minor * 10, NVIDIA only).
static inline bool supported(int64_t S_v, bool kda) { return !kda && (S_v == 64 || S_v == 128); }
static inline bool available(int cc) {
#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)
    (void) cc;
    return false;
#else
    return cc >= 800;
#endif
}

// Runs the op for p.T tokens; p.Tm/QKm/cum must hold scratch_floats(p.T, p.H, p.n_seqs) floats.
static inline cudaError_t launch(const params & p, int64_t S_v, cudaStream_t stream) {
    switch (S_v) {
        case 64:  return launch_s<64>(p, stream);
        case 128: return launch_s<128>(p, stream);
        default:  return cudaErrorInvalidValue;
    }
}

} // namespace gdn_chunked

#undef GDN_DYNAMIC_SMEM
#undef GDN_LAUNCH
