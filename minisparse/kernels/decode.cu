// One batch-1 decode step of a Llama-style decoder, as CUDA kernels that a CUDA graph can
// capture (compiled at run time by cupy.RawModule / NVRTC; see decode_cuda.py).
//
// Every kernel reads the position and the token id from DEVICE memory, so one captured
// graph serves every step: replaying it embeds tokens[pos], runs the layers, writes the
// greedy next token to tokens[pos + 1] and advances pos. Nothing crosses to the host.
//
// Activations (the residual stream x, normed inputs, q, attention output, h, logits) are
// float32; weights are W = float or unsigned short (an IEEE half); sums accumulate in
// float32. Weight rows are padded with zeros to a multiple of 8 elements (16 bytes of
// half, 32 of float), and every vector a GEMV reads is zero-padded the same way, so the
// fast kernels need no tail loop.
//
// The ladder (llm.c dev/cuda style): each fast kernel keeps its simple first version here,
// and bench/gpu_kernel_ladder.py validates and times both.
//   GEMV    gemv_naive (thread per row)  ->  gemv_warp (warp per row, coalesced scalar
//           loads)  ->  gemv_warp_vec16 (warp per row, 16-byte loads, 4 in flight per lane)
//   norm    rmsnorm (one block; optional residual add fused)
//   attn    attn_decode_naive (thread per head)  ->  attn_decode (block per query head,
//           a thread per key, scores in shared memory)  ->  attn_decode_split (a block per
//           32-key chunk, 8 lanes per key, chunks merged by the last block of each head)
//   others  embed, qkv_rope (RMSNorm + q/k/v GEMV + bias + rotary + KV write, rows in
//           rotary pairs), ffn_gateup (RMSNorm + dense gate + up + activation, warp per
//           neuron), ffn_gate_select / ffn_gateup_list + ffn_down_rows (neuron skipping,
//           the down projection added straight into the residual stream), argmax_advance.
//
// RMSNorm is fused into the GEMV that consumes it: every warp streams all of x for its dot
// product anyway, so it also sums x^2 and scales its result by rstd; the norm's weight is
// folded into the weight rows when the decoder copies them (w[:, d] * g[d], rounded once).
// rmsnorm stays as a kernel for the CuPy-backend FFN paths, which take a normed input.
//
// act_fn<A>(v, kind, thr) and m_exp/m_erf/m_tanh are prepended from
// minisparse.kernels.base.cuda_activation_source() (the one definition of the activations).

#define WARPS 8                  // warps per block of the warp-per-row kernels
#ifndef PF_BYTES
#define PF_BYTES 0               // bytes of each weight row a kernel prefetches into L2 before pdl_wait
#endif
#ifndef EARLY
#define EARLY 0                  // 1: the GEMV kernels issue their first round of weight loads before pdl_wait
#endif
#define NEG_INF __int_as_float(0xff800000)   // NVRTC has no math.h: no INFINITY
#define NTHREADS (32 * WARPS)

// ------------------------------------------------------------------------------------
// programmatic dependent launch (PDL, sm_90+). Launched with the PDL attribute (see
// decode_cuda.Launcher), a kernel may start while the kernel before it still runs. Until
// pdl_wait() returns it may touch only data nothing in the step writes: its weights, which
// it prefetches into L2 (the first PF_BYTES of each of its rows), so the next kernel's first
// loads overlap this one's tail. After pdl_wait() the previous kernel has completed and its
// writes are visible; only then does a kernel let its own dependent launch (at most one
// kernel runs ahead). Launched normally, both are no-ops.
// EARLY (the next rung): instead of an L2 prefetch, the warp-per-row kernels issue the
// first round of their weight-row loads into registers (U 16-byte loads per lane: half a
// 4096-wide fp16 row at U = 8) and only then wait (warp_dots<..., WAIT = true>). Those
// loads run while the kernel before still computes: the o-projection's first half streams
// in while attention (a few blocks, latency-bound) runs, q,k,v's while the down pass ends.
// ------------------------------------------------------------------------------------
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// lane l prefetches 128-byte line l of the first min(PF_BYTES, row bytes) of a row
template <typename W>
__device__ __forceinline__ void prefetch_row(const W* row, int ld, int lane) {
#if PF_BYTES > 0
    const int lim = min(PF_BYTES, ld * (int)sizeof(W));
    if (lane * 128 < lim) asm volatile("prefetch.global.L2 [%0];" :: "l"(reinterpret_cast<const char*>(row) + lane * 128));
#endif
}

// ------------------------------------------------------------------------------------
// loads
// ------------------------------------------------------------------------------------
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(unsigned short v) { return h2f(v); }

template <typename W> struct VecOf { enum { N = 16 / sizeof(W) }; };

// Loads of what a kernel before in the step wrote (activations, KV, counters, kept lists)
// are ordinary loads (__ldca: ld.global.ca), never the read-only path (__ldg,
// ld.global.nc): data declared read-only may be loaded before griddepcontrol.wait, and
// under PDL it is written while this kernel already runs (on the H200 the 32-layer step
// with early loads then gave other tokens). L2-only loads (__ldcg) were correct too but
// made the step up to 2x slower: every warp of a GEMV reads all of x, and L1 serves it.
// Weights, tables and the fixed given lists: __ldg.
// N consecutive floats of an activation vector (16-byte aligned), N = 4 or 8
template <int N>
__device__ __forceinline__ void ldx(const float* p, float* o) {
#pragma unroll
    for (int c = 0; c < N / 4; ++c) {
        float4 v = __ldca(reinterpret_cast<const float4*>(p + 4 * c));
        o[4 * c] = v.x; o[4 * c + 1] = v.y; o[4 * c + 2] = v.z; o[4 * c + 3] = v.w;
    }
}

// the same from a float16 activation vector (the CuPy backend's x may be float16)
template <int N>
__device__ __forceinline__ void ldx(const unsigned short* p, float* o) {
    if (N == 8) {
        const uint4 v = __ldca(reinterpret_cast<const uint4*>(p));
        const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) { o[2 * k] = h2f((unsigned short)(w[k] & 0xffffu)); o[2 * k + 1] = h2f((unsigned short)(w[k] >> 16)); }
    } else {
        const uint2 v = __ldca(reinterpret_cast<const uint2*>(p));
        o[0] = h2f((unsigned short)(v.x & 0xffffu)); o[1] = h2f((unsigned short)(v.x >> 16));
        o[2] = h2f((unsigned short)(v.y & 0xffffu)); o[3] = h2f((unsigned short)(v.y >> 16));
    }
}

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// raw 16-byte loads (kept raw while in flight: 4 registers each) and their conversion
__device__ __forceinline__ uint4 ld16raw(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void cvt16(uint4 v, float* o, float) {           // 4 floats
    o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y); o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void cvt16(uint4 v, float* o, unsigned short) {  // 8 halves
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        o[2 * k] = h2f((unsigned short)(w[k] & 0xffffu));
        o[2 * k + 1] = h2f((unsigned short)(w[k] >> 16));
    }
}

// Dot products of NR (1 or 2) weight rows (ld elements, ld % VecOf<W>::N == 0, 16-byte
// aligned, zero-padded) with x by one warp: each lane keeps U (4) sixteen-byte loads per
// row in flight, then a shuffle sum. SQ: also ss = x . x (each warp reads all of x anyway,
// so RMSNorm's statistic costs no extra memory traffic: the norm is fused into the GEMV).
// WAIT: the caller has not waited yet (EARLY): pdl_wait() comes after the first round's
// weight loads are issued and before x (written by the kernel before) is read.
// FENCE (1: membar.cta) after each round's loads (but the round that waits: the wait is
// there). ptxas issues most of a round's loads one at a time between the multiply-adds, so a
// lane holds fewer than U in flight; the fence moves a few more ahead of the first one (4 of
// 8 in the gate pass; a fence does not order the non-coherent weight loads, so not all),
// which measured faster there (bench/README.md, rounds 9 and 10).
template <int FENCE>
__device__ __forceinline__ void round_fence() {
    if (FENCE == 1) asm volatile("membar.cta;" ::: "memory");
}

template <typename W, int NR, bool SQ, int U = 4, bool WAIT = false, typename X = float, int FENCE = 0>
__device__ __forceinline__ void warp_dots(const W* __restrict__ r0, const W* __restrict__ r1,
                                          const X* __restrict__ x, int ld, int lane,
                                          float* d0, float* d1, float* ss) {
    const int V = VecOf<W>::N;
    const int n = ld / V;
    float s0 = 0.f, s1 = 0.f, q = 0.f;
    int v = lane;
    bool waited = !WAIT;
    for (; v + 32 * (U - 1) < n; v += 32 * U) {
        uint4 a[U], b[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            a[j] = ld16raw(r0 + (size_t)(v + 32 * j) * V);
            if (NR == 2) b[j] = ld16raw(r1 + (size_t)(v + 32 * j) * V);
        }
        if (WAIT && !waited) { pdl_wait(); waited = true; }  // (the wait holds the round's loads too)
        else round_fence<FENCE>();
#pragma unroll
        for (int j = 0; j < U; ++j) {
            float xv[V], w[V];
            ldx<V>(x + (size_t)(v + 32 * j) * V, xv);
            cvt16(a[j], w, W());
#pragma unroll
            for (int k = 0; k < V; ++k) s0 = fmaf(w[k], xv[k], s0);
            if (NR == 2) {
                cvt16(b[j], w, W());
#pragma unroll
                for (int k = 0; k < V; ++k) s1 = fmaf(w[k], xv[k], s1);
            }
            if (SQ) {
#pragma unroll
                for (int k = 0; k < V; ++k) q = fmaf(xv[k], xv[k], q);
            }
        }
    }
    if (WAIT && !waited) pdl_wait();
    for (; v < n; v += 32) {
        float xv[V], w[V];
        ldx<V>(x + (size_t)v * V, xv);
        cvt16(ld16raw(r0 + (size_t)v * V), w, W());
#pragma unroll
        for (int k = 0; k < V; ++k) s0 = fmaf(w[k], xv[k], s0);
        if (NR == 2) {
            cvt16(ld16raw(r1 + (size_t)v * V), w, W());
#pragma unroll
            for (int k = 0; k < V; ++k) s1 = fmaf(w[k], xv[k], s1);
        }
        if (SQ) {
#pragma unroll
            for (int k = 0; k < V; ++k) q = fmaf(xv[k], xv[k], q);
        }
    }
    *d0 = warp_sum(s0);
    if (NR == 2) *d1 = warp_sum(s1);
    if (SQ) *ss = warp_sum(q);
}

// 1 / sqrt(mean(x^2) + eps) from the sum of squares (as layers.rms_norm_forward)
__device__ __forceinline__ float rstd_of(float ss, int D, float eps) { return 1.0f / sqrtf(ss / (float)D + eps); }

template <typename W>
__device__ __forceinline__ float warp_dot_vec16(const W* __restrict__ row, const float* __restrict__ x,
                                                int ld, int lane) {
    float d, unused;
    warp_dots<W, 1, false>(row, row, x, ld, lane, &d, &unused, &unused);
    return d;
}

// ====================================================================================
// GEMV ladder: y[r] = sum_k w[r, k] x[k]   w (N, ld) row-major, K <= ld valid columns
// ====================================================================================
// 1. the first version: one thread per row. Neighbouring threads read addresses ld apart:
//    every load is its own memory transaction (uncoalesced), so it crawls.
template <typename W>
__global__ void gemv_naive(const W* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                           int N, int K, int ld) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += to_f(w[(size_t)r * ld + k]) * x[k];
    y[r] = s;
}

