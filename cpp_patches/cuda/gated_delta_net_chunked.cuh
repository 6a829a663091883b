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
//   S_C   = exp(c_C) S0 + K^T diag(exp(c_C - c)) delta
//   O     = scale diag(exp(c)) Q S0 + QKm delta
// The prep kernel runs over every (chunk, head, sequence) in parallel; the state kernel walks
// the chunks of one (value-column tile, head, sequence) in order, with the next chunk's
// operands in flight (registers and cp.async) while it computes the current one. The tile
// width (32 or 64 value columns) is chosen so that the state kernel's blocks all fit on the
// device at once. Products run on tensor cores in 3xTF32 (hi*hi + hi*lo + lo*hi), which keeps
// float32 accuracy. Needs sm_80+ (mma .tf32, cp.async) and room for the tiles; see usable().

#ifdef GDN_CHUNKED_EMULATE
#include "simt_emu.h"
#define GDN_DYNAMIC_SMEM(name) float * name = ::simt::dyn_smem
#define GDN_LAUNCH(kernel, name, grid, block, smem, stream, ...) \
    (void) ::simt::launch(kernel, name, grid, block, smem, stream, __VA_ARGS__)
#else
#include <cuda_runtime.h>
#define GDN_DYNAMIC_SMEM(name) extern __shared__ float name[]
#define GDN_LAUNCH(kernel, name, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
#include <stdint.h>

namespace gdn_chunked {

// Warps per block: 8 in ggml. GDN_CHUNKED_NW is defined only by the standalone harness
// (run_harness.py --warps), to time 16 warps against 8; ggml never defines it.
#ifndef GDN_CHUNKED_NW
#define GDN_CHUNKED_NW 8
#endif

constexpr int C  = 64;              // tokens per chunk
constexpr int NW = GDN_CHUNKED_NW;  // warps per block
constexpr int NT = NW * 32;         // threads per block

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
    float * cum;        // scratch [B, H, n_chunks, C]: c_t, the chunk's cumulative log-decay
    float * wdec;       // scratch [B, H, n_chunks, C]: exp(c_last - c_t)
    int64_t H, H_k, T, T_out, n_seqs, rq3;
    int64_t sq1, sq2, sq3, sv1, sv2, sv3, sb1, sb2, sb3;
    float scale;
};

static __host__ __device__ inline int64_t n_chunks(int64_t T) { return (T + C - 1) / C; }

// ---------------------------------------------------------------- 3xTF32 tensor-core tile

// TF32 tensor cores exist from sm_80 on NVIDIA; other targets compile to a trap and the host
// dispatcher never launches these kernels there (see usable()).
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

// Asynchronous 4-byte global -> shared copies (cp.async, sm_80+): issued, then awaited with
// async_wait_all() by the same thread; other threads see the data after a __syncthreads().
static __device__ __forceinline__ void async_copy(float * dst_smem, const float * src) {
#if defined(GDN_CHUNKED_EMULATE)
    ::simt::cp_async4(dst_smem, src);
#elif defined(GDN_CHUNKED_TF32)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;"
                 :: "r"((uint32_t) __cvta_generic_to_shared(dst_smem)), "l"(src) : "memory");
#else
    *dst_smem = *src;
#endif
}

