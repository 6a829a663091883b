#pragma once

// simt_emu.h - runs the CUDA kernels of this directory on the CPU, so their indexing, warp
// fragment layouts, barriers and chunk logic are tested without a GPU.
//
// Every CUDA thread of a block is a fiber on one OS thread; blocks run one after another.
// A fiber runs until it reaches __syncthreads() or a warp-collective instruction
// (mma.sync, __shfl_up_sync), then the next fiber runs:
// * __syncthreads() releases when every thread of the block has arrived;
// * a warp collective is evaluated when all 32 lanes of the warp have arrived at the same
//   collective (lanes at different collectives, or at a barrier, are reported as divergence);
// * the order in which fibers run between those points is a parameter (lockstep forward or
//   reverse, warp-serial, shuffled: see schedule_order), and cp.async copies land either at
//   issue or at the wait: a kernel without data races gives the same bits every way, so running
//   it several ways and comparing finds a missing barrier or a copy into a buffer in use;
// * dynamic shared memory is filled with NaN at block start and ends at a guard page, global
//   buffers can be allocated to end at a guard page (alloc_guarded), so reading uninitialised
//   shared memory shows as NaN and running past a buffer stops with the buffer's name.
// Arithmetic is float32 as on the GPU; the tensor-core instructions follow the PTX ISA's
// fragment layouts (mma.m16n8k8 .tf32) and cvt.rna.tf32.f32 rounding.
//
// Only what the kernels here use is emulated; anything else fails to compile.

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

// Fibers switch with a few instructions on x86-64 (simt_switch below); elsewhere, or with
// SIMT_UCONTEXT defined, with the much slower swapcontext.
#if !defined(__x86_64__) && !defined(SIMT_UCONTEXT)
#define SIMT_UCONTEXT 1
#endif
#ifdef SIMT_UCONTEXT
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess                   = 0;
constexpr cudaError_t cudaErrorInvalidValue         = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
typedef struct simt_stream * cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

using std::max;
using std::min;