// 2. one warp per row: the 32 lanes read 32 consecutive elements (coalesced), then a
//    shuffle reduction. Scalar loads: 2 or 4 bytes per lane per instruction.
template <typename W>
__global__ void __launch_bounds__(NTHREADS) gemv_warp(const W* __restrict__ w, const float* __restrict__ x,
                                                      float* __restrict__ y, int N, int K, int ld) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (r >= N) return;
    const W* row = w + (size_t)r * ld;
    float s = 0.f;
    for (int k = lane; k < K; k += 32) s = fmaf(to_f(row[k]), x[k], s);
    s = warp_sum(s);
    if (lane == 0) y[r] = s;
}

// 3. one warp per row, 16-byte loads, 4 in flight per lane (warp_dots); rows padded to
//    ld % VecOf<W>::N == 0 with zeros, x zero-padded to ld.
//    EPI 0: y[r] = dot     EPI 1: y[r] += dot (the residual add of o-proj / down-proj)
//    EPI 2: y[r] = rstd(x) * dot: RMSNorm fused (its weight folded into w; D, eps used)
//    U: 16-byte loads in flight per lane (4; 8 is the next rung: fewer rounds per row, for
//    grids of less than one wave, at the cost of registers).
template <typename W, int EPI, int U = 4>
__global__ void __launch_bounds__(NTHREADS) gemv_warp_vec16(const W* __restrict__ w, const float* __restrict__ x,
                                                            float* __restrict__ y, int N, int ld, int D, float eps) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * WARPS + (threadIdx.x >> 5);
#if !EARLY
    if (r < N) prefetch_row(w + (size_t)r * ld, ld, lane);
    pdl_wait();
#endif
    if (r >= N) return;
    float s, ss, unused;
    warp_dots<W, 1, EPI == 2, U, EARLY != 0>(w + (size_t)r * ld, w, x, ld, lane, &s, &unused, &ss);
    if (lane == 0) {
        if (EPI == 1) y[r] += s;
        else if (EPI == 2) y[r] = s * rstd_of(ss, D, eps);
        else y[r] = s;
    }
}

// ====================================================================================
// block-wide reductions (blockDim.x a multiple of 32, <= 1024)
// ====================================================================================
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();                                   // sh may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float t = (threadIdx.x < nw) ? sh[threadIdx.x] : 0.f;
    if (wid == 0) t = warp_sum(t);
    if (threadIdx.x == 0) sh[0] = t;
    __syncthreads();
    return sh[0];
}
__device__ __forceinline__ float block_max(float v, float* sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float t = (threadIdx.x < nw) ? sh[threadIdx.x] : NEG_INF;
    if (wid == 0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    }
    if (threadIdx.x == 0) sh[0] = t;
    __syncthreads();
    return sh[0];
}

// ====================================================================================
// token embedding: x = table[tokens[pos]] (* sqrt(D) for Gemma)
// ====================================================================================
template <typename W>
__global__ void embed(const W* __restrict__ table, int ld, const int* __restrict__ tokens,
                      const int* __restrict__ pos, float* __restrict__ x, int D, float scale, int use_scale) {
    pdl_wait();
    const int tok = tokens[*pos];
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < D; d += gridDim.x * blockDim.x) {
        float v = to_f(table[(size_t)tok * ld + d]);
        x[d] = use_scale ? v * scale : v;
    }
}

// ====================================================================================
// RMSNorm, one block: [x += add]; out = x * rsqrt(mean(x^2) + eps) * scale
// (scale = w, or 1 + w for Gemma, prepared on the host). add may be null.
// ====================================================================================
__global__ void rmsnorm(float* __restrict__ x, const float* __restrict__ add, const float* __restrict__ scale,
                        float* __restrict__ out, int D, float eps) {
    __shared__ float sh[32];
    pdl_wait();
    float ss = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = x[d];
        if (add != nullptr) { v += __ldca(add + d); x[d] = v; }
        ss = fmaf(v, v, ss);
    }
    const float rstd = 1.0f / sqrtf(block_sum(ss, sh) / (float)D + eps);
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = (x[d] * rstd) * scale[d];
}

// ====================================================================================
// RMSNorm + q, k, v projections + bias + rotary (rotate-half) + KV-cache write, one launch.
// x is the raw residual stream; the attention norm's weight is folded into w, and each warp
// computes rstd from the x it streams anyway. w: ((H + 2K) * Dh, ld) rows = [q heads | k
// heads | v heads]. One warp per rotary pair (rows i and i + Dh/2 of one head):
//     a, b = rstd * (w_i . x), rstd * (w_{i+half} . x)  (+ bias)
//     out_i = a cos - b sin,   out_{i+half} = b cos + a sin       (q and k; v unrotated)
// q -> q[h * Dh + i]; k, v -> kc / vc[(kh * max_len + pos) * Dh + i]. bias may be null.
// cos_t, sin_t: (max_len, Dh/2) float tables.
// ====================================================================================
template <typename W, int U = 4>
__global__ void __launch_bounds__(NTHREADS) qkv_rope(const W* __restrict__ w, const float* __restrict__ bias,
                                                     const float* __restrict__ x, int ld, int D, float eps,
                                                     int H, int K, int Dh,
                                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                     const int* __restrict__ pos_p, float* __restrict__ q,
                                                     float* __restrict__ kc, float* __restrict__ vc, int max_len) {
    const int lane = threadIdx.x & 31;
    const int half = Dh / 2;
    const int item = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const bool live = item < (H + 2 * K) * half;
    const int head = item / half, i = item - head * half;
    const int r0 = head * Dh + i, r1 = r0 + half;
#if !EARLY
    if (live) { prefetch_row(w + (size_t)r0 * ld, ld, lane); prefetch_row(w + (size_t)r1 * ld, ld, lane); }
    pdl_wait();
#endif
    if (!live) return;
    float a, b, ss;
    warp_dots<W, 2, true, U, EARLY != 0>(w + (size_t)r0 * ld, w + (size_t)r1 * ld, x, ld, lane, &a, &b, &ss);
    if (lane != 0) return;
    const float rs = rstd_of(ss, D, eps);
    a *= rs;
    b *= rs;
    if (bias != nullptr) { a += bias[r0]; b += bias[r1]; }
    const int pos = *pos_p;
    if (head < H + K) {                                     // q or k: rotate the pair
        const float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
        const float ra = a * c - b * s, rb = b * c + a * s;
        a = ra; b = rb;
    }
    if (head < H) {
        q[r0] = a; q[r1] = b;
    } else {
        const bool is_k = head < H + K;
        const int kh = is_k ? head - H : head - H - K;
        float* dst = (is_k ? kc : vc) + ((size_t)kh * max_len + pos) * Dh;
        dst[i] = a; dst[i + half] = b;
    }
}

// ====================================================================================
// decode attention, the first version: one THREAD per query head does it all, its scores
// in a global scratch row (H, max_len). Serial over keys and dims: a ladder rung to time.
// ====================================================================================
__global__ void attn_decode_naive(const float* __restrict__ q, const float* __restrict__ kc,
                                  const float* __restrict__ vc, float* __restrict__ o,
                                  const int* __restrict__ pos_p, int H, int K, int Dh, int max_len,
                                  float scale, float* __restrict__ scratch) {
    pdl_wait();
    const int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= H) return;
    const int kh = h / (H / K), S = *pos_p + 1;
    const float* kb = kc + (size_t)kh * max_len * Dh;
    const float* vb = vc + (size_t)kh * max_len * Dh;
    float* sc = scratch + (size_t)h * max_len;
    float m = NEG_INF;
    for (int s = 0; s < S; ++s) {
        float d = 0.f;
        for (int j = 0; j < Dh; ++j) d += q[(size_t)h * Dh + j] * kb[(size_t)s * Dh + j];
        sc[s] = d * scale;
        m = fmaxf(m, sc[s]);
    }
    float l = 0.f;
    for (int s = 0; s < S; ++s) { sc[s] = expf(sc[s] - m); l += sc[s]; }
    for (int j = 0; j < Dh; ++j) {
        float acc = 0.f;
        for (int s = 0; s < S; ++s) acc += sc[s] * vb[(size_t)s * Dh + j];
        o[(size_t)h * Dh + j] = acc / l;
    }
}

// ====================================================================================
// decode attention: one block per query head h (KV head h / (H/K)), over the pos+1
// cached keys.   p = softmax(q . k_s / sqrt(Dh)),  o[h] = sum_s p_s v_s
// Scores: a THREAD per key (q in shared memory, the key row read with 16-byte loads), so
// all keys are in flight at once. Output: the block is split into G groups of Dh/4
// threads, each group sums every G-th key with 16-byte loads of v; the groups' partial
// sums are added in shared memory. Dynamic shared memory (floats): max_len scores, then Dh
// (q), each rounded up to a multiple of 4, then 4 * blockDim.x partial sums. Dh % 4 != 0
// falls back to scalar loops.
// ====================================================================================
__global__ void attn_decode(const float* __restrict__ q, const float* __restrict__ kc,
                            const float* __restrict__ vc, float* __restrict__ o, const int* __restrict__ pos_p,
                            int H, int K, int Dh, int max_len, float scale) {
    extern __shared__ float4 smem4[];                       // float4: 16-byte aligned
    float* smem = reinterpret_cast<float*>(smem4);
    float* sc = smem;                                       // (max_len,)
    float* qs = smem + ((max_len + 3) & ~3);                // (Dh,)
    float* part = qs + ((Dh + 3) & ~3);                     // (4 * blockDim.x,), 16-byte aligned
    __shared__ float sh[32];
    pdl_wait();
    const int h = blockIdx.x;
    const int kh = h / (H / K);
    const int S = *pos_p + 1;
    const float* kb = kc + (size_t)kh * max_len * Dh;
    const float* vb = vc + (size_t)kh * max_len * Dh;
    const bool v4 = (Dh & 3) == 0;
    for (int j = threadIdx.x; j < Dh; j += blockDim.x) qs[j] = __ldca(q + (size_t)h * Dh + j);
    __syncthreads();
    float m = NEG_INF;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {      // a thread per key
        const float* kr = kb + (size_t)s * Dh;
        float d0 = 0.f, d1 = 0.f;
        if (v4) {
#pragma unroll 4
            for (int j = 0; j < Dh; j += 8) {                  // unrolled: 8 loads of the row in flight
                const float4 ka = __ldca(reinterpret_cast<const float4*>(kr + j));
                d0 = fmaf(qs[j], ka.x, d0); d0 = fmaf(qs[j + 1], ka.y, d0);
                d0 = fmaf(qs[j + 2], ka.z, d0); d0 = fmaf(qs[j + 3], ka.w, d0);
                if (j + 4 < Dh) {
                    const float4 kb4 = __ldca(reinterpret_cast<const float4*>(kr + j + 4));
                    d1 = fmaf(qs[j + 4], kb4.x, d1); d1 = fmaf(qs[j + 5], kb4.y, d1);
                    d1 = fmaf(qs[j + 6], kb4.z, d1); d1 = fmaf(qs[j + 7], kb4.w, d1);
                }
            }
        } else {
            for (int j = 0; j < Dh; ++j) d0 = fmaf(qs[j], __ldca(kr + j), d0);
        }
        const float sv = (d0 + d1) * scale;
        sc[s] = sv;
        m = fmaxf(m, sv);
    }
    m = block_max(m, sh);                                    // subtract the max: exp never overflows
    float l = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const float e = expf(sc[s] - m);
        sc[s] = e;
        l += e;
    }
    l = block_sum(l, sh);                                    // (syncs: every sc[s] is written)
    const float inv = 1.0f / l;
    const int C = Dh / 4;                                    // float4 columns of a row
    if (v4 && C <= (int)blockDim.x) {
        const int G = blockDim.x / C;
        const int c = threadIdx.x % C, g = threadIdx.x / C;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        if (g < G) {
#pragma unroll 4
            for (int s = g; s < S; s += G) {
                const float p = sc[s];
                const float4 vv = __ldca(reinterpret_cast<const float4*>(vb + (size_t)s * Dh + 4 * c));
                acc.x = fmaf(p, vv.x, acc.x); acc.y = fmaf(p, vv.y, acc.y);
                acc.z = fmaf(p, vv.z, acc.z); acc.w = fmaf(p, vv.w, acc.w);
            }
        }
        reinterpret_cast<float4*>(part)[threadIdx.x] = acc;
        __syncthreads();
        for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
            float t = 0.f;
            for (int gg = 0; gg < G; ++gg) t += part[4 * (gg * C + j / 4) + (j & 3)];
            o[(size_t)h * Dh + j] = t * inv;
        }
    } else {
        for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
            float acc = 0.f;
            for (int s = 0; s < S; ++s) acc = fmaf(sc[s], __ldca(vb + (size_t)s * Dh + j), acc);
            o[(size_t)h * Dh + j] = acc * inv;
        }
    }
}