static __device__ __forceinline__ void async_commit() {
#if defined(GDN_CHUNKED_TF32)
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

static __device__ __forceinline__ void async_wait_all() {
#if defined(GDN_CHUNKED_EMULATE)
    ::simt::cp_async_wait_all();
#elif defined(GDN_CHUNKED_TF32)
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Fragments of one k-step (8 wide) of a 16x8x8 product, split into tf32 hi and lo parts.
// PTX ISA, mma.m16n8k8 .tf32: A a0 (m0+gr, k0+tg), a1 (m0+gr+8, k0+tg), a2 (m0+gr, k0+tg+4),
// a3 (m0+gr+8, k0+tg+4); B b0 (k0+tg, n0+gr), b1 (k0+tg+4, n0+gr); gr = lane >> 2, tg = lane & 3.
template <typename FA>
static __device__ __forceinline__ void frag_a(FA a, int m0, int k0, uint32_t ah[4], uint32_t al[4]) {
    const int gr = (threadIdx.x & 31) >> 2, tg = threadIdx.x & 3;
    split_tf32(a(m0 + gr,     k0 + tg),     ah[0], al[0]);
    split_tf32(a(m0 + gr + 8, k0 + tg),     ah[1], al[1]);
    split_tf32(a(m0 + gr,     k0 + tg + 4), ah[2], al[2]);
    split_tf32(a(m0 + gr + 8, k0 + tg + 4), ah[3], al[3]);
}

template <typename FB>
static __device__ __forceinline__ void frag_b(FB b, int k0, int n0, uint32_t bh[2], uint32_t bl[2]) {
    const int gr = (threadIdx.x & 31) >> 2, tg = threadIdx.x & 3;
    split_tf32(b(k0 + tg,     n0 + gr), bh[0], bl[0]);
    split_tf32(b(k0 + tg + 4, n0 + gr), bh[1], bl[1]);
}

// d += a_hi b_lo + a_lo b_hi + a_hi b_hi (3xTF32: float32 accuracy on tensor cores).
// GDN_CHUNKED_1XTF32 keeps a_hi b_hi alone (~1e-3 relative error): only the standalone harness
// defines it (run_harness.py --precision), to measure what float32 accuracy costs; ggml never does.
static __device__ __forceinline__ void mma_split(float d[4], const uint32_t ah[4], const uint32_t al[4],
                                                 const uint32_t bh[2], const uint32_t bl[2]) {
#if !defined(GDN_CHUNKED_1XTF32)
    mma_tf32(d, al, bh);
    mma_tf32(d, ah, bl);
#else
    (void) al; (void) bl;
#endif
    mma_tf32(d, ah, bh);
}

// Fragment ownership of a 16x8 tile (rows m0.., cols n0..) in d[4]: d[0] (m0+gr, n0+2tg),
// d[1] (m0+gr, n0+2tg+1), d[2]/d[3] the same at m0+gr+8 (frag_row / frag_col below).

// R tiles in one row band (rows m0.., columns n0 + 8r..): d[r] += a b. Each k-step loads and
// splits the A fragment once for all R tiles.
template <int R, typename FA, typename FB>
static __device__ __forceinline__ void mma_row(float (&d)[R][4], int m0, int n0, int kdim, FA a, FB b) {
    for (int k0 = 0; k0 < kdim; k0 += 8) {
        uint32_t ah[4], al[4];
        frag_a(a, m0, k0, ah, al);
#pragma unroll
        for (int r = 0; r < R; r++) {
            uint32_t bh[2], bl[2];
            frag_b(b, k0, n0 + 8 * r, bh, bl);
            mma_split(d[r], ah, al, bh, bl);
        }
    }
}

// Two products in one row band sharing B: d1[r] += a1 b, d2[r] += a2 b (A fragments loaded once
// per k-step, B once per k-step and tile).
template <int R, typename FA1, typename FA2, typename FB>
static __device__ __forceinline__ void mma_row2(float (&d1)[R][4], float (&d2)[R][4], int m0, int n0, int kdim,
                                                FA1 a1, FA2 a2, FB b) {
    for (int k0 = 0; k0 < kdim; k0 += 8) {
        uint32_t ah1[4], al1[4], ah2[4], al2[4];
        frag_a(a1, m0, k0, ah1, al1);
        frag_a(a2, m0, k0, ah2, al2);
#pragma unroll
        for (int r = 0; r < R; r++) {
            uint32_t bh[2], bl[2];
            frag_b(b, k0, n0 + 8 * r, bh, bl);
            mma_split(d1[r], ah1, al1, bh, bl);
            mma_split(d2[r], ah2, al2, bh, bl);
        }
    }
}

// row/col of fragment element e (0..3) of the tile at (m0, n0)
static __device__ __forceinline__ int frag_row(int m0, int e) { return m0 + ((threadIdx.x & 31) >> 2) + (e >= 2 ? 8 : 0); }
static __device__ __forceinline__ int frag_col(int n0, int e) { return n0 + 2 * (threadIdx.x & 3) + (e & 1); }

// f(r, e, row, col) for each fragment element e of R tiles in a row band (rows m0.., columns
// n0 + 8r..), as mma_row / mma_row2 hold them
template <int R, typename F>
static __device__ __forceinline__ void each_frag(int m0, int n0, F f) {
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            f(r, e, frag_row(m0, e), frag_col(n0 + 8 * r, e));
        }
    }
}