namespace simt {

// The emulated device's limits (an H100 SXM by default; a driver may change them): shared
// memory a block may opt in to, per multiprocessor, and the multiprocessor count. Occupancy is
// computed from shared memory and threads only (registers are unknown here).
struct device_limits {
    int n_sm = 132;
    int smem_per_sm = 233472;     // 228 KiB
    int smem_optin = 232448;      // 227 KiB
    int smem_reserved = 1024;     // per block, by the runtime
};
inline device_limits device;
constexpr size_t SMEM_DEFAULT = 48 * 1024;
constexpr size_t STACK_BYTES  = 256 * 1024;

[[noreturn]] void fail(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

// ------------------------------------------------------------------ fibers

enum class state { runnable, barrier, collective, done };
enum class op { none, mma_tf32, shfl_up, shfl_up64 };

struct fiber {
    void *   sp = nullptr;
    dim3     tid;
    int      linear = 0;
    state    st = state::runnable;
    // collective in progress
    op       cop = op::none;
    uint64_t n_coll = 0, n_bar = 0;
    float    in[10];     // mma: a[4] (as bits), b[2] (as bits), c[4]; shfl: value
    double   din = 0, dres = 0;   // shfl of a double
    int      iarg = 0;   // shfl delta
    uint32_t mask = 0;
    float    res[4];
    std::vector<std::pair<float *, const float *>> pending;   // cp.async copies not yet awaited
#ifdef SIMT_UCONTEXT
    ucontext_t ctx;
#endif
    char *   stack = nullptr;
};

struct block_run {
    std::function<void()> body;
    std::vector<fiber>    fibers;
    const char *          kernel = "";
};

inline fiber *     cur = nullptr;       // the running fiber
inline dim3        block_idx, block_dim, grid_dim;
inline block_run * blk = nullptr;
inline void *      sched_sp = nullptr;
#ifdef SIMT_UCONTEXT
inline ucontext_t  sched_ctx;
#endif

#ifndef SIMT_UCONTEXT
// simt_switch(save, load): saves the callee-saved registers and the stack pointer to *save,
// continues on stack load. simt_entry starts a fiber: r12 = function, rbx = its argument.
extern "C" void simt_switch(void ** save, void * load);
asm(R"(
    .text
    .globl simt_switch
    .hidden simt_switch
    .type simt_switch, @function
simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_switch, .-simt_switch
    .globl simt_entry
    .hidden simt_entry
    .type simt_entry, @function
simt_entry:
    movq %rbx, %rdi
    callq *%r12
    ud2
    .size simt_entry, .-simt_entry
)");
extern "C" void simt_entry();
#endif

inline void to_scheduler() {
#ifndef SIMT_UCONTEXT
    simt_switch(&cur->sp, sched_sp);
#else
    swapcontext(&cur->ctx, &sched_ctx);
#endif
}

inline void fiber_main(fiber * f) {
    blk->body();
    if (!f->pending.empty()) fail("returned with cp.async copies never awaited");
    f->st = state::done;
    to_scheduler();
    fail("a finished thread was resumed");
}

#ifdef SIMT_UCONTEXT
inline void fiber_main_uc(unsigned hi, unsigned lo) {
    fiber_main((fiber *) (((uintptr_t) hi << 32) | lo));
}
#endif

inline void start_fiber(fiber & f) {
    f.st = state::runnable;
    f.cop = op::none;
    f.n_coll = f.n_bar = 0;
    f.pending.clear();
#ifndef SIMT_UCONTEXT
    // stack top: r15 r14 r13 r12 rbx rbp ret; 16-byte aligned stack at the entry's call
    uintptr_t top = ((uintptr_t) f.stack + STACK_BYTES) & ~(uintptr_t) 15;
    uint64_t * s = (uint64_t *) (top - 72);
    s[0] = s[1] = s[2] = 0;                         // r15 r14 r13
    s[3] = (uint64_t) (uintptr_t) &fiber_main;      // r12
    s[4] = (uint64_t) (uintptr_t) &f;               // rbx
    s[5] = 0;                                       // rbp
    s[6] = (uint64_t) (uintptr_t) &simt_entry;      // ret
    f.sp = s;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = STACK_BYTES;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)()) fiber_main_uc, 2, (unsigned) ((uintptr_t) &f >> 32), (unsigned) (uintptr_t) &f);
#endif
}

inline void resume(fiber & f) {
    cur = &f;
#ifndef SIMT_UCONTEXT
    simt_switch(&sched_sp, f.sp);
#else
    swapcontext(&sched_ctx, &f.ctx);
#endif
    cur = nullptr;
}

// ------------------------------------------------------------------ memory guards

struct region { std::string name; uintptr_t lo, hi; bool owned; };  // owned: by alloc_guarded
inline std::vector<region> & regions() { static std::vector<region> r; return r; }
inline const char * kernel_name = "";

inline void segv_handler(int, siginfo_t * si, void *) {
    const uintptr_t a = (uintptr_t) si->si_addr;
    char what[256] = "an address outside every buffer";
    for (const region & r : regions()) {
        if (a >= r.lo && a < r.hi) {
            snprintf(what, sizeof what, "a write into read-only '%s' at byte %zu", r.name.c_str(), (size_t) (a - r.lo));
            break;
        }
        if (a >= r.hi && a < r.hi + 65536) {
            snprintf(what, sizeof what, "an access %zu bytes past the end of '%s'", (size_t) (a - r.hi), r.name.c_str());
            break;
        }
    }
    char msg[512];
    const int n = snprintf(msg, sizeof msg, "simt: memory fault in %s, block (%u,%u,%u) thread (%u,%u,%u): %s\n",
                           kernel_name, block_idx.x, block_idx.y, block_idx.z,
                           cur ? cur->tid.x : 0, cur ? cur->tid.y : 0, cur ? cur->tid.z : 0, what);
    if (n > 0) { ssize_t w = write(2, msg, (size_t) std::min(n, (int) sizeof msg - 1)); (void) w; }
    _exit(3);
}

inline void install_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    static std::vector<char> alt(1 << 16);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
}