// ====================================================================================
// decode attention, split over keys (flash-decoding): block (h, c) takes the keys
// [c * ACH, (c + 1) * ACH) of query head h (ACH = 32), all at once: 8 lanes per key, each
// lane 1/8 of the dot product, so every load of the chunk is in flight together. It writes
// its partial softmax (max m_c, sum l_c, unnormalised acc_c = sum_s e^{score_s - m_c} v_s)
// to scratch; the last block of head h to finish (an atomic ticket, reset for the next
// step) merges them:  M = max m_c,  o = sum_c e^{m_c - M} acc_c / sum_c e^{m_c - M} l_c.
// A fixed grid (H, ceil(max_len / ACH)) serves every step of the graph: chunks past the
// current position only take their ticket. part: (H, NS, Dh + 2) floats; ticket: (H,) ints, 0.
// ====================================================================================
// thread-block clusters (sm_90): the blocks of a cluster read each other's shared memory
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned int cluster_rank() {
    unsigned int r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
    return r;
}
// the float at shared-memory address `a` (of this block's window) in block `rank` of the cluster
__device__ __forceinline__ float ld_cluster_f32(unsigned int a, unsigned int rank) {
    float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int ra;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(ra) : "memory");
#endif
    return v;
}
// the float4 at shared-memory address `a` (of this block's window) in block `rank` of the cluster
__device__ __forceinline__ float4 ld_cluster_f4(unsigned int a, unsigned int rank) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned int ra;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(ra) : "memory");
#endif
    return v;
}

// PRE (round 12): before the wait, each thread loads its first 4 float4s of the chunk's keys
// and values (Dh % 4 == 0) from the rows of the earlier positions, which no kernel of this
// step writes: only q and the current position's key and value row (written by q,k,v) and
// the partial sums wait for the kernel before; the current rows are then read from L2
// (__ldcg), since a line loaded before the wait may hold their old bytes (rows shorter than
// a line, or not aligned to one). The position comes from argmax_advance, which every kernel
// since has waited for. The values' loads then no longer wait for the scores either.
// CL (attn_decode_split_cl, sm_90): the chunk blocks of a head form clusters of CL along y;
// each writes its partial to shared memory and the cluster's first block merges them through
// distributed shared memory: with one cluster a head (max_len <= 32 CL) it writes o, with no
// fence, no ticket and no round trip through L2; with more, the clusters' partials go through
// the ticket as the chunks' do with CL = 1.
#define ACH 32                                               // keys per block
template <bool PRE, int CL, bool WM = false>
__device__ __forceinline__ void attn_split_body(const float* __restrict__ q, const float* __restrict__ kc,
                                                const float* __restrict__ vc, float* __restrict__ o,
                                                const int* __restrict__ pos_p, int H, int K, int Dh,
                                                int max_len, float scale, float* __restrict__ part,
                                                int* __restrict__ ticket) {
    __shared__ float sc[ACH];
    __shared__ float accs[256 * 4];
    __shared__ int last;
    __shared__ float pm[CL > 1 ? 1024 + 2 : 1];              // CL > 1: this block's partial (acc, m, l)
    __shared__ float wr[WM ? CL + 2 : 1];                    // WM: the lead's chunk weights, M, Lsum
    if (!PRE) pdl_wait();
    const int h = blockIdx.x, c = blockIdx.y, NS = gridDim.y, t = threadIdx.x;
    const int kh = h / (H / K);
    const int S = *pos_p + 1;
    const int s0 = c * ACH, n = max(0, min(ACH, S - s0));    // this block's keys
    const int P = Dh + 2;
    float* my = CL > 1 ? pm : part + ((size_t)h * NS + c) * P;
    const bool v4 = (Dh & 3) == 0;
    float4 kpre[4], vpre[4];                                 // PRE: loaded before the wait
    if (PRE) {
        const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
        const int key = t >> 3, l8 = t & 7;
        const int C = v4 ? Dh / 4 : 1, G = 256 / C, col = t % C, g = t / C;
        const float* kr = kc + ((size_t)kh * max_len + s0 + key) * Dh;
        const float* vb = vc + ((size_t)kh * max_len + s0) * Dh;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int j = 4 * l8 + 32 * i, s = g + G * i;
            kpre[i] = (v4 && key < n && s0 + key < S - 1 && j < Dh) ? __ldca(reinterpret_cast<const float4*>(kr + j)) : z;
            vpre[i] = (v4 && g < G && s < n && s0 + s < S - 1) ? __ldca(reinterpret_cast<const float4*>(vb + (size_t)s * Dh + 4 * col)) : z;
        }
        pdl_wait();
    }
    if (n > 0) {
        const float* qh = q + (size_t)h * Dh;
        const float* kb = kc + ((size_t)kh * max_len + s0) * Dh;
        const float* vb = vc + ((size_t)kh * max_len + s0) * Dh;
        // scores: key t / 8, lane t % 8 of its dot
        const int key = t >> 3, l8 = t & 7;
        float d = 0.f;
        if (key < n) {
            const float* kr = kb + (size_t)key * Dh;
            if (PRE && v4) {
                const bool cur = s0 + key == S - 1;           // this step's key: loaded now, from L2 (a line
                                                              // loaded before the wait may hold its old bytes)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = 4 * l8 + 32 * i;
                    if (j < Dh) {
                        const float4 a = cur ? __ldcg(reinterpret_cast<const float4*>(kr + j)) : kpre[i];
                        const float4 b = __ldca(reinterpret_cast<const float4*>(qh + j));
                        d = fmaf(a.x, b.x, d); d = fmaf(a.y, b.y, d); d = fmaf(a.z, b.z, d); d = fmaf(a.w, b.w, d);
                    }
                }
                for (int j = 4 * l8 + 128; j < Dh; j += 32) {
                    const float4 a = cur ? __ldcg(reinterpret_cast<const float4*>(kr + j))
                                         : __ldca(reinterpret_cast<const float4*>(kr + j));
                    const float4 b = __ldca(reinterpret_cast<const float4*>(qh + j));
                    d = fmaf(a.x, b.x, d); d = fmaf(a.y, b.y, d); d = fmaf(a.z, b.z, d); d = fmaf(a.w, b.w, d);
                }
            } else if (v4) {
                for (int j = 4 * l8; j < Dh; j += 32) {
                    const float4 a = __ldca(reinterpret_cast<const float4*>(kr + j));
                    const float4 b = __ldca(reinterpret_cast<const float4*>(qh + j));
                    d = fmaf(a.x, b.x, d); d = fmaf(a.y, b.y, d); d = fmaf(a.z, b.z, d); d = fmaf(a.w, b.w, d);
                }
            } else {
                for (int j = l8; j < Dh; j += 8) d = fmaf(__ldca(kr + j), __ldca(qh + j), d);
            }
        }