// Inclusive prefix sum of x[0..C) in place, by warp 0 (C == 64: two values per lane), in
// double: the decays exp(c_t - c_s) take differences of these sums, and after a strong forget
// gate early in a chunk (g = -300, say) float sums would leave those differences only ~1e-5
// accurate where they matter most (late tokens, decay near 1); the per-token kernel has no such
// cancellation.
static __device__ __forceinline__ void warp_cumsum64(double * x) {
    const int lane = threadIdx.x & 31;
    double a = x[2 * lane];
    double b = a + x[2 * lane + 1];
    double s = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double n = __shfl_up_sync(0xffffffff, s, o);
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
// grid (n_chunks, H, B), NT threads. smem: Ks, Qs [C][S+4]; As [C][C+1]; c, beta [C] float;
// c [C] double.
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
    double * cd = (double *) (bs + C);
    static_assert((2 * C * LDS + C * LDA + 2 * C) % 2 == 0, "the doubles must be 8-byte aligned");

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
        cd[t] = t < n ? p.g[off]    : 0.0f;
        bs[t] = t < n ? p.beta[off] : 0.0f;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        warp_cumsum64(cd);
        cs[2 * threadIdx.x]     = (float) cd[2 * threadIdx.x];
        cs[2 * threadIdx.x + 1] = (float) cd[2 * threadIdx.x + 1];
    }
    __syncthreads();

    // KK^T and QK^T on the lower triangle: 4x8 tiles of 16x8, 4 per warp
    const int warp = threadIdx.x >> 5;
    float * QKg = p.QKm + slot * C * C;
    for (int tile = warp; tile < (C / 16) * (C / 8); tile += NW) {
        const int m0 = (tile / (C / 8)) * 16, n0 = (tile % (C / 8)) * 8;
        float kk[1][4] = {}, qk[1][4] = {};
        if (n0 <= m0 + 15) {   // one K^T fragment per k-step for both products
            mma_row2(kk, qk, m0, n0, S, [&](int m, int kk_) { return Ks[m * LDS + kk_]; },
                                        [&](int m, int kk_) { return Qs[m * LDS + kk_]; },
                                        [&](int kk_, int nn) { return Ks[nn * LDS + kk_]; });
        }
        each_frag<1>(m0, n0, [&](int, int e, int t, int s) {
            const float decay = s <= t ? expf((float) (cd[t] - cd[s])) : 0.0f;
            As[t * LDA + s]  = s < t ? bs[t] * decay * kk[0][e] : 0.0f;
            QKg[t * C + s]   = p.scale * decay * qk[0][e];
        });
    }
    __syncthreads();

    // Tm = (I + A)^-1 (unit lower triangular) by 16x16 blocks, so the serial chain is short:
    // 1. diagonal blocks X_bb = (I + A_bb)^-1 by forward substitution, one thread per column:
    //    X[t][j] = [t == j] - sum_{j <= s < t} A[t][s] X[s][j]  (4 blocks x 16 columns);
    // 2. below them, by distance d = i - j: X_ij = -X_ii Y_ij, Y_ij = sum_{j <= k < i} A_ik X_kj
    //    (Y is kept in As's upper block (j, i), which is zero and never read as A).
    // Qs is free now and holds Tm (row stride LDS).
    constexpr int NB = C / 16;
    float * Ts = Qs;
    if (threadIdx.x < C) {
        const int b = threadIdx.x / 16, j = threadIdx.x % 16, o = 16 * b;
        for (int t = 0; t < 16; t++) {
            float acc = t == j ? 1.0f : 0.0f;
            for (int s2 = j; s2 < t; s2++) {
                acc -= As[(o + t) * LDA + o + s2] * Ts[(o + s2) * LDS + o + j];
            }
            Ts[(o + t) * LDS + o + j] = t >= j ? acc : 0.0f;
        }
    }
    for (int idx = threadIdx.x; idx < C * C; idx += NT) {   // above the diagonal blocks: zero
        const int t = idx / C, s2 = idx % C;
        if (s2 / 16 > t / 16) {
            Ts[t * LDS + s2] = 0.0f;
        }
    }
    __syncthreads();
    for (int d = 1; d < NB; d++) {
        const int n = (NB - d) * 256;   // blocks (j + d, j), 16 x 16 elements each
        for (int idx = threadIdx.x; idx < n; idx += NT) {
            const int j = idx / 256, i = j + d, r = (idx / 16) % 16, c = idx % 16;
            float acc = 0.0f;
            for (int k = 16 * j; k < 16 * i; k++) {
                acc += As[(16 * i + r) * LDA + k] * Ts[k * LDS + 16 * j + c];
            }
            As[(16 * j + r) * LDA + 16 * i + c] = acc;   // Y_ij
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < n; idx += NT) {
            const int j = idx / 256, i = j + d, r = (idx / 16) % 16, c = idx % 16;
            float acc = 0.0f;
            for (int u = 0; u <= r; u++) {
                acc -= Ts[(16 * i + r) * LDS + 16 * i + u] * As[(16 * j + u) * LDA + 16 * i + c];
            }
            Ts[(16 * i + r) * LDS + 16 * j + c] = acc;
        }
        __syncthreads();
    }
    float * Tg = p.Tm + slot * C * C;
    for (int idx = threadIdx.x; idx < C * C; idx += NT) {
        Tg[idx] = Ts[(idx / C) * LDS + idx % C];
    }
    for (int t = threadIdx.x; t < C; t += NT) {
        p.cum[slot * C + t]  = cs[t];
        p.wdec[slot * C + t] = expf((float) (cd[C - 1] - cd[t]));
    }
}

