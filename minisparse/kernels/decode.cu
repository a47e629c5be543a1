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
//           a warp per key, scores in shared memory)
//   others  embed, qkv_rope (q/k/v GEMV + bias + rotary + KV write, rows in rotary pairs),
//           ffn_gateup (dense gate + up + activation, warp per neuron), argmax_advance.
//
// act_fn<A>(v, kind, thr) and m_exp/m_erf/m_tanh are prepended from
// minisparse.kernels.base.cuda_activation_source() (the one definition of the activations).

#define WARPS 8                  // warps per block of the warp-per-row kernels
#define NEG_INF __int_as_float(0xff800000)   // NVRTC has no math.h: no INFINITY
#define NTHREADS (32 * WARPS)

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

// 16 bytes of weights (aligned) -> VecOf<W>::N floats
__device__ __forceinline__ void ld16(const float* p, float* o) {
    float4 v = __ldg(reinterpret_cast<const float4*>(p));
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
}
__device__ __forceinline__ void ld16(const unsigned short* p, float* o) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        o[2 * k] = h2f((unsigned short)(w[k] & 0xffffu));
        o[2 * k + 1] = h2f((unsigned short)(w[k] >> 16));
    }
}
// N consecutive floats of an activation vector (16-byte aligned), N = 4 or 8
template <int N>
__device__ __forceinline__ void ldx(const float* p, float* o) {
#pragma unroll
    for (int c = 0; c < N / 4; ++c) {
        float4 v = *reinterpret_cast<const float4*>(p + 4 * c);
        o[4 * c] = v.x; o[4 * c + 1] = v.y; o[4 * c + 2] = v.z; o[4 * c + 3] = v.w;
    }
}

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// dot of one weight row (ld elements, ld % VecOf<W>::N == 0, 16-byte aligned) with x,
// by one warp: each lane keeps 4 independent 16-byte loads in flight, then a shuffle sum
template <typename W>
__device__ __forceinline__ float warp_dot_vec16(const W* __restrict__ row, const float* __restrict__ x,
                                                int ld, int lane) {
    const int V = VecOf<W>::N;
    const int n = ld / V;
    float s0 = 0.f, s1 = 0.f;
    int v = lane;
    for (; v + 96 < n; v += 128) {
        float w[4][V], xv[4][V];
#pragma unroll
        for (int j = 0; j < 4; ++j) ld16(row + (size_t)(v + 32 * j) * V, w[j]);
#pragma unroll
        for (int j = 0; j < 4; ++j) ldx<V>(x + (size_t)(v + 32 * j) * V, xv[j]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int k = 0; k < V; ++k) {
                if (j & 1) s1 = fmaf(w[j][k], xv[j][k], s1);
                else s0 = fmaf(w[j][k], xv[j][k], s0);
            }
    }
    for (; v < n; v += 32) {
        float w[V], xv[V];
        ld16(row + (size_t)v * V, w);
        ldx<V>(x + (size_t)v * V, xv);
#pragma unroll
        for (int k = 0; k < V; ++k) s0 = fmaf(w[k], xv[k], s0);
    }
    return warp_sum(s0 + s1);
}

// two rows at once (their loads interleaved): a = row0 . x, b = row1 . x
template <typename W>
__device__ __forceinline__ void warp_dot2_vec16(const W* __restrict__ row0, const W* __restrict__ row1,
                                                const float* __restrict__ x, int ld, int lane,
                                                float* a, float* b) {
    const int V = VecOf<W>::N;
    const int n = ld / V;
    float s0 = 0.f, s1 = 0.f;
    int v = lane;
    for (; v + 32 < n; v += 64) {
        float w0[2][V], w1[2][V], xv[2][V];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            ld16(row0 + (size_t)(v + 32 * j) * V, w0[j]);
            ld16(row1 + (size_t)(v + 32 * j) * V, w1[j]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) ldx<V>(x + (size_t)(v + 32 * j) * V, xv[j]);
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int k = 0; k < V; ++k) {
                s0 = fmaf(w0[j][k], xv[j][k], s0);
                s1 = fmaf(w1[j][k], xv[j][k], s1);
            }
    }
    for (; v < n; v += 32) {
        float w0[V], w1[V], xv[V];
        ld16(row0 + (size_t)v * V, w0);
        ld16(row1 + (size_t)v * V, w1);
        ldx<V>(x + (size_t)v * V, xv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            s0 = fmaf(w0[k], xv[k], s0);
            s1 = fmaf(w1[k], xv[k], s1);
        }
    }
    *a = warp_sum(s0);
    *b = warp_sum(s1);
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