// n bytes that end where an inaccessible page begins (overruns fault at once).
inline void * alloc_guarded(size_t n, const char * name) {
    install_handler();
    const size_t pg = (size_t) sysconf(_SC_PAGESIZE);
    const size_t span = (n + pg - 1) / pg * pg;
    char * base = (char *) mmap(nullptr, span + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) fail("out of memory allocating %zu bytes for %s", n, name);
    mprotect(base + span, pg, PROT_NONE);
    char * p = base + span - n;
    regions().push_back({name, (uintptr_t) p, (uintptr_t) p + n, true});
    return p;
}

// Makes a guarded buffer read-only (kernel inputs): a stray write faults with its name.
inline void protect_readonly(void * p, size_t n) {
    const size_t pg = (size_t) sysconf(_SC_PAGESIZE);
    uintptr_t lo = (uintptr_t) p & ~(uintptr_t) (pg - 1);
    mprotect((void *) lo, (uintptr_t) p + n - lo, PROT_READ);
}

inline void free_guarded_all() {
    const size_t pg = (size_t) sysconf(_SC_PAGESIZE);
    std::vector<region> kept;
    for (const region & r : regions()) {
        if (!r.owned) { kept.push_back(r); continue; }
        const size_t n = r.hi - r.lo;
        const size_t span = (n + pg - 1) / pg * pg;
        munmap((char *) r.hi - span, span + pg);
    }
    regions() = kept;
}

// ------------------------------------------------------------------ failure

inline void fail(const char * fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (cur) {
        fprintf(stderr, "simt: %s, block (%u,%u,%u) thread (%u,%u,%u): %s\n", kernel_name, block_idx.x, block_idx.y,
                block_idx.z, cur->tid.x, cur->tid.y, cur->tid.z, buf);
    } else {
        fprintf(stderr, "simt: %s: %s\n", kernel_name, buf);
    }
    fflush(stderr);
    _exit(3);
}

// ------------------------------------------------------------------ collectives

inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
inline float    u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

// cvt.rna.tf32.f32: round to 10 explicit mantissa bits, ties away from zero; the low 13 bits
// of the result are zero. NaN and infinity pass through.
inline uint32_t cvt_rna_tf32(float x) {
    uint32_t u = f2u(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & ~0x1fffu;
}

// Arrive at a warp collective and wait until the warp's lanes have evaluated it.
inline void arrive(op o) {
    fiber & f = *cur;
    f.cop = o;
    f.st = state::collective;
    f.n_coll++;
    to_scheduler();
}

// D = A B + C for one warp, m16n8k8 with tf32 inputs (PTX ISA fragment layout for .tf32):
//   a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);  b0 (t, g) b1 (t+4, g);
//   c0 (g, 2t) c1 (g, 2t+1) c2 (g+8, 2t) c3 (g+8, 2t+1);  g = lane >> 2, t = lane & 3.
// Products of tf32 values are exact in float32; they are added to C in k order in float32.
inline void eval_mma(fiber * lanes) {
    float A[16][8], B[8][8], Cm[16][8];
    for (int lane = 0; lane < 32; lane++) {
        const fiber & f = lanes[lane];
        const int g = lane >> 2, t = lane & 3;
        // the tensor core reads 19 bits of each tf32 operand; low bits are ignored
        auto tf = [](float x) { return u2f(f2u(x) & ~0x1fffu); };
        A[g][t] = tf(f.in[0]); A[g + 8][t] = tf(f.in[1]); A[g][t + 4] = tf(f.in[2]); A[g + 8][t + 4] = tf(f.in[3]);
        B[t][g] = tf(f.in[4]); B[t + 4][g] = tf(f.in[5]);
        Cm[g][2 * t] = f.in[6]; Cm[g][2 * t + 1] = f.in[7]; Cm[g + 8][2 * t] = f.in[8]; Cm[g + 8][2 * t + 1] = f.in[9];
    }
    float D[16][8];
    for (int m = 0; m < 16; m++) {
        for (int n = 0; n < 8; n++) {
            float acc = Cm[m][n];
            for (int k = 0; k < 8; k++) acc += A[m][k] * B[k][n];
            D[m][n] = acc;
        }
    }
    for (int lane = 0; lane < 32; lane++) {
        fiber & f = lanes[lane];
        const int g = lane >> 2, t = lane & 3;
        f.res[0] = D[g][2 * t]; f.res[1] = D[g][2 * t + 1]; f.res[2] = D[g + 8][2 * t]; f.res[3] = D[g + 8][2 * t + 1];
    }
}

inline void eval_shfl_up(fiber * lanes) {
    for (int lane = 0; lane < 32; lane++) {
        const int src = lane - lanes[lane].iarg;
        lanes[lane].res[0] = src >= 0 ? lanes[src].in[0] : lanes[lane].in[0];
        lanes[lane].dres = src >= 0 ? lanes[src].din : lanes[lane].din;
    }
}

inline void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    fiber & f = *cur;
    for (int i = 0; i < 4; i++) f.in[i] = u2f(a[i]);
    for (int i = 0; i < 2; i++) f.in[4 + i] = u2f(b[i]);
    for (int i = 0; i < 4; i++) f.in[6 + i] = d[i];
    arrive(op::mma_tf32);
    for (int i = 0; i < 4; i++) d[i] = f.res[i];
}