// ---------------------------------------------------------------- state pass: walk the chunks
// grid (S/BV, H, B), NT threads. Each block owns value columns [j0, j0+BV) of one head and walks
// the chunks in order. The next chunk's operands travel while the current one is computed, so
// the walk does not wait on memory latency: QKm, c and beta in registers (loaded from the top of
// the iteration), Q, V, Tm and K by cp.async into their shared buffers as soon as the phase
// that last reads each buffer is done (no registers held for them).
//   phase 1  P = K S0, O1 = Q S0;  R = beta (V - exp(c) P)       frees Qs
//   phase 2  D = Tm R                                            frees R, Ts
//   phase 3  S0 = exp(c_last) S0 + K^T (w D), w = exp(c_last - c) frees Ks
//   phase 4  O = scale exp(c) O1 + QKm D  -> dst
template <int S, int BV>
struct state_layout {
    static constexpr int LDS = S + 4;   // Ks, Qs rows
    static constexpr int LDV = BV + 8;  // St, R, D rows
    static constexpr int LDC = C + 4;   // Ts, QKs rows
    static constexpr int floats = 2 * C * LDS + S * LDV + 2 * C * LDV + 2 * C * LDC + 3 * C;
};

template <int S, int BV>
__global__ void __launch_bounds__(NT, 1) gdn_chunk_state(const params p) {
    using L = state_layout<S, BV>;
    constexpr int LDS = L::LDS, LDV = L::LDV, LDC = L::LDC;
    constexpr int TILES_V = (C / 16) * (BV / 8);   // C x BV output tiles
    constexpr int TILES_S = (S / 16) * (BV / 8);   // S x BV state tiles
    static_assert(TILES_V % NW == 0 && TILES_S % NW == 0, "tiles must split evenly over warps");
    constexpr int PV = TILES_V / NW;
    constexpr int PS = TILES_S / NW;
    static_assert((BV / 8) % PV == 0 && (BV / 8) % PS == 0, "each warp's tiles must lie in one row band");
    constexpr int RCC = C * C / NT;   // QKm registers per thread
    static_assert((C * C) % NT == 0 && C <= NT, "prefetch split");

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
    float * ws  = bs  + C;

    const int64_t j0 = blockIdx.x * BV, h = blockIdx.y, seq = blockIdx.z;
    const int     tid  = threadIdx.x;
    const int     warp = tid >> 5;
    const int64_t nc = n_chunks(p.T);
    const int64_t state_off = (seq * p.H + h) * S * S;
    auto tokens = [&](int64_t chunk) { return (int) min((int64_t) C, p.T - chunk * C); };
    auto slot   = [&](int64_t chunk) { return (seq * p.H + h) * nc + chunk; };

    // QKm, c, w, beta of the next chunk, in registers (element r of a thread: index tid + r * NT)
    float rqk[RCC];
    float rc = 0.0f, rw = 0.0f, rb = 0.0f;
    auto fetch = [&](int64_t chunk) {
#pragma unroll
        for (int r = 0; r < RCC; r++) {
            rqk[r] = p.QKm[slot(chunk) * C * C + tid + r * NT];
        }
        if (tid < C) {
            rc = p.cum[slot(chunk) * C + tid];
            rw = p.wdec[slot(chunk) * C + tid];
            rb = tid < tokens(chunk) ? p.beta[seq * p.sb3 + (chunk * C + tid) * p.sb2 + h * p.sb1] : 0.0f;
        }
    };
    auto stash = [&]() {
#pragma unroll
        for (int r = 0; r < RCC; r++) {
            const int idx = tid + r * NT;
            QKs[(idx / C) * LDC + idx % C] = rqk[r];
        }
        if (tid < C) {
            cs[tid] = rc;
            ws[tid] = rw;
            bs[tid] = rb;
        }
    };
    // q or k rows of a chunk -> X (zeros past the last token)
    auto copy_qk = [&](float * X, const float * src, int64_t chunk) {
        const int n = tokens(chunk);
        for (int idx = tid; idx < C * S; idx += NT) {
            const int t = idx / S, i = idx % S;
            if (t < n) {
                async_copy(X + t * LDS + i, qk_row(src, p, seq, chunk * C + t, h) + i);
            } else {
                X[t * LDS + i] = 0.0f;
            }
        }
        async_commit();
    };
    // V tile -> R, Tm -> Ts
    auto copy_vt = [&](int64_t chunk) {
        const int n = tokens(chunk);
        for (int idx = tid; idx < C * BV; idx += NT) {
            const int t = idx / BV, j = idx % BV;
            if (t < n) {
                async_copy(R + t * LDV + j, p.v + seq * p.sv3 + (chunk * C + t) * p.sv2 + h * p.sv1 + j0 + j);
            } else {
                R[t * LDV + j] = 0.0f;
            }
        }
        for (int idx = tid; idx < C * C; idx += NT) {
            async_copy(Ts + (idx / C) * LDC + idx % C, p.Tm + slot(chunk) * C * C + idx);
        }
        async_commit();
    };

    // S0 tile: St[i][j] = state[(j0 + j) * S + i]
    for (int idx = tid; idx < S * BV; idx += NT) {
        const int j = idx / S, i = idx % S;
        St[i * LDV + j] = p.state_in[state_off + (j0 + j) * S + i];
    }
    fetch(0);
    copy_qk(Ks, p.k, 0);
    copy_qk(Qs, p.q, 0);
    copy_vt(0);

    for (int64_t chunk = 0; chunk < nc; chunk++) {
        const int64_t t0 = chunk * C;
        const int     n  = tokens(chunk);
        const bool    more = chunk + 1 < nc;
        async_wait_all();
        stash();
        __syncthreads();
        if (more) {
            fetch(chunk + 1);
        }

        // Each warp's tiles lie in one row band: PV output tiles (C x BV) from row vm0, column
        // vn0; PS state tiles (S x BV) from row sm0, column sn0.
        const int vm0 = (warp * PV / (BV / 8)) * 16, vn0 = (warp * PV % (BV / 8)) * 8;
        const int sm0 = (warp * PS / (BV / 8)) * 16, sn0 = (warp * PS % (BV / 8)) * 8;

        // phase 1: P = K S0, O1 = Q S0 (S0 fragments shared); R = beta (V - exp(c) P) in place
        float o1[PV][4] = {};
        {
            float pk[PV][4] = {};
            mma_row2(pk, o1, vm0, vn0, S, [&](int m, int kk) { return Ks[m * LDS + kk]; },
                                          [&](int m, int kk) { return Qs[m * LDS + kk]; },
                                          [&](int kk, int nn) { return St[kk * LDV + nn]; });
            each_frag<PV>(vm0, vn0, [&](int r, int e, int t, int j) {
                R[t * LDV + j] = bs[t] * (R[t * LDV + j] - expf(cs[t]) * pk[r][e]);
            });
        }
        __syncthreads();
        if (more) {
            copy_qk(Qs, p.q, chunk + 1);
        }

        // phase 2: delta = Tm R (Tm lower triangular: k < vm0 + 16)
        {
            float d[PV][4] = {};
            mma_row(d, vm0, vn0, vm0 + 16, [&](int m, int kk) { return Ts[m * LDC + kk]; },
                                           [&](int kk, int nn) { return R[kk * LDV + nn]; });
            each_frag<PV>(vm0, vn0, [&](int r, int e, int t, int j) { D[t * LDV + j] = d[r][e]; });
        }
        __syncthreads();
        if (more) {
            copy_vt(chunk + 1);
        }

        // phase 3: S_C = exp(c_last) S0 + K^T (w delta)  (S x BV, inner C)
        {
            const float decay_c = expf(cs[C - 1]);
            float sv[PS][4];
            each_frag<PS>(sm0, sn0, [&](int r, int e, int i, int j) { sv[r][e] = decay_c * St[i * LDV + j]; });
            mma_row(sv, sm0, sn0, C, [&](int m, int kk) { return Ks[kk * LDS + m]; },
                                     [&](int kk, int nn) { return ws[kk] * D[kk * LDV + nn]; });
            each_frag<PS>(sm0, sn0, [&](int r, int e, int i, int j) { St[i * LDV + j] = sv[r][e]; });
        }
        __syncthreads();
        if (more) {
            copy_qk(Ks, p.k, chunk + 1);
        }

        // phase 4: O = scale exp(c) O1 + QKm delta -> dst (QKm is zero above the diagonal)
        {
            each_frag<PV>(vm0, vn0, [&](int r, int e, int t, int) { o1[r][e] *= p.scale * expf(cs[t]); });
            mma_row(o1, vm0, vn0, vm0 + 16, [&](int m, int kk) { return QKs[m * LDC + kk]; },
                                            [&](int kk, int nn) { return D[kk * LDV + nn]; });
            each_frag<PV>(vm0, vn0, [&](int r, int e, int t, int j) {
                if (t < n) {
                    p.out[((seq * p.T_out + t0 + t) * p.H + h) * S + j0 + j] = o1[r][e];
                }
            });
        }
        __syncthreads();
    }

    for (int idx = tid; idx < S * BV; idx += NT) {
        const int j = idx / S, i = idx % S;
        p.state_out[state_off + (j0 + j) * S + i] = St[i * LDV + j];
    }
}