// 3. one warp per row, 16-byte loads, 4 loads in flight per lane (warp_dot_vec16); rows
//    padded to ld % VecOf<W>::N == 0 with zeros, x zero-padded to ld.
//    EPI 0: y[r] = dot      EPI 1: y[r] += dot (the residual add of o-proj / down-proj)
template <typename W, int EPI>
__global__ void __launch_bounds__(NTHREADS) gemv_warp_vec16(const W* __restrict__ w, const float* __restrict__ x,
                                                            float* __restrict__ y, int N, int ld) {
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (r >= N) return;
    const float s = warp_dot_vec16<W>(w + (size_t)r * ld, x, ld, lane);
    if (lane == 0) {
        if (EPI == 1) y[r] += s;
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
    float ss = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = x[d];
        if (add != nullptr) { v += add[d]; x[d] = v; }
        ss = fmaf(v, v, ss);
    }
    const float rstd = 1.0f / sqrtf(block_sum(ss, sh) / (float)D + eps);
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = (x[d] * rstd) * scale[d];
}

// ====================================================================================
// q, k, v projections + bias + rotary (rotate-half) + KV-cache write, one launch.
// w: ((H + 2K) * Dh, ld) rows = [q heads | k heads | v heads]. One warp per rotary pair
// (rows i and i + Dh/2 of one head): both dots, then
//     out_i = a cos - b sin,   out_{i+half} = b cos + a sin       (q and k; v unrotated)
// q -> q[h * Dh + i]; k, v -> kc / vc[(kh * max_len + pos) * Dh + i]. bias may be null.
// cos_t, sin_t: (max_len, Dh/2) float tables.
// ====================================================================================
template <typename W>
__global__ void __launch_bounds__(NTHREADS) qkv_rope(const W* __restrict__ w, const float* __restrict__ bias,
                                                     const float* __restrict__ x, int ld, int H, int K, int Dh,
                                                     const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                     const int* __restrict__ pos_p, float* __restrict__ q,
                                                     float* __restrict__ kc, float* __restrict__ vc, int max_len) {
    const int lane = threadIdx.x & 31;
    const int half = Dh / 2;
    const int item = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (item >= (H + 2 * K) * half) return;
    const int head = item / half, i = item - head * half;
    const int r0 = head * Dh + i, r1 = r0 + half;
    float a, b;
    warp_dot2_vec16<W>(w + (size_t)r0 * ld, w + (size_t)r1 * ld, x, ld, lane, &a, &b);
    if (lane != 0) return;
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
// cached keys. Dynamic shared memory: max_len scores + blockDim.x partial sums.
//   p = softmax(q . k_s / sqrt(Dh)),  o[h] = sum_s p_s v_s
// ====================================================================================
__global__ void attn_decode(const float* __restrict__ q, const float* __restrict__ kc,
                            const float* __restrict__ vc, float* __restrict__ o, const int* __restrict__ pos_p,
                            int H, int K, int Dh, int max_len, float scale) {
    extern __shared__ float sc[];                           // (max_len + blockDim.x,): scores, then
    float* part = sc + max_len;                             // partial sums of the output
    __shared__ float sh[32];
    const int h = blockIdx.x;
    const int kh = h / (H / K);
    const int S = *pos_p + 1;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* qh = q + (size_t)h * Dh;
    const float* kb = kc + (size_t)kh * max_len * Dh;
    const float* vb = vc + (size_t)kh * max_len * Dh;
    for (int s = wid; s < S; s += nw) {                     // a warp per key
        float d = 0.f;
        for (int j = lane; j < Dh; j += 32) d = fmaf(qh[j], kb[(size_t)s * Dh + j], d);
        d = warp_sum(d);
        if (lane == 0) sc[s] = d * scale;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int s = threadIdx.x; s < S; s += blockDim.x) m = fmaxf(m, sc[s]);
    m = block_max(m, sh);                                    // subtract the max: exp never overflows
    float l = 0.f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const float e = expf(sc[s] - m);
        sc[s] = e;
        l += e;
    }
    l = block_sum(l, sh);                                    // (syncs: every sc[s] is written)
    const float inv = 1.0f / l;
    if (Dh <= (int)blockDim.x) {                            // G groups of Dh threads split the keys
        const int G = blockDim.x / Dh;
        const int j = threadIdx.x % Dh, g = threadIdx.x / Dh;
        float acc = 0.f;
        if (g < G)
#pragma unroll 4
            for (int s = g; s < S; s += G) acc = fmaf(sc[s], vb[(size_t)s * Dh + j], acc);
        part[threadIdx.x] = acc;
        __syncthreads();
        if ((int)threadIdx.x < Dh) {
            float t = 0.f;
            for (int gg = 0; gg < G; ++gg) t += part[gg * Dh + threadIdx.x];
            o[(size_t)h * Dh + threadIdx.x] = t * inv;
        }
    } else {
        for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
            float acc = 0.f;
            for (int s = 0; s < S; ++s) acc = fmaf(sc[s], vb[(size_t)s * Dh + j], acc);
            o[(size_t)h * Dh + j] = acc * inv;
        }
    }
}