#pragma unroll
        for (int off = 4; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        if (l8 == 0 && key < ACH) sc[key] = key < n ? d * scale : NEG_INF;
        __syncthreads();
        // the chunk's max and exp-sum: one warp, a lane per key (ACH == 32)
        float m = NEG_INF, l = 0.f;
        if (t < 32) {
            const float v = sc[t];
            m = v;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
            const float e = t < n ? expf(v - m) : 0.f;
            sc[t] = e;
            l = warp_sum(e);
            if (t == 0) { my[Dh] = m; my[Dh + 1] = l; }
        }
        __syncthreads();
        // acc = sum_s e_s v_s: thread (g, col), G groups each summing every G-th key
        if (v4) {
            const int C = Dh / 4, G = 256 / C;
            const int col = t % C, g = t / C;
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
            if (PRE && g < G) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int s = g + G * i;
                    if (s < n) {
                        const float p = sc[s];
                        const float4 v = s0 + s == S - 1                  // this step's value row: from L2
                                             ? __ldcg(reinterpret_cast<const float4*>(vb + (size_t)s * Dh + 4 * col))
                                             : vpre[i];
                        a.x = fmaf(p, v.x, a.x); a.y = fmaf(p, v.y, a.y); a.z = fmaf(p, v.z, a.z); a.w = fmaf(p, v.w, a.w);
                    }
                }
                for (int s = g + 4 * G; s < n; s += G) {
                    const float p = sc[s];
                    const float4 v = s0 + s == S - 1 ? __ldcg(reinterpret_cast<const float4*>(vb + (size_t)s * Dh + 4 * col))
                                                     : __ldca(reinterpret_cast<const float4*>(vb + (size_t)s * Dh + 4 * col));
                    a.x = fmaf(p, v.x, a.x); a.y = fmaf(p, v.y, a.y); a.z = fmaf(p, v.z, a.z); a.w = fmaf(p, v.w, a.w);
                }
            } else if (g < G) {
                for (int s = g; s < n; s += G) {
                    const float p = sc[s];
                    const float4 v = __ldca(reinterpret_cast<const float4*>(vb + (size_t)s * Dh + 4 * col));
                    a.x = fmaf(p, v.x, a.x); a.y = fmaf(p, v.y, a.y); a.z = fmaf(p, v.z, a.z); a.w = fmaf(p, v.w, a.w);
                }
            }
            reinterpret_cast<float4*>(accs)[t] = a;
            __syncthreads();
            for (int j = t; j < Dh; j += 256) {
                float sum = 0.f;
                for (int gg = 0; gg < G; ++gg) sum += accs[4 * (gg * C + j / 4) + (j & 3)];
                my[j] = sum;
            }
        } else {
            for (int j = t; j < Dh; j += 256) {
                float sum = 0.f;
                for (int s = 0; s < n; ++s) sum = fmaf(sc[s], __ldca(vb + (size_t)s * Dh + j), sum);
                my[j] = sum;
            }
        }
    }
    int nc = (S + ACH - 1) / ACH;                           // chunks with keys
    if (CL > 1) {
        cluster_arrive();                                    // every block of the cluster has written pm
        cluster_wait();
        const bool lead = cluster_rank() == 0;               // (its chunk is the cluster's first)
        float* gp = part + ((size_t)h * (NS / CL) + c / CL) * P;   // the cluster's partial, several clusters
        if (WM && lead && n > 0) {
            // WM: warp 0 reads the nq (m, l) pairs at once, a lane each, and leaves each chunk's
            // weight in shared memory; then a thread's nq loads of acc are all in flight together
            const int nq = min(CL, (S - s0 + ACH - 1) / ACH);    // the cluster's blocks that had keys
            const unsigned int sb = (unsigned int)__cvta_generic_to_shared(pm);
            if (t < 32) {
                float m = NEG_INF, l = 0.f;
                if (t < nq) { m = ld_cluster_f32(sb + 4u * Dh, t); l = ld_cluster_f32(sb + 4u * (Dh + 1), t); }
                float M = m;
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
                const float e = t < nq ? expf(m - M) : 0.f;
                const float Lsum = warp_sum(l * e);
                if (t < CL) wr[t] = NS == CL ? e / Lsum : e;
                if (t == 0) { wr[CL] = M; wr[CL + 1] = Lsum; }
            }
            __syncthreads();
            for (int j = t; j < Dh; j += 256) {
                float a[CL];
#pragma unroll
                for (int r = 0; r < CL; ++r) a[r] = r < nq ? ld_cluster_f32(sb + 4u * j, r) : 0.f;
                float sum = 0.f;
#pragma unroll
                for (int r = 0; r < CL; ++r) sum = fmaf(a[r], wr[r], sum);
                if (NS == CL) o[(size_t)h * Dh + j] = sum;
                else gp[j] = sum;
            }
            if (NS != CL && t == 0) { gp[Dh] = wr[CL]; gp[Dh + 1] = wr[CL + 1]; }
        } else if (lead && n > 0) {
            const int nq = min(CL, (S - s0 + ACH - 1) / ACH);    // the cluster's blocks that had keys
            const unsigned int sb = (unsigned int)__cvta_generic_to_shared(pm);
            float M = NEG_INF;
            for (int r = 0; r < nq; ++r) M = fmaxf(M, ld_cluster_f32(sb + 4u * Dh, r));
            float Lsum = 0.f;
            for (int r = 0; r < nq; ++r)
                Lsum += ld_cluster_f32(sb + 4u * (Dh + 1), r) * expf(ld_cluster_f32(sb + 4u * Dh, r) - M);
            const float inv = 1.0f / Lsum;
            for (int j = t; j < Dh; j += 256) {
                float sum = 0.f;
                for (int r = 0; r < nq; ++r)
                    sum += ld_cluster_f32(sb + 4u * j, r) * expf(ld_cluster_f32(sb + 4u * Dh, r) - M);
                if (NS == CL) o[(size_t)h * Dh + j] = sum * inv;
                else gp[j] = sum;
            }
            if (NS != CL && t == 0) { gp[Dh] = M; gp[Dh + 1] = Lsum; }
        }
        cluster_arrive();                                    // no block leaves while the lead reads its pm
        cluster_wait();
        if (NS == CL || !lead) return;                       // one cluster a head: o is written
        nc = (nc + CL - 1) / CL;                             // the ticket merges the clusters' partials
    }
    // ticket: the last block of head h (with CL: of the clusters' leads) merges the chunks that had keys
    __threadfence();
    __syncthreads();
    if (t == 0) last = atomicAdd(ticket + h, 1) == NS / CL - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float* ph = part + (size_t)h * (NS / CL) * P;
    float M = NEG_INF;
    for (int cc = 0; cc < nc; ++cc) M = fmaxf(M, __ldca(ph + (size_t)cc * P + Dh));
    float Lsum = 0.f;
    for (int cc = 0; cc < nc; ++cc) Lsum += __ldca(ph + (size_t)cc * P + Dh + 1) * expf(__ldca(ph + (size_t)cc * P + Dh) - M);
    const float inv = 1.0f / Lsum;
    for (int j = t; j < Dh; j += 256) {
        float sum = 0.f;
        for (int cc = 0; cc < nc; ++cc) sum += __ldca(ph + (size_t)cc * P + j) * expf(__ldca(ph + (size_t)cc * P + Dh) - M);
        o[(size_t)h * Dh + j] = sum * inv;
    }
    if (t == 0) ticket[h] = 0;
}

template <bool PRE = false>
__global__ void __launch_bounds__(256) attn_decode_split(const float* __restrict__ q, const float* __restrict__ kc,
                                                         const float* __restrict__ vc, float* __restrict__ o,
                                                         const int* __restrict__ pos_p, int H, int K, int Dh,
                                                         int max_len, float scale, float* __restrict__ part,
                                                         int* __restrict__ ticket) {
    attn_split_body<PRE, 1>(q, kc, vc, o, pos_p, H, K, Dh, max_len, scale, part, ticket);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <bool PRE, int CL, bool WM = false>
__global__ void __cluster_dims__(1, CL, 1) __launch_bounds__(256)
attn_decode_split_cl(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
                     float* __restrict__ o, const int* __restrict__ pos_p, int H, int K, int Dh, int max_len,
                     float scale, float* __restrict__ part, int* __restrict__ ticket) {
    attn_split_body<PRE, CL, WM>(q, kc, vc, o, pos_p, H, K, Dh, max_len, scale, part, ticket);
}
#endif

// ====================================================================================
// dense FFN, first half: one warp per neuron f, RMSNorm fused (x raw; the norm weight is
// folded into wg and wu):
//   h[f] = a(rstd * wg[f] . x) * b(rstd * wu[f] . x)   (gated)      h[f] = a(...)   (plain)
// count (optional, null = off): count[pos * n_layers + layer] += #{f : h[f] != 0}
// ====================================================================================
template <typename W, int U = 4>
__global__ void __launch_bounds__(NTHREADS) ffn_gateup(const W* __restrict__ wg, const W* __restrict__ wu,
                                                       const float* __restrict__ x, float* __restrict__ h,
                                                       int F, int ld, int D, float eps, int gate_kind, int up_kind,
                                                       float thr, int gated, int* __restrict__ count,
                                                       const int* __restrict__ pos_p, int layer, int n_layers) {
    __shared__ int nz;
    if (threadIdx.x == 0) nz = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int f = blockIdx.x * WARPS + (threadIdx.x >> 5);
#if EARLY
    if (f >= F) pdl_wait();                                  // (a live warp waits in warp_dots)
#else
    if (f < F) {
        prefetch_row(wg + (size_t)f * ld, ld, lane);
        if (gated) prefetch_row(wu + (size_t)f * ld, ld, lane);
    }
    pdl_wait();
#endif
    if (f < F) {
        float g, u = 0.f, ss;
        if (gated) warp_dots<W, 2, true, U, EARLY != 0>(wg + (size_t)f * ld, wu + (size_t)f * ld, x, ld, lane, &g, &u, &ss);
        else warp_dots<W, 1, true, U, EARLY != 0>(wg + (size_t)f * ld, wg, x, ld, lane, &g, &u, &ss);
        if (lane == 0) {
            const float rs = rstd_of(ss, D, eps);
            float v = act_fn<float>(g * rs, gate_kind, thr);
            if (gated) v = v * act_fn<float>(u * rs, up_kind, thr);
            h[f] = v;
            if (count != nullptr && v != 0.f) atomicAdd(&nz, 1);
        }
    }
    if (count != nullptr) {
        __syncthreads();
        if (threadIdx.x == 0 && nz) atomicAdd(count + (size_t)(*pos_p) * n_layers + layer, nz);
    }
}

// ====================================================================================
// neuron-skipping FFN, own kernels (two launches, no host round trip, norm fused):
//  ffn_gate_select  skip: one warp per neuron; gate dot (and rstd); a = act(g); a neuron
//                   whose a is nonzero reads its up row right away (same warp), takes a
//                   slot from the atomic counter: idx[slot] = f, hv[slot] = a * b(u).
//                   Inactive neurons cost the gate row only.
//  ffn_gateup_list  given: one warp per listed neuron (idx, *cnt fixed): both rows, h.
//  ffn_down_rows    x += sum_j hv[j] * wd[idx[j]] (wd neuron-major (F, ld)): blocks tile
//                   (columns) x (slot ranges); a warp accumulates 32*V*NV columns of its
//                   slots in registers; the block reduces its warps in shared memory, then
//                   one atomicAdd per column per block, straight into the residual stream.
// ====================================================================================
template <typename W, int U = 4>
__global__ void __launch_bounds__(NTHREADS) ffn_gate_select(const W* __restrict__ wg, const W* __restrict__ wu,
                                                            const float* __restrict__ x, int F, int ld, int D,
                                                            float eps, int gate_kind, int up_kind, float thr,
                                                            int gated, int* __restrict__ cnt, int* __restrict__ idx,
                                                            float* __restrict__ hv) {
    const int lane = threadIdx.x & 31;
    const int f = blockIdx.x * WARPS + (threadIdx.x >> 5);
#if !EARLY
    if (f < F) prefetch_row(wg + (size_t)f * ld, ld, lane);
    pdl_wait();
#endif
    if (f >= F) return;
    float g, unused, ss;
    warp_dots<W, 1, true, U, EARLY != 0>(wg + (size_t)f * ld, wg, x, ld, lane, &g, &unused, &ss);
    const float rs = rstd_of(ss, D, eps);
    float a = act_fn<float>(g * rs, gate_kind, thr);
    if (!(fabsf(a) > 0.f) && a == a) return;                // exactly zero (NaN is kept): skip f
    if (gated) {
        float u = warp_dot_vec16<W>(wu + (size_t)f * ld, x, ld, lane);
        a = a * act_fn<float>(u * rs, up_kind, thr);
    }
    if (lane == 0) {
        const int slot = atomicAdd(cnt, 1);
        idx[slot] = f;
        hv[slot] = a;
    }
}

template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_gateup_list(const W* __restrict__ wg, const W* __restrict__ wu,
                                                            const float* __restrict__ x, int ld, int D, float eps,
                                                            int gate_kind, int up_kind, float thr, int gated,
                                                            const int* __restrict__ cnt, const int* __restrict__ idx,
                                                            float* __restrict__ hv) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const bool live = j < *cnt;                              // cnt, idx: the fixed active set
    const int f = live ? idx[j] : 0;
    if (live) {
        prefetch_row(wg + (size_t)f * ld, ld, lane);
        if (gated) prefetch_row(wu + (size_t)f * ld, ld, lane);
    }
    pdl_wait();
    if (!live) return;
    float g, u = 0.f, ss;
    if (gated) warp_dots<W, 2, true>(wg + (size_t)f * ld, wu + (size_t)f * ld, x, ld, lane, &g, &u, &ss);
    else warp_dots<W, 1, true>(wg + (size_t)f * ld, wg, x, ld, lane, &g, &u, &ss);
    if (lane == 0) {
        const float rs = rstd_of(ss, D, eps);
        float v = act_fn<float>(g * rs, gate_kind, thr);
        if (gated) v = v * act_fn<float>(u * rs, up_kind, thr);
        hv[j] = v;
    }
}

// the second rungs of the two sparse first halves:
//  ffn_gate_select2  skip: a warp streams the gate rows of TWO neurons at once (twice the
//                    loads in flight, half the warps: the grid fits one wave); up rows only
//                    for the active ones, both at once when both are.
//  ffn_gateup_list4  given: FOUR warps per listed neuron, each a quarter of its gate and up
//                    rows, so a row's loads are all in flight in one round; partial dots
//                    (and x^2 sums) added in shared memory.
__device__ __forceinline__ bool kept(float a) { return fabsf(a) > 0.f || a != a; }   // nonzero or NaN