template <int S>
static size_t prep_smem() { return sizeof(float) * (2 * C * (S + 4) + C * (C + 1) + 2 * C) + sizeof(double) * C; }

template <int S, int BV>
static size_t state_smem() { return sizeof(float) * state_layout<S, BV>::floats; }

// Scratch floats launch() needs in p.Tm, p.QKm, p.cum and p.wdec.
static inline size_t scratch_floats(int64_t T, int64_t H, int64_t n_seqs) {
    return (size_t) n_seqs * H * n_chunks(T) * (2 * C * C + 2 * C);
}

// Points p.Tm, p.QKm, p.cum and p.wdec into one buffer of scratch_floats(p.T, p.H, p.n_seqs).
static inline void bind_scratch(params & p, float * scratch) {
    const size_t slots = (size_t) p.n_seqs * p.H * n_chunks(p.T);
    p.Tm   = scratch;
    p.QKm  = p.Tm + slots * C * C;
    p.cum  = p.QKm + slots * C * C;
    p.wdec = p.cum + slots * C;
}

// Value columns per state-pass block. Every block walks all chunks, so a second wave of blocks
// would start only when the first has finished the whole sequence: take BV = 64 (half the
// blocks, twice the work each) when it needs fewer waves than BV = 32 on this device.
static inline int choose_bv(int64_t blocks32, int resident32, int resident64, int n_sm) {
    if (resident32 <= 0 || n_sm <= 0) return resident64 > 0 ? 64 : 32;
    const int64_t waves32 = (blocks32 + (int64_t) resident32 * n_sm - 1) / ((int64_t) resident32 * n_sm);
    if (resident64 <= 0) return 32;
    const int64_t blocks64 = blocks32 / 2;
    const int64_t waves64 = (blocks64 + (int64_t) resident64 * n_sm - 1) / ((int64_t) resident64 * n_sm);
    return waves64 < waves32 ? 64 : 32;
}