// cp.async: the hardware may make the copy at any moment between issue and the wait. By
// default it is made at the wait (the latest moment: reading the destination earlier sees the
// old contents); with cp_async_early, at issue (the earliest: a copy issued while other threads
// still read the destination overwrites what they read). A kernel that is right gives the same
// bits either way.
inline bool cp_async_early = false;

inline void cp_async4(float * dst, const float * src) {
    if (cp_async_early) {
        *dst = *src;
    } else {
        cur->pending.emplace_back(dst, src);
    }
}

inline void cp_async_wait_all() {
    for (auto & c : cur->pending) *c.first = *c.second;
    cur->pending.clear();
}

// ------------------------------------------------------------------ block scheduler

// The thread schedule between synchronisation points:
//   0 lockstep: every thread runs to its next barrier or warp collective, in index order
//   1 lockstep, reverse order
//   2 warp-serial: warp 0 runs alone up to its next __syncthreads(), then warp 1, ... (warps
//     drift as far apart as the barriers allow)
//   3 warp-serial, last warp first
//   >= 4 lockstep in a shuffled order (seeded by the value), drawn anew at every round
inline int schedule_order = 0;

inline void sync_block() {
    cur->st = state::barrier;
    cur->n_bar++;
    to_scheduler();
}

// Evaluates warp w's collective if its lanes wait at one; false if none of them does.
inline bool resolve_warp(int w, int n_threads) {
    std::vector<fiber> & fs = blk->fibers;
    fiber * lanes = &fs[w * 32];
    const int n_lanes = std::min(32, n_threads - w * 32);
    int at = 0;
    for (int l = 0; l < n_lanes; l++) at += lanes[l].st == state::collective;
    if (at == 0) return false;
    for (int l = 0; l < n_lanes; l++) {
        if (lanes[l].st != state::collective) {
            cur = &lanes[l];
            fail("warp %d: lane %d is %s while other lanes wait at a warp collective (divergent mma.sync/shfl)",
                 w, l, lanes[l].st == state::done ? "finished" : "at __syncthreads()");
        }
        if (lanes[l].cop != lanes[0].cop || lanes[l].n_coll != lanes[0].n_coll) {
            cur = &lanes[l];
            fail("warp %d: lanes at different warp collectives (lane 0: #%llu, lane %d: #%llu)", w,
                 (unsigned long long) lanes[0].n_coll, l, (unsigned long long) lanes[l].n_coll);
        }
    }
    cur = &lanes[0];
    if (n_lanes != 32) fail("warp %d has %d threads: warp collectives need full warps here", w, n_lanes);
    if (lanes[0].cop == op::mma_tf32) {
        eval_mma(lanes);
    } else {
        for (int l = 0; l < 32; l++) {
            if (lanes[l].mask != 0xffffffffu) { cur = &lanes[l]; fail("__shfl_up_sync with a partial mask"); }
        }
        eval_shfl_up(lanes);
    }
    cur = nullptr;
    for (int l = 0; l < 32; l++) { lanes[l].st = state::runnable; lanes[l].cop = op::none; }
    return true;
}