template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_gate_select2(const W* __restrict__ wg, const W* __restrict__ wu,
                                                             const float* __restrict__ x, int F, int ld, int D,
                                                             float eps, int gate_kind, int up_kind, float thr,
                                                             int gated, int* __restrict__ cnt, int* __restrict__ idx,
                                                             float* __restrict__ hv) {
    const int lane = threadIdx.x & 31;
    const int f0 = 2 * (blockIdx.x * WARPS + (threadIdx.x >> 5)), f1 = f0 + 1;
    const bool two = f1 < F;
    if (f0 < F) prefetch_row(wg + (size_t)f0 * ld, ld, lane);
    if (two) prefetch_row(wg + (size_t)f1 * ld, ld, lane);
    pdl_wait();
    if (f0 >= F) return;
    float g0, g1, ss;
    warp_dots<W, 2, true>(wg + (size_t)f0 * ld, wg + (size_t)(two ? f1 : f0) * ld, x, ld, lane, &g0, &g1, &ss);
    const float rs = rstd_of(ss, D, eps);
    float a0 = act_fn<float>(g0 * rs, gate_kind, thr);
    float a1 = act_fn<float>(g1 * rs, gate_kind, thr);
    const bool k0 = kept(a0), k1 = two && kept(a1);
    if (!k0 && !k1) return;                                  // both exactly zero: skip
    if (gated) {
        if (k0 && k1) {
            float u0, u1, unused;
            warp_dots<W, 2, false>(wu + (size_t)f0 * ld, wu + (size_t)f1 * ld, x, ld, lane, &u0, &u1, &unused);
            a0 = a0 * act_fn<float>(u0 * rs, up_kind, thr);
            a1 = a1 * act_fn<float>(u1 * rs, up_kind, thr);
        } else {
            const float u = warp_dot_vec16<W>(wu + (size_t)(k0 ? f0 : f1) * ld, x, ld, lane);
            if (k0) a0 = a0 * act_fn<float>(u * rs, up_kind, thr);
            else a1 = a1 * act_fn<float>(u * rs, up_kind, thr);
        }
    }
    if (lane == 0) {
        int slot = atomicAdd(cnt, (int)k0 + (int)k1);
        if (k0) { idx[slot] = f0; hv[slot] = a0; ++slot; }
        if (k1) { idx[slot] = f1; hv[slot] = a1; }
    }
}

template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_gateup_list4(const W* __restrict__ wg, const W* __restrict__ wu,
                                                             const float* __restrict__ x, int ld, int D, float eps,
                                                             int gate_kind, int up_kind, float thr, int gated,
                                                             const int* __restrict__ cnt, const int* __restrict__ idx,
                                                             float* __restrict__ hv) {
    __shared__ float red[WARPS][3];
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int j = blockIdx.x * (WARPS / 4) + (wid >> 2), qt = wid & 3;
    const int nvec = ld / V, nq = (nvec + 3) / 4;
    const int v0 = min(nvec, qt * nq), len = min(nq, nvec - v0);   // this warp's quarter (vectors)
    const bool live = j < *cnt;                              // cnt, idx: the fixed active set
    const int f = live ? idx[j] : 0;
    const size_t off = (size_t)f * ld + (size_t)v0 * V;
#if EARLY
    if (!(live && len > 0)) pdl_wait();                      // (a live warp waits in warp_dots)
#else
    if (live && len > 0) {
        prefetch_row(wg + off, len * V, lane);
        if (gated) prefetch_row(wu + off, len * V, lane);
    }
    pdl_wait();
#endif
    float g = 0.f, u = 0.f, ss = 0.f;
    if (live && len > 0) {
        if (gated) warp_dots<W, 2, true, 4, EARLY != 0>(wg + off, wu + off, x + (size_t)v0 * V, len * V, lane, &g, &u, &ss);
        else warp_dots<W, 1, true, 4, EARLY != 0>(wg + off, wg, x + (size_t)v0 * V, len * V, lane, &g, &u, &ss);
    }
    if (lane == 0) { red[wid][0] = g; red[wid][1] = u; red[wid][2] = ss; }
    __syncthreads();
    if (live && qt == 0 && lane == 0) {
        float G = 0.f, U = 0.f, SS = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) { G += red[wid + w][0]; U += red[wid + w][1]; SS += red[wid + w][2]; }
        const float rs = rstd_of(SS, D, eps);
        float v = act_fn<float>(G * rs, gate_kind, thr);
        if (gated) v = v * act_fn<float>(U * rs, up_kind, thr);
        hv[j] = v;
    }
}

//  ffn_up_list4      skip, third rung (three launches): ffn_gate_select with gated = 0 is a
//                    pure gate pass (hv[slot] = a(gate), no up rows: every warp the same
//                    work), then this kernel finishes the kept neurons, four warps per neuron
//                    as ffn_gateup_list4:  hv[j] *= b(rstd * wu[idx[j]] . x),  j < *cnt.
//                    cnt comes from the kernel before, so the grid is fixed and strides.
template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_up_list4(const W* __restrict__ wu, const float* __restrict__ x,
                                                         int ld, int D, float eps, int up_kind, float thr,
                                                         const int* __restrict__ cnt, const int* __restrict__ idx,
                                                         float* __restrict__ hv) {
    __shared__ float red[WARPS][2];
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, qt = wid & 3;
    const int nvec = ld / V, nq = (nvec + 3) / 4;
    const int v0 = min(nvec, qt * nq), len = min(nq, nvec - v0);   // this warp's quarter (vectors)
    pdl_wait();
    const int n = __ldca(cnt);
    for (int jb = blockIdx.x * (WARPS / 4); jb < n; jb += gridDim.x * (WARPS / 4)) {   // uniform per block
        const int j = jb + (wid >> 2);
        const bool live = j < n;
        float u = 0.f, ss = 0.f, unused;
        if (live && len > 0)
            warp_dots<W, 1, true>(wu + (size_t)__ldca(idx + j) * ld + (size_t)v0 * V, wu, x + (size_t)v0 * V, len * V,
                                  lane, &u, &unused, &ss);
        if (lane == 0) { red[wid][0] = u; red[wid][1] = ss; }
        __syncthreads();
        if (live && qt == 0 && lane == 0) {
            float U = 0.f, SS = 0.f;
#pragma unroll
            for (int w = 0; w < 4; ++w) { U += red[wid + w][0]; SS += red[wid + w][1]; }
            hv[j] = hv[j] * act_fn<float>(U * rstd_of(SS, D, eps), up_kind, thr);
        }
        __syncthreads();
    }
}

// warp wid's eighth of a row of nvec 16-byte vectors: vectors [v0, v0 + len) (len may be 0)
__device__ __forceinline__ void warp_eighth(int nvec, int wid, int* v0, int* len) {
    const int ns = (nvec + WARPS - 1) / WARPS;
    *v0 = min(nvec, wid * ns);
    *len = min(ns, nvec - *v0);
}

// The up phase of ffn_gate_block<..., UB = true>: this warp's eighth (vectors v0 .. v0 +
// len) of the up rows of the block's n kept neurons kf[0..n), up to 4 rows at a time with
// every load of the 4 rows in flight at once (two 16-byte loads per lane and row per round),
// so a block keeping 1-4 neurons waits for one round trip, not two per neuron as the loop
// over warp_dots does; part[m][wid] = the eighth's dot product.
template <typename W>
__device__ __forceinline__ void up_eighths(const W* __restrict__ wu, const float* __restrict__ x, int ld,
                                           int v0, int len, const int* kf, int n, int lane,
                                           float (*part)[WARPS + 1], int wid) {
    const int V = VecOf<W>::N;
    for (int m0 = 0; m0 < n; m0 += 4) {                      // n: the same in every thread
        const int nm = min(4, n - m0);
        float u[4] = {0.f, 0.f, 0.f, 0.f};
        for (int v = lane; v < len; v += 64) {
            uint4 raw[4][2];
#pragma unroll
            for (int mm = 0; mm < 4; ++mm)
#pragma unroll
                for (int t = 0; t < 2; ++t)
                    raw[mm][t] = (mm < nm && v + 32 * t < len)
                                     ? ld16raw(wu + (size_t)kf[m0 + mm] * ld + (size_t)(v0 + v + 32 * t) * V)
                                     : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                if (v + 32 * t >= len) break;
                float xv[V], w[V];
                ldx<V>(x + (size_t)(v0 + v + 32 * t) * V, xv);
#pragma unroll
                for (int mm = 0; mm < 4; ++mm) {
                    cvt16(raw[mm][t], w, W());
#pragma unroll
                    for (int k = 0; k < V; ++k) u[mm] = fmaf(w[k], xv[k], u[mm]);
                }
            }
        }
#pragma unroll
        for (int mm = 0; mm < 4; ++mm) {
            const float t = warp_sum(u[mm]);
            if (mm < nm && lane == 0) part[m0 + mm][wid] = t;
        }
    }
}