// Blocks of the state kernel that fit on one multiprocessor at once (0: it cannot launch here).
template <int S, int BV>
static int state_resident(int smem_optin) {
    const size_t ss = state_smem<S, BV>();
    if (ss > (size_t) smem_optin) return 0;
    if (cudaFuncSetAttribute(gdn_chunk_state<S, BV>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) ss) != cudaSuccess) {
        (void) cudaGetLastError();
        return 0;
    }
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, gdn_chunk_state<S, BV>, NT, ss) != cudaSuccess) {
        (void) cudaGetLastError();
        return 0;
    }
    return n;
}

template <int S>
static int choose_bv_here(int64_t H, int64_t n_seqs) {
    if (S != 128) return 32;   // BV = 64 is built for S = 128 only (the Qwen3.5 head size)
    int dev = 0, n_sm = 0, optin = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        (void) cudaGetLastError();
        return 32;
    }
    return choose_bv((S / 32) * H * n_seqs, state_resident<S, 32>(optin), state_resident<128, 64>(optin), n_sm);
}

// Which kernels a launch runs. ggml runs both. The standalone harness also times them apart
// (run_harness.py --bench): `state` alone reads the scratch an earlier launch on the same inputs
// left, so its time is the sequential walk's alone.
enum class stage : int { all = 0, prep = 1, state = 2 };