// Every thread waits at __syncthreads() or has returned: releases the barrier; true when all
// threads have returned.
inline bool release_barrier(int n_threads) {
    std::vector<fiber> & fs = blk->fibers;
    int at_bar = 0, done = 0;
    for (int i = 0; i < n_threads; i++) {
        at_bar += fs[i].st == state::barrier;
        done += fs[i].st == state::done;
    }
    if (done == n_threads) return true;
    if (at_bar + done != n_threads) fail("scheduler: threads neither runnable, waiting nor done");
    if (done != 0) {
        for (int i = 0; i < n_threads; i++) {
            if (fs[i].st == state::done) { cur = &fs[i]; break; }
        }
        fail("__syncthreads() reached while this thread has already returned");
    }
    for (int i = 0; i < n_threads; i++) {
        if (fs[i].n_bar != fs[0].n_bar) { cur = &fs[i]; fail("threads at different __syncthreads() calls"); }
        fs[i].st = state::runnable;
    }
    return false;
}

inline void run_block(int n_threads) {
    std::vector<fiber> & fs = blk->fibers;
    const int n_warps = (n_threads + 31) / 32;
    std::vector<int> order(n_threads);
    for (int i = 0; i < n_threads; i++) order[i] = i;
    if (schedule_order == 1) std::reverse(order.begin(), order.end());
    std::mt19937 rng((uint32_t) schedule_order * 2654435761u + block_idx.x * 97u + block_idx.y * 31u + block_idx.z);
    const bool serial = schedule_order == 2 || schedule_order == 3;
    for (;;) {
        if (serial) {
            for (int wi = 0; wi < n_warps; wi++) {
                const int w = schedule_order == 2 ? wi : n_warps - 1 - wi;
                do {
                    for (int l = w * 32; l < std::min(n_threads, w * 32 + 32); l++) {
                        if (fs[l].st == state::runnable) resume(fs[l]);
                    }
                } while (resolve_warp(w, n_threads));
            }
        } else {
            if (schedule_order >= 4) std::shuffle(order.begin(), order.end(), rng);
            for (int i : order) {
                if (fs[i].st == state::runnable) resume(fs[i]);
            }
            bool progressed = false;
            for (int w = 0; w < n_warps; w++) progressed |= resolve_warp(w, n_threads);
            if (progressed) continue;
        }
        if (release_barrier(n_threads)) return;
    }
}

// ------------------------------------------------------------------ launch

inline std::map<const void *, int> & max_dyn_smem() { static std::map<const void *, int> m; return m; }
inline cudaError_t last_error = cudaSuccess;

// Dynamic shared memory: ends at a guard page, NaN-filled at each block start.
struct smem_area {
    char * base = nullptr; size_t span = 0; size_t cap = 0;
    float * get(size_t bytes) {
        const size_t pg = (size_t) sysconf(_SC_PAGESIZE);
        const size_t need = (bytes + pg - 1) / pg * pg;
        if (need > cap) {
            if (base) munmap(base, span);
            span = need + pg;
            base = (char *) mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (base == MAP_FAILED) fail("out of memory for shared memory");
            mprotect(base + need, pg, PROT_NONE);
            cap = need;
            regions().push_back({"dynamic shared memory", 0, 0, false});
        }
        char * p = base + cap - bytes;
        for (region & r : regions()) {
            if (r.name == "dynamic shared memory") { r.lo = (uintptr_t) p; r.hi = (uintptr_t) p + bytes; }
        }
        memset(p, 0xff, bytes);  // NaN in every float
        return (float *) p;
    }
};
inline smem_area & smem_pool() { static smem_area a; return a; }

// The kernel sees its dynamic shared memory through this pointer (see SIMT_DYNAMIC_SMEM).
inline float * dyn_smem = nullptr;