//  ffn_gate_block    skip, fourth rung (two launches): as the pure gate pass, a warp per
//                    neuron streams its gate row (U sixteen-byte loads in flight per lane);
//                    the block's kept neurons (0..8, ~0.8 at 90% zeros) are collected in
//                    shared memory, then all 8 warps read the kept up rows together, an
//                    eighth of each row per warp (every load of a row in one round), and one
//                    thread per kept neuron sums the eighths: hv[slot] = a(gate) * b(up).
//                    No launch and no grid-wide wait for the up rows; a block whose neurons
//                    are all zero leaves after its gate rows.
template <typename W, int U, bool EL = false, bool UB = false, int FN = 0>
__global__ void __launch_bounds__(NTHREADS) ffn_gate_block(const W* __restrict__ wg, const W* __restrict__ wu,
                                                           const float* __restrict__ x, int F, int ld, int D,
                                                           float eps, int gate_kind, int up_kind, float thr,
                                                           int gated, int* __restrict__ cnt, int* __restrict__ idx,
                                                           float* __restrict__ hv) {
    __shared__ int nk, base;
    __shared__ int kf[WARPS];                                // the block's kept neurons
    __shared__ float ka[WARPS], krs[WARPS];                  // their a(gate) and rstd
    __shared__ float part[WARPS][WARPS + 1];                 // [kept neuron][warp]: partial up dots
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int f = blockIdx.x * WARPS + wid;
    constexpr bool E = EL && EARLY;                          // first round of gate loads before the wait
    if (threadIdx.x == 0) nk = 0;
    if (!E) {
        if (f < F) prefetch_row(wg + (size_t)f * ld, ld, lane);
        pdl_wait();
    } else if (f >= F) {
        pdl_wait();                                          // (a live warp waits in warp_dots)
    }
    __syncthreads();
    if (f < F) {
        float g, unused, ss;
        warp_dots<W, 1, true, U, E, float, FN>(wg + (size_t)f * ld, wg, x, ld, lane, &g, &unused, &ss);
        const float rs = rstd_of(ss, D, eps);
        const float a = act_fn<float>(g * rs, gate_kind, thr);
        if (lane == 0 && kept(a)) {                          // nonzero or NaN: keep f
            const int m = atomicAdd(&nk, 1);
            kf[m] = f; ka[m] = a; krs[m] = rs;
        }
    }
    __syncthreads();
    const int n = nk;                                        // the same in every thread
    if (n == 0) return;
    if (threadIdx.x == 0) base = atomicAdd(cnt, n);          // one global atomic per block
    if (gated) {
        int v0, len;
        warp_eighth(ld / V, wid, &v0, &len);
        if (UB) {
            up_eighths<W>(wu, x, ld, v0, len, kf, n, lane, part, wid);
        } else {
            for (int m = 0; m < n; ++m) {
                float u = 0.f, unused;
                if (len > 0)
                    warp_dots<W, 1, false>(wu + (size_t)kf[m] * ld + (size_t)v0 * V, wu, x + (size_t)v0 * V, len * V,
                                           lane, &u, &unused, &unused);
                if (lane == 0) part[m][wid] = u;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < n) {
        const int m = threadIdx.x;
        float a = ka[m];
        if (gated) {
            float u = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) u += part[m][w];
            a = a * act_fn<float>(u * krs[m], up_kind, thr);
        }
        idx[base + m] = kf[m];
        hv[base + m] = a;
    }
}

//  ffn_gate_block2   skip, fifth rung (two launches; round 10): the dense first kernel's
//                    shape for the gate pass. A warp streams TWO gate rows at once (neurons
//                    f and f + 8 of a group of 16, warp_dots with NR = 2: 2 U loads in flight
//                    per lane, FN: a fence after each round, see round_fence), P
//                    groups in turn, then the batched up phase (up_eighths) for the block's
//                    kept neurons (0..16 P, ~1.6 P at 90% zeros), one global atomic per block.
//                    EL: the first round of gate loads before the wait.
template <typename W, int U, int FN = 0, bool EL = false, int P = 1>
__global__ void __launch_bounds__(NTHREADS) ffn_gate_block2(const W* __restrict__ wg, const W* __restrict__ wu,
                                                            const float* __restrict__ x, int F, int ld, int D,
                                                            float eps, int gate_kind, int up_kind, float thr,
                                                            int gated, int* __restrict__ cnt, int* __restrict__ idx,
                                                            float* __restrict__ hv) {
    __shared__ int nk, base;
    __shared__ int kf[2 * WARPS * P];                        // the block's kept neurons
    __shared__ float ka[2 * WARPS * P], krs[2 * WARPS * P];  // their a(gate) and rstd
    __shared__ float part[2 * WARPS * P][WARPS + 1];         // [kept neuron][warp]: partial up dots
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int fb = blockIdx.x * 2 * WARPS * P + wid;         // this warp's first neuron
    constexpr bool E = EL && EARLY;                          // first round of gate loads before the wait
    if (threadIdx.x == 0) nk = 0;
    if (!E) {
        if (fb < F) prefetch_row(wg + (size_t)fb * ld, ld, lane);
        if (fb + WARPS < F) prefetch_row(wg + (size_t)(fb + WARPS) * ld, ld, lane);
        pdl_wait();
    } else if (fb >= F) {
        pdl_wait();                                          // (a live warp waits in warp_dots)
    }
    __syncthreads();
#pragma unroll 1
    for (int p = 0; p < P; ++p) {
        const int f0 = fb + 2 * WARPS * p, f1 = f0 + WARPS;
        if (f0 >= F) break;
        float g0, g1, ss;
        if (p == 0)
            warp_dots<W, 2, true, U, E, float, FN>(wg + (size_t)f0 * ld, wg + (size_t)(f1 < F ? f1 : f0) * ld, x, ld,
                                                   lane, &g0, &g1, &ss);
        else
            warp_dots<W, 2, true, U, false, float, FN>(wg + (size_t)f0 * ld, wg + (size_t)(f1 < F ? f1 : f0) * ld, x,
                                                       ld, lane, &g0, &g1, &ss);
        const float rs = rstd_of(ss, D, eps);
        const float a0 = act_fn<float>(g0 * rs, gate_kind, thr);
        const float a1 = act_fn<float>(g1 * rs, gate_kind, thr);
        if (lane == 0 && kept(a0)) {                         // nonzero or NaN: keep f0
            const int m = atomicAdd(&nk, 1);
            kf[m] = f0; ka[m] = a0; krs[m] = rs;
        }
        if (lane == 0 && f1 < F && kept(a1)) {
            const int m = atomicAdd(&nk, 1);
            kf[m] = f1; ka[m] = a1; krs[m] = rs;
        }
    }
    __syncthreads();
    const int n = nk;                                        // the same in every thread
    if (n == 0) return;
    if (threadIdx.x == 0) base = atomicAdd(cnt, n);          // one global atomic per block
    if (gated) {
        int v0, len;
        warp_eighth(ld / V, wid, &v0, &len);
        up_eighths<W>(wu, x, ld, v0, len, kf, n, lane, part, wid);
    }
    __syncthreads();
    for (int m = threadIdx.x; m < n; m += blockDim.x) {
        float a = ka[m];
        if (gated) {
            float u = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) u += part[m][w];
            a = a * act_fn<float>(u * krs[m], up_kind, thr);
        }
        idx[base + m] = kf[m];
        hv[base + m] = a;
    }
}

#define NV 2                                                 // 16-byte vectors per lane in ffn_down_rows
// x[col0 + i] += the block's sum over its warps of acc (lane's NV vectors of V columns,
// at col0 + qv * 32 * V + lane * V): through shared memory, one atomicAdd per column
template <typename W>
__device__ __forceinline__ void cols_add(const float* acc, int col0, float* x, int ld,
                                         float (*red)[32 * VecOf<W>::N * NV]) {
    const int V = VecOf<W>::N;
    const int CW = 32 * V * NV;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
    for (int qv = 0; qv < NV; ++qv)
#pragma unroll
        for (int k = 0; k < V; ++k) red[wid][qv * 32 * V + lane * V + k] = acc[qv * V + k];
    __syncthreads();
    for (int i = threadIdx.x; i < CW; i += blockDim.x) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) t += red[w][i];
        if (col0 + i < ld && t != 0.f) atomicAdd(x + col0 + i, t);
    }
}

// x[col0 : col0 + CW] += sum_{lo <= j < hi} hv[j] * wd[idx[j], col0 : col0 + CW], one block:
// a warp accumulates its slots' columns in registers (4 rows' loads in flight), the block
// reduces its warps in shared memory (red), then one atomicAdd per column.
template <typename W>
__device__ __forceinline__ void down_rows_tile(int lo, int hi, int col0, const int* __restrict__ idx,
                                               const float* __restrict__ hv,
                                               const W* __restrict__ wd, float* x, int ld,
                                               float (*red)[32 * VecOf<W>::N * NV]) {
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    float acc[NV * V];
#pragma unroll
    for (int k = 0; k < NV * V; ++k) acc[k] = 0.f;
#pragma unroll 4
    for (int j = lo + wid; j < hi; j += WARPS) {            // unrolled: 4 rows' loads in flight
        const W* row = wd + (size_t)__ldca(idx + j) * ld;
        const float hj = __ldca(hv + j);
        uint4 raw[NV];
#pragma unroll
        for (int qv = 0; qv < NV; ++qv) {
            const int c = col0 + qv * 32 * V + lane * V;
            raw[qv] = c < ld ? ld16raw(row + c) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int qv = 0; qv < NV; ++qv) {
            float w[V];
            cvt16(raw[qv], w, W());
#pragma unroll
            for (int k = 0; k < V; ++k) acc[qv * V + k] = fmaf(hj, w[k], acc[qv * V + k]);
        }
    }
    cols_add<W>(acc, col0, x, ld, red);
}

template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_down_rows(const int* __restrict__ cnt, const int* __restrict__ idx,
                                                          const float* __restrict__ hv, const W* __restrict__ wd,
                                                          float* __restrict__ x, int ld) {
    __shared__ float red[WARPS][32 * VecOf<W>::N * NV];
    pdl_wait();                                              // cnt, idx, hv: from the kernel before
    const int n = __ldca(cnt);
    const int G = gridDim.y;
    const int chunk = (n + G - 1) / G;
    const int lo = blockIdx.y * chunk, hi = min(n, lo + chunk);
    if (lo >= hi) return;                                    // whole block
    down_rows_tile<W>(lo, hi, blockIdx.x * 32 * VecOf<W>::N * NV, idx, hv, wd, x, ld, red);
}

// ffn_down_rows_il: as ffn_down_rows, with the kept rows dealt out in turn (row j to block
// row j % G, warp (j / G) % WARPS) instead of in chunks, so a warp's first 4 slots are known
// before the count is: their ids and h values are loaded together with cnt (slots < cap,
// the list's length, are always in the buffers; those >= *cnt are dropped), which takes one
// dependent round trip (count -> list) off the kernel's critical path.
template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_down_rows_il(const int* __restrict__ cnt, const int* __restrict__ idx,
                                                             const float* __restrict__ hv, const W* __restrict__ wd,
                                                             float* __restrict__ x, int ld, int cap) {
    __shared__ float red[WARPS][32 * VecOf<W>::N * NV];
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int S = gridDim.y * WARPS;                         // slots per round of the whole grid
    const int col0 = blockIdx.x * 32 * V * NV;
    pdl_wait();                                              // cnt, idx, hv: from the kernel before
    int jr[4];
    float hr[4];
    int jb = blockIdx.y + gridDim.y * wid;
#pragma unroll
    for (int t = 0; t < 4; ++t) {                            // not dependent on the count
        const int j = jb + S * t;
        jr[t] = j < cap ? __ldca(idx + j) : 0;
        hr[t] = j < cap ? __ldca(hv + j) : 0.f;
    }
    const int n = __ldca(cnt);
    float acc[NV * 8];
#pragma unroll
    for (int k = 0; k < NV * V; ++k) acc[k] = 0.f;
    for (; jb < n; jb += 4 * S) {
        uint4 raw[4][NV];
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int qv = 0; qv < NV; ++qv) {
                const int c = col0 + qv * 32 * V + lane * V;
                raw[t][qv] = (jb + S * t < n && c < ld) ? ld16raw(wd + (size_t)jr[t] * ld + c)
                                                        : make_uint4(0u, 0u, 0u, 0u);
            }
        float hn[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) hn[t] = jb + S * t < n ? hr[t] : 0.f;
        if (jb + 4 * S < n) {                                // the next 4 slots (n > 4 S rows: rare)
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const int j = jb + 4 * S + S * t;
                jr[t] = j < n ? __ldca(idx + j) : 0;
                hr[t] = j < n ? __ldca(hv + j) : 0.f;
            }
        }
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int qv = 0; qv < NV; ++qv) {
                float w[V];
                cvt16(raw[t][qv], w, W());
#pragma unroll
                for (int k = 0; k < V; ++k) acc[qv * V + k] = fmaf(hn[t], w[k], acc[qv * V + k]);
            }
    }
    if ((int)blockIdx.y >= n) return;                        // (block-uniform) no slot of this block
    cols_add<W>(acc, col0, x, ld, red);
}