template <int S, int BV>
static cudaError_t launch_sb(const params & p, cudaStream_t stream, stage which) {
    const size_t sp = prep_smem<S>(), ss = state_smem<S, BV>();
    cudaError_t err = cudaFuncSetAttribute(gdn_chunk_prep<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) sp);
    if (err == cudaSuccess) {
        err = cudaFuncSetAttribute(gdn_chunk_state<S, BV>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) ss);
    }
    if (err != cudaSuccess) {   // too little shared memory here (see usable()): nothing launched
        (void) cudaGetLastError();   // returned, not left as the runtime's last error for a later check
        return err;
    }
    void (*const prep)(params)  = gdn_chunk_prep<S>;
    void (*const state)(params) = gdn_chunk_state<S, BV>;
    if (which != stage::state) {
        GDN_LAUNCH(prep, "gdn_chunk_prep", dim3((unsigned) n_chunks(p.T), (unsigned) p.H, (unsigned) p.n_seqs), NT,
                   sp, stream, p);
    }
    if (which != stage::prep) {
        GDN_LAUNCH(state, "gdn_chunk_state", dim3(S / BV, (unsigned) p.H, (unsigned) p.n_seqs), NT, ss, stream, p);
    }
    return cudaGetLastError();
}

template <int S>
static cudaError_t launch_s(const params & p, int bv, cudaStream_t stream, stage which) {
    if (bv <= 0) bv = choose_bv_here<S>(p.H, p.n_seqs);
    if (bv == 32) return launch_sb<S, 32>(p, stream, which);
    if constexpr (S == 128) {
        if (bv == 64) return launch_sb<S, 64>(p, stream, which);
    }
    return cudaErrorInvalidValue;
}

// True when the chunked path covers this shape: scalar gate, S_v 64 or 128.
static inline bool supported(int64_t S_v, bool kda) { return !kda && (S_v == 64 || S_v == 128); }

// True when the kernels for S_v run on a device of compute capability cc (major * 100 +
// minor * 10, NVIDIA only) whose blocks may opt in to smem_optin bytes of shared memory (ggml's
// smpbo; the narrowest state tile decides). A100, H100, B200 (163-227 KiB) take S_v 64 and 128;
// the 99 KiB of sm_86 / sm_89 / sm_120 (GeForce, workstation cards) hold S_v 64 only, and
// S_v 128 keeps the token-sequential kernel there.
static inline bool usable(int64_t S_v, int cc, size_t smem_optin) {
#if defined(GGML_USE_HIP) || defined(GGML_USE_MUSA)
    (void) S_v; (void) cc; (void) smem_optin;
    return false;
#else
    if (cc < 800) return false;
    switch (S_v) {
        case 64:  return prep_smem<64>()  <= smem_optin && state_smem<64, 32>()  <= smem_optin;
        case 128: return prep_smem<128>() <= smem_optin && state_smem<128, 32>() <= smem_optin;
        default:  return false;
    }
#endif
}

// Runs the op for p.T tokens; p.Tm/QKm/cum/wdec must point into scratch_floats(p.T, p.H,
// p.n_seqs) floats (bind_scratch). bv: value columns per state-pass block, 32 or (S_v = 128 only) 64; 0 chooses
// for this device. which: both kernels, or one of them (see stage).
static inline cudaError_t launch(const params & p, int64_t S_v, cudaStream_t stream, int bv = 0,
                                 stage which = stage::all) {
    switch (S_v) {
        case 64:  return launch_s<64>(p, bv, stream, which);
        case 128: return launch_s<128>(p, bv, stream, which);
        default:  return cudaErrorInvalidValue;
    }
}

} // namespace gdn_chunked

#undef GDN_DYNAMIC_SMEM
#undef GDN_LAUNCH