struct stacks {
    std::vector<char *> s;
    char * get(size_t i) {
        const size_t pg = (size_t) sysconf(_SC_PAGESIZE);
        while (s.size() <= i) {
            char * b = (char *) mmap(nullptr, STACK_BYTES + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (b == MAP_FAILED) fail("out of memory for fiber stacks");
            mprotect(b, pg, PROT_NONE);  // stack overflow faults
            s.push_back(b + pg);
        }
        return s[i];
    }
};
inline stacks & stack_pool() { static stacks st; return st; }

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), const char * name, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   Args &&... args) {
    install_handler();
    kernel_name = name;
    const int n_threads = (int) (block.x * block.y * block.z);
    if (n_threads <= 0 || n_threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535) {
        return last_error = cudaErrorInvalidConfiguration;
    }
    if (smem > SMEM_DEFAULT) {
        auto it = max_dyn_smem().find((const void *) kernel);
        if (it == max_dyn_smem().end() || (size_t) it->second < smem) {
            return last_error = cudaErrorInvalidValue;  // needs cudaFuncSetAttribute first
        }
    }
    block_run br;
    br.kernel = name;
    br.body = [&] { kernel(args...); };
    br.fibers.resize(n_threads);
    for (int i = 0; i < n_threads; i++) {
        fiber & f = br.fibers[i];
        f.linear = i;
        f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
        f.stack = stack_pool().get(i);
    }
    blk = &br;
    block_dim = block;
    grid_dim = grid;
    for (unsigned z = 0; z < grid.z; z++) {
        for (unsigned y = 0; y < grid.y; y++) {
            for (unsigned x = 0; x < grid.x; x++) {
                block_idx = dim3(x, y, z);
                dyn_smem = smem ? smem_pool().get(smem) : nullptr;
                for (fiber & f : br.fibers) start_fiber(f);
                run_block(n_threads);
            }
        }
    }
    blk = nullptr;
    return cudaSuccess;
}

} // namespace simt

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F * func, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    if (value < 0 || value > simt::device.smem_optin) return simt::last_error = cudaErrorInvalidValue;
    simt::max_dyn_smem()[(const void *) func] = value;
    return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int * dev) { *dev = 0; return cudaSuccess; }

inline cudaError_t cudaDeviceGetAttribute(int * value, cudaDeviceAttr attr, int) {
    switch (attr) {
        case cudaDevAttrMultiProcessorCount:              *value = simt::device.n_sm; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = simt::device.smem_per_sm; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin:     *value = simt::device.smem_optin; return cudaSuccess;
    }
    return cudaErrorInvalidValue;
}

// Blocks per multiprocessor, from shared memory and threads (2048 per multiprocessor) only.
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int * n, F *, int threads, size_t smem) {
    if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
    const int by_threads = 2048 / threads;
    const int by_smem = (int) (simt::device.smem_per_sm / (smem + simt::device.smem_reserved));
    *n = std::min(by_threads, by_smem);
    return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
    const cudaError_t e = simt::last_error;
    simt::last_error = cudaSuccess;
    return e;
}

#define threadIdx (::simt::cur->tid)
#define blockIdx  (::simt::block_idx)
#define blockDim  (::simt::block_dim)
#define gridDim   (::simt::grid_dim)

inline void __syncthreads() { simt::sync_block(); }

inline float __shfl_up_sync(unsigned mask, float v, int delta) {
    simt::fiber & f = *simt::cur;
    f.in[0] = v;
    f.iarg = delta;
    f.mask = mask;
    simt::arrive(simt::op::shfl_up);
    return f.res[0];
}

inline double __shfl_up_sync(unsigned mask, double v, int delta) {
    simt::fiber & f = *simt::cur;
    f.din = v;
    f.iarg = delta;
    f.mask = mask;
    simt::arrive(simt::op::shfl_up64);
    return f.dres;
}

inline uint32_t __float_as_uint(float x) { return simt::f2u(x); }
inline float    __uint_as_float(uint32_t u) { return simt::u2f(u); }
[[noreturn]] inline void __trap() { simt::fail("__trap()"); }