// ====================================================================================
// greedy argmax of the logits (ties: the lowest id, as np.argmax), then advance:
//   tokens[pos + 1] = argmax   (only past the prompt: pos + 1 >= n_prompt)
//   pos += 1
// One block. zero (optional): n_zero counters the step must leave at 0 (the skipping
// FFN's); record (optional): record[pos * n_zero + i] = zero[i] first (per-layer counts).
// ====================================================================================
__global__ void argmax_advance(const float* __restrict__ logits, int V, int* __restrict__ tokens,
                               int* __restrict__ pos_p, const int* __restrict__ n_prompt, int max_len,
                               int* __restrict__ zero, int n_zero, int* __restrict__ record) {
    __shared__ float sv[32];
    __shared__ int si[32];
    pdl_wait();
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = __ldca(logits + i);
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sv[wid] = best; si[wid] = bi; }
    const int p = *pos_p;
    if (zero != nullptr) {
        for (int i = threadIdx.x; i < n_zero; i += blockDim.x) {
            if (record != nullptr) record[(size_t)p * n_zero + i] = zero[i];
            zero[i] = 0;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; ++w)
            if (sv[w] > best || (sv[w] == best && si[w] < bi)) { best = sv[w]; bi = si[w]; }
        if (bi == 0x7fffffff) bi = 0;                      // every logit NaN
        if (p + 1 < max_len && p + 1 >= *n_prompt) tokens[p + 1] = bi;
        *pos_p = p + 1;
    }
}

// ====================================================================================
// the LM head and the greedy argmax in one launch (the next rung after gemv_vec16_norm +
// argmax_advance, whose single block scans all V logits: ~7 us a token on the H200).
// Each block: its WARPS rows' logits (RMSNorm fused), then its best (value, lowest id)
// as one 64-bit key, atomicMax'ed into *best; the last block to finish (a ticket) reads
// the winner and advances as argmax_advance does, then resets *best and *ticket to 0.
// key: the float's bits made order-preserving (-0 taken as +0, so ties between them go
// to the lowest id as in np.argmax) over (0xffffffff - id). NaN logits are passed over
// (key 0), as argmax_advance does; every logit NaN: id 0.
// ====================================================================================
__device__ __forceinline__ unsigned long long argmax_key(float v, int r) {
    if (v != v) return 0ull;
    const unsigned int u = __float_as_uint(v == 0.f ? 0.f : v);
    const unsigned int o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)o << 32) | (unsigned long long)(0xffffffffu - (unsigned int)r);
}

template <typename W, int U = 4>
__global__ void __launch_bounds__(NTHREADS) head_argmax(const W* __restrict__ w, const float* __restrict__ x,
                                                        float* __restrict__ logits, int N, int ld, int D, float eps,
                                                        unsigned long long* __restrict__ best,
                                                        unsigned int* __restrict__ ticket, int* __restrict__ tokens,
                                                        int* __restrict__ pos_p, const int* __restrict__ n_prompt,
                                                        int max_len, int* __restrict__ zero, int n_zero,
                                                        int* __restrict__ record) {
    __shared__ unsigned long long sb[WARPS];
    __shared__ int last;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int r = blockIdx.x * WARPS + wid;
    unsigned long long key = 0ull;
#if EARLY
    if (r >= N) pdl_wait();                                  // (a live warp waits in warp_dots)
#else
    if (r < N) prefetch_row(w + (size_t)r * ld, ld, lane);
    pdl_wait();
#endif
    if (r < N) {
        float s, ss, unused;
        warp_dots<W, 1, true, U, EARLY != 0>(w + (size_t)r * ld, w, x, ld, lane, &s, &unused, &ss);
        const float v = s * rstd_of(ss, D, eps);
        if (lane == 0) logits[r] = v;
        key = argmax_key(v, r);
    }
    if (lane == 0) sb[wid] = key;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long m = sb[0];
#pragma unroll
        for (int i = 1; i < WARPS; ++i) m = sb[i] > m ? sb[i] : m;
        if (m) atomicMax(best, m);
        __threadfence();                                     // our candidate is visible before our ticket
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int p = *pos_p;
    if (zero != nullptr) {
        for (int i = threadIdx.x; i < n_zero; i += blockDim.x) {
            if (record != nullptr) record[(size_t)p * n_zero + i] = zero[i];
            zero[i] = 0;
        }
    }
    __syncthreads();                                         // every thread has read *pos_p
    if (threadIdx.x == 0) {
        const unsigned long long m = atomicMax(best, 0ull);  // (an atomic read)
        const int bi = m ? (int)(0xffffffffu - (unsigned int)(m & 0xffffffffull)) : 0;
        if (p + 1 < max_len && p + 1 >= *n_prompt) tokens[p + 1] = bi;
        *pos_p = p + 1;
        *best = 0ull;
        *ticket = 0u;
    }
}

// ====================================================================================
// the CuPy backend's batch-1 FFN given a mask of active neurons (sparse_ffn(...,
// backend="cupy", active=mask) and ffn_device): two launches, no host round trip, no
// norm, x float32 or float16, y in x's dtype.
//  ffn_gateup_mask  block b scans mask[b*MSPAN, (b+1)*MSPAN), collects its active
//                   neurons in shared memory, then four warps per neuron (quarters of
//                   both rows, as ffn_gateup_list4): slot = atomicAdd(cnt), idx, hv.
//  ffn_down_rows_out  ffn_down_rows into a float32 accumulator y32 (zero between calls);
//                   the last block (a ticket) writes out = y32 in x's dtype, zeroes y32,
//                   keeps the count in cnt[2] and resets cnt[0] and the ticket.
// ====================================================================================
#define MSPAN 32
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(unsigned short* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    *p = h;
}

template <typename W, typename X>
__global__ void __launch_bounds__(NTHREADS) ffn_gateup_mask(const W* __restrict__ wg, const W* __restrict__ wu,
                                                            const X* __restrict__ x, int ld, int F,
                                                            const unsigned char* __restrict__ mask, int gate_kind,
                                                            int up_kind, float thr, int gated, int* __restrict__ cnt,
                                                            int* __restrict__ idx, float* __restrict__ hv) {
    __shared__ int kf[MSPAN];
    __shared__ int nk;
    __shared__ float red[WARPS][2];
    const int V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, qt = wid & 3;
    if (threadIdx.x == 0) nk = 0;
    __syncthreads();
    const int f0 = blockIdx.x * MSPAN;
    for (int f = f0 + (int)threadIdx.x; f < min(F, f0 + MSPAN); f += blockDim.x)
        if (mask[f]) kf[atomicAdd(&nk, 1)] = f;
    __syncthreads();
    const int n = nk;
    const int nvec = ld / V, nq = (nvec + 3) / 4;
    const int v0 = min(nvec, qt * nq), len = min(nq, nvec - v0);   // this warp's quarter (vectors)
    for (int m0 = 0; m0 < n; m0 += WARPS / 4) {                     // uniform per block
        const int m = m0 + (wid >> 2);
        const bool live = m < n;
        const int f = live ? kf[m] : 0;
        float g = 0.f, u = 0.f, unused;
        if (live && len > 0) {
            const size_t off = (size_t)f * ld + (size_t)v0 * V;
            if (gated) warp_dots<W, 2, false, 4, false, X>(wg + off, wu + off, x + (size_t)v0 * V, len * V, lane, &g, &u, &unused);
            else warp_dots<W, 1, false, 4, false, X>(wg + off, wg, x + (size_t)v0 * V, len * V, lane, &g, &u, &unused);
        }
        if (lane == 0) { red[wid][0] = g; red[wid][1] = u; }
        __syncthreads();
        if (live && qt == 0 && lane == 0) {
            float G = 0.f, U = 0.f;
#pragma unroll
            for (int w = 0; w < 4; ++w) { G += red[wid + w][0]; U += red[wid + w][1]; }
            float v = act_fn<float>(G, gate_kind, thr);
            if (gated) v = v * act_fn<float>(U, up_kind, thr);
            const int slot = atomicAdd(cnt, 1);
            idx[slot] = f;
            hv[slot] = v;
        }
        __syncthreads();
    }
}

template <typename W, typename X>
__global__ void __launch_bounds__(NTHREADS) ffn_down_rows_out(int* __restrict__ cnt, const int* __restrict__ idx,
                                                              const float* __restrict__ hv, const W* __restrict__ wd,
                                                              int ld, float* __restrict__ y32, X* __restrict__ out,
                                                              int D) {
    __shared__ float red[WARPS][32 * VecOf<W>::N * NV];
    __shared__ int last;
    const int n = __ldca(cnt);
    const int G = gridDim.y;
    const int chunk = (n + G - 1) / G;
    const int lo = blockIdx.y * chunk, hi = min(n, lo + chunk);
    if (lo < hi) down_rows_tile<W>(lo, hi, blockIdx.x * 32 * VecOf<W>::N * NV, idx, hv, wd, y32, ld, red);
    __threadfence();                                         // our atomics before our ticket
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(reinterpret_cast<unsigned int*>(cnt + 1), 1u) == gridDim.x * gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        store_out(out + d, __ldcg(y32 + d));
        y32[d] = 0.f;
    }
    if (threadIdx.x == 0) { cnt[2] = n; cnt[0] = 0; cnt[1] = 0; }
}

// ====================================================================================
// ffn_given1: the same FFN given a mask in ONE launch (the next rung after the two above).
// G blocks (about one per multiprocessor), NT = 32 * NW threads each, 40 kmax bytes of
// dynamic shared memory (kmax = ceil(F / G) >= the neurons of a block: ids, h, 8 partials):
//  1. every block reads the whole mask (16-byte words, L2-resident after the first block)
//     and ranks the active neurons with a block-wide scan; block b takes the ranks
//     [b n / G, (b + 1) n / G): the same work in every block, whatever the mask's layout
//     (the two-launch path gave each block 32 mask entries: 0 to 10 neurons at 90%).
//  2. four warps per neuron (quarters of the gate and up rows, as ffn_gateup_list4), each
//     warp on to its next neuron without a block barrier; partial sums in shared memory,
//     then h. Each warp also prefetches its quarter of the neuron's w_down row into L2
//     when all the block's down rows fit (at a dense mask they would not, and the lines
//     would be evicted before use).
//  3. the block's down rows, a thread per PV 16-byte column vectors, eight rows' loads in
//     flight, accumulated in registers; then one float4 atomicAdd per 4 columns into slice
//     b % nslice of y32 (nslice, D): with one slice every address took G = 132 serialized
//     additions (3.4 us between the atomics and the fence, traced on the H200); slices
//     divide that wait.
//  4. a ticket: the last block writes out = the sum of the slices in x's dtype, zeroes them,
//     cnt[2] = n.
// No grid-wide wait, no second launch, and the active list never goes to global memory.
// ====================================================================================
__device__ __forceinline__ int nz_bytes(unsigned int w) { return __popc(__vcmpne4(w, 0u)) >> 3; }

__device__ __forceinline__ void add_f4(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(a, b, c, d));   // sm_90: one vector reduction
#else
    atomicAdd(p, a); atomicAdd(p + 1, b); atomicAdd(p + 2, c); atomicAdd(p + 3, d);
#endif
}