// ====================================================================================
// dense FFN, first half: one warp per neuron f
//   h[f] = a(wg[f] . x) * b(wu[f] . x)    (gated)      h[f] = a(wg[f] . x)   (plain)
// count (optional, null = off): count[pos * n_layers + layer] += #{f : h[f] != 0}
// ====================================================================================
template <typename W>
__global__ void __launch_bounds__(NTHREADS) ffn_gateup(const W* __restrict__ wg, const W* __restrict__ wu,
                                                       const float* __restrict__ x, float* __restrict__ h,
                                                       int F, int ld, int gate_kind, int up_kind, float thr,
                                                       int gated, int* __restrict__ count,
                                                       const int* __restrict__ pos_p, int layer, int n_layers) {
    __shared__ int nz;
    if (threadIdx.x == 0) nz = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int f = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (f < F) {
        float g, u = 0.f;
        if (gated) warp_dot2_vec16<W>(wg + (size_t)f * ld, wu + (size_t)f * ld, x, ld, lane, &g, &u);
        else g = warp_dot_vec16<W>(wg + (size_t)f * ld, x, ld, lane);
        if (lane == 0) {
            float v = act_fn<float>(g, gate_kind, thr);
            if (gated) v = v * act_fn<float>(u, up_kind, thr);
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
// greedy argmax of the logits (ties: the lowest id, as np.argmax), then advance:
//   tokens[pos + 1] = argmax   (only past the prompt: pos + 1 >= n_prompt)
//   pos += 1
// One block. zero (optional) is an int the step must leave at 0 (a counter of the
// neuron-skipping FFN, see decode_cuda.py).
// ====================================================================================
__global__ void argmax_advance(const float* __restrict__ logits, int V, int* __restrict__ tokens,
                               int* __restrict__ pos_p, const int* __restrict__ n_prompt, int max_len,
                               int* __restrict__ zero) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = logits[i];
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
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; ++w)
            if (sv[w] > best || (sv[w] == best && si[w] < bi)) { best = sv[w]; bi = si[w]; }
        if (bi == 0x7fffffff) bi = 0;                      // every logit NaN
        const int p = *pos_p;
        if (p + 1 < max_len && p + 1 >= *n_prompt) tokens[p + 1] = bi;
        *pos_p = p + 1;
        if (zero != nullptr) *zero = 0;
    }
}