// Every block ranks the active neurons of the whole mask (thread t counts the 16-byte words
// [t CH, (t + 1) CH), the last thread also the F % 16 tail bytes; a block-wide scan) and
// writes those of ranks [b n / G, (b + 1) n / G) to kf. Returns n; *r0p = the first rank.
template <int NW>
__device__ __forceinline__ int rank_mask_share(const unsigned char* __restrict__ mask, int F, int* kf, int* r0p) {
    __shared__ int wsum[NW];
    const int NT = 32 * NW;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, t = threadIdx.x;
    const int G = gridDim.x, b = blockIdx.x;
    const int nw16 = F >> 4, CH = (nw16 + NT - 1) / NT;
    const int w0 = min(nw16, t * CH), w1 = min(nw16, w0 + CH);
    const uint4* mw = reinterpret_cast<const uint4*>(mask);
    int c = 0;
#pragma unroll 4
    for (int w = w0; w < w1; ++w) {
        const uint4 m = __ldg(mw + w);
        c += nz_bytes(m.x) + nz_bytes(m.y) + nz_bytes(m.z) + nz_bytes(m.w);
    }
    const bool tail = t == NT - 1;                           // the last thread also counts F % 16 bytes
    if (tail) for (int f = nw16 << 4; f < F; ++f) c += mask[f] != 0;
    int incl = c;                                            // block-wide inclusive scan of c
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
    }
    if (lane == 31) wsum[wid] = incl;
    __syncthreads();
    if (wid == 0) {
        int s = lane < NW ? wsum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += v;
        }
        if (lane < NW) wsum[lane] = s;                       // inclusive over warps
    }
    __syncthreads();
    const int n = wsum[NW - 1];
    const int before = incl - c + (wid > 0 ? wsum[wid - 1] : 0);    // active neurons before mine
    const int r0 = (int)((long long)b * n / G), r1 = (int)((long long)(b + 1) * n / G);
    if (c > 0 && before < r1 && before + c > r0) {           // my neurons with ranks in [r0, r1)
        int r = before;
        for (int w = w0; w < w1 && r < r1; ++w) {
            const uint4 m = __ldg(mw + w);
            const unsigned int q[4] = {m.x, m.y, m.z, m.w};
#pragma unroll
            for (int k = 0; k < 16; ++k) {
                if ((q[k >> 2] >> (8 * (k & 3))) & 0xffu) {
                    if (r >= r0 && r < r1) kf[r - r0] = (w << 4) + k;
                    ++r;
                }
            }
        }
        if (tail)
            for (int f = nw16 << 4; f < F; ++f)
                if (mask[f]) { if (r >= r0 && r < r1) kf[r - r0] = f; ++r; }
    }
    __syncthreads();
    *r0p = r0;
    return n;
}

#ifdef GIVEN1_TRACE                                          // bench/probe only: %globaltimer per phase and block
__device__ long long given1_trace[4096 * 8];                // clock64() of thread 0 (cycles of its SM)
__device__ unsigned long long given1_gtrace[4096 * 8];     // %globaltimer (ns, coarse)
#define TRACE(k) do { if (threadIdx.x == 0) { unsigned long long t_; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_)); given1_gtrace[blockIdx.x * 8 + (k)] = t_; given1_trace[blockIdx.x * 8 + (k)] = clock64(); } } while (0)
#else
#define TRACE(k) do { } while (0)
#endif

// The body of ffn_given1 (CL = 1) and of ffn_given1_cl (CL blocks per cluster: step 3's partial
// y goes to shared memory, block r of a cluster sums column slice r over the CL blocks through
// distributed shared memory and adds only that: each address takes G / CL atomic additions).
template <typename W, typename X, int NW, int PV, int CL>
__device__ __forceinline__ void given1_body(const W* __restrict__ wg, const W* __restrict__ wu,
                                            const W* __restrict__ wd, const X* __restrict__ x,
                                            int ld, int F, const unsigned char* __restrict__ mask,
                                            int gate_kind, int up_kind, float thr, int gated,
                                            float* __restrict__ y32, int nslice, X* __restrict__ out,
                                            int* __restrict__ cnt) {
    extern __shared__ int kf[];                              // [kmax] the block's neurons, then floats (below)
    __shared__ int last;
    const int NT = 32 * NW, V = VecOf<W>::N;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, t = threadIdx.x;
    const int G = gridDim.x, b = blockIdx.x;
    TRACE(0);
    // 1. rank the active neurons, take this block's share
    int r0;
    const int n = rank_mask_share<NW>(mask, F, kf, &r0);
    const int r1 = (int)((long long)(b + 1) * n / G);
    const int ks = r1 - r0;
    TRACE(1);
    const int kmax = (F + G - 1) / G;
    float* hs = reinterpret_cast<float*>(kf + kmax);         // [kmax] h
    float* part = hs + kmax;                                 // [2][4][kmax] the warps' partial gate / up dots
    // 2. h of the block's neurons, four warps per neuron (quarters of both rows); a warp goes
    //    on to its next neuron without waiting for the others (no block barrier per round)
    const int qt = wid & 3, NB = NW / 4;
    const int nvec = ld / V, nq = (nvec + 3) / 4;
    const int v0 = min(nvec, qt * nq), len = min(nq, nvec - v0);   // this warp's quarter (vectors)
    const bool pf = (long long)ks * ld * (long long)sizeof(W) * G <= (24ll << 20);   // all down rows fit in L2
    for (int m = wid >> 2; m < ks; m += NB) {
        float g = 0.f, u = 0.f, unused;
        if (len > 0) {
            const size_t off = (size_t)kf[m] * ld + (size_t)v0 * V;
            const char* drow = reinterpret_cast<const char*>(wd + off);
            if (pf && lane * 128 < len * 16)                 // this quarter of the down row, into L2
                asm volatile("prefetch.global.L2 [%0];" :: "l"(drow + lane * 128));
            if (gated) warp_dots<W, 2, false, 4, false, X>(wg + off, wu + off, x + (size_t)v0 * V, len * V, lane, &g, &u, &unused);
            else warp_dots<W, 1, false, 4, false, X>(wg + off, wg, x + (size_t)v0 * V, len * V, lane, &g, &u, &unused);
        }
        if (lane == 0) { part[qt * kmax + m] = g; part[(4 + qt) * kmax + m] = u; }
    }
    __syncthreads();
    for (int m = t; m < ks; m += NT) {
        float Gs = 0.f, Us = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q) { Gs += part[q * kmax + m]; Us += part[(4 + q) * kmax + m]; }
        float v = act_fn<float>(Gs, gate_kind, thr);
        if (gated) v = v * act_fn<float>(Us, up_kind, thr);
        hs[m] = v;
    }
    __syncthreads();
    TRACE(2);
    // 3. y32 += sum_m h[m] wd[kf[m], :]: thread t owns the column vectors t + k NT, k < PV
    float acc[PV][V];
#pragma unroll
    for (int k = 0; k < PV; ++k)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[k][e] = 0.f;
    if (ks > 0) {
#pragma unroll 8
        for (int m = 0; m < ks; ++m) {
            const W* row = wd + (size_t)kf[m] * ld;
            const float hm = hs[m];
            uint4 raw[PV];
#pragma unroll
            for (int k = 0; k < PV; ++k) {
                const int p = t + k * NT;
                raw[k] = p < nvec ? ld16raw(row + (size_t)p * V) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int k = 0; k < PV; ++k) {
                float w[V];
                cvt16(raw[k], w, W());
#pragma unroll
                for (int e = 0; e < V; ++e) acc[k][e] = fmaf(hm, w[e], acc[k][e]);
            }
        }
    }
    TRACE(6);
    if (CL == 1) {
        float* ys = y32 + (size_t)(b % nslice) * ld;          // this block's slice of the accumulator
        if (ks > 0)
#pragma unroll
            for (int k = 0; k < PV; ++k) {
                const int p = t + k * NT;
                if (p < nvec)
#pragma unroll
                    for (int e = 0; e < V; e += 4) add_f4(ys + (size_t)p * V + e, acc[k][e], acc[k][e + 1], acc[k][e + 2], acc[k][e + 3]);
            }
    } else {                                                 // through the cluster's shared memory
        float* red = reinterpret_cast<float*>(kf) + ((10 * kmax + 3) & ~3);   // [ld] this block's partial y (16-byte aligned)
#pragma unroll
        for (int k = 0; k < PV; ++k) {
            const int p = t + k * NT;
            if (p < nvec)
#pragma unroll
                for (int e = 0; e < V; e += 4)
                    *reinterpret_cast<float4*>(red + (size_t)p * V + e) = make_float4(acc[k][e], acc[k][e + 1], acc[k][e + 2], acc[k][e + 3]);
        }
        cluster_arrive();                                    // every block of the cluster has written red
        cluster_wait();
        const unsigned int r = cluster_rank();
        const int n4 = ld >> 2, lo = (int)(r * n4 / CL), hi = (int)((r + 1) * n4 / CL);
        float* ys = y32 + (size_t)((b / CL) % nslice) * ld;
        const unsigned int base = (unsigned int)__cvta_generic_to_shared(red);
        for (int c = lo + t; c < hi; c += NT) {              // column slice r, summed over the cluster
            float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int q = 0; q < CL; ++q) {
                const float4 v = ld_cluster_f4(base + 16u * (unsigned int)c, (unsigned int)q);
                a.x += v.x; a.y += v.y; a.z += v.z; a.w += v.w;
            }
            if (a.x != 0.f || a.y != 0.f || a.z != 0.f || a.w != 0.f || a.x != a.x || a.y != a.y || a.z != a.z || a.w != a.w)
                add_f4(ys + 4 * c, a.x, a.y, a.z, a.w);
        }
        cluster_arrive();                                    // done reading the others' red (waited below)
    }
    TRACE(3);
    // 4. the last block writes out and leaves y32 zero
    __threadfence();
    __syncthreads();
    TRACE(4);
    if (t == 0) last = atomicAdd(reinterpret_cast<unsigned int*>(cnt + 1), 1u) == (unsigned int)G - 1;
    __syncthreads();
    if (!last) {
        if (CL > 1) cluster_wait();                          // no block leaves while a peer reads its red
        return;
    }
    __threadfence();
    for (int c = 4 * t; c < ld; c += 4 * NT) {                // out = the sum of the slices; slices = 0
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int q = 0; q < nslice; ++q) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(y32 + (size_t)q * ld + c));
            a.x += v.x; a.y += v.y; a.z += v.z; a.w += v.w;
        }
        store_out(out + c, a.x); store_out(out + c + 1, a.y); store_out(out + c + 2, a.z); store_out(out + c + 3, a.w);
        for (int q = 0; q < nslice; ++q) *reinterpret_cast<float4*>(y32 + (size_t)q * ld + c) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (t == 0) { cnt[2] = n; cnt[0] = 0; cnt[1] = 0; }
    if (CL > 1) cluster_wait();
    __syncthreads();
    TRACE(5);
}

template <typename W, typename X, int NW, int PV>
__global__ void __launch_bounds__(32 * NW) ffn_given1(const W* __restrict__ wg, const W* __restrict__ wu,
                                                      const W* __restrict__ wd, const X* __restrict__ x,
                                                      int ld, int F, const unsigned char* __restrict__ mask,
                                                      int gate_kind, int up_kind, float thr, int gated,
                                                      float* __restrict__ y32, int nslice, X* __restrict__ out,
                                                      int* __restrict__ cnt) {
    given1_body<W, X, NW, PV, 1>(wg, wu, wd, x, ld, F, mask, gate_kind, up_kind, thr, gated, y32, nslice, out, cnt);
}

// the same in clusters of CL blocks (G a multiple of CL; dynamic shared memory + 4 ld bytes)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
template <typename W, typename X, int NW, int PV, int CL>
__global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(32 * NW)
ffn_given1_cl(const W* __restrict__ wg, const W* __restrict__ wu, const W* __restrict__ wd, const X* __restrict__ x,
              int ld, int F, const unsigned char* __restrict__ mask, int gate_kind, int up_kind, float thr,
              int gated, float* __restrict__ y32, int nslice, X* __restrict__ out, int* __restrict__ cnt) {
    given1_body<W, X, NW, PV, CL>(wg, wu, wd, x, ld, F, mask, gate_kind, up_kind, thr, gated, y32, nslice, out, cnt);
}
#endif

