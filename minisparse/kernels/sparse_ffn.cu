// Neuron-skipping FFN on the GPU (compiled at run time by cupy.RawModule / NVRTC).
//
//   y_t = sum_{f active} m_tf * a(g_tf) * b(u_tf) * w_down[f]      weights neuron-major (F, D)
//
// Three launches per FFN, no host round trip (the active list and its count stay on the
// device):
//   1. ffn_gate  one warp per neuron: g = x . w_gate[f] for the T tokens, a = act(g), keep
//                the neuron if any token has |a| > threshold; an atomic counter hands out a
//                slot in the compact active list (idx[slot] = f, vals[slot, t] = masked a).
//                With a predicted mask, only masked-in neurons are read, and the up
//                projection is fused here (vals = h), so the FFN takes two launches.
//                This kernel also zeroes y and the *other* counter of the pair (the one the
//                next call uses), so no memset launch is needed.
//   2. ffn_up    one warp per active slot (count read from device memory): u = x . w_up[f],
//                vals = a * b(u).
//   3. ffn_down  blocks tile (columns of y) x (a range of active slots). Each warp owns
//                32*VEC*NV columns and accumulates h * w_down[f] for its slots in
//                registers (16-byte loads); the 8 warps of a block are reduced in shared
//                memory; then ONE atomicAdd per output element per block.
//
// Types: W = weight element (unsigned short holds an IEEE half; float; double), X = x
// element (unsigned short / float / double), accumulation A = float (double for double).
// TT = token tile held in registers (T <= TT; the host splits larger T).
//
// Activation codes (minisparse.kernels.base.GATE_KINDS): 0 relu/FATReLU(thr), 1 relu^2,
// 2 silu, 3 gelu (erf), 4 gelu (tanh), 5 identity.

#define WARPS_PER_BLOCK 8
#define NV 2                    // 16-byte vectors per lane per row in ffn_down

// ------------------------------------------------------------------------------------
// element conversion and 16-byte vector loads
// ------------------------------------------------------------------------------------
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

template <typename W> struct Acc { typedef float T; };
template <> struct Acc<double> { typedef double T; };

template <typename A> __device__ __forceinline__ A to_acc(unsigned short v) { return (A)h2f(v); }
template <typename A> __device__ __forceinline__ A to_acc(float v) { return (A)v; }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return (A)v; }

template <typename W> struct Vec { enum { N = 16 / sizeof(W) }; };

// load Vec<W>::N consecutive weights (16 bytes, aligned) as accumulation type
template <typename A>
__device__ __forceinline__ void load16(const float* p, A* out) {
    float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
template <typename A>
__device__ __forceinline__ void load16(const double* p, A* out) {
    double2 v = __ldg(reinterpret_cast<const double2*>(p));
    out[0] = v.x; out[1] = v.y;
}
template <typename A>
__device__ __forceinline__ void load16(const unsigned short* p, A* out) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        out[2 * k] = h2f((unsigned short)(w[k] & 0xffffu));
        out[2 * k + 1] = h2f((unsigned short)(w[k] >> 16));
    }
}

// ------------------------------------------------------------------------------------
// activations: act_fn<A>(v, kind, thr) and m_exp/m_erf/m_tanh/m_abs are NOT written here:
// cupy_.py prepends minisparse.kernels.base.cuda_activation_source() (the one definition).
// To compile-check this file alone:
//   python -c "from minisparse.kernels import cupy_; print(cupy_.cuda_source())" > /tmp/k.cu
//   nvcc -arch=sm_90 -std=c++17 -c /tmp/k.cu -o /tmp/k.o
// ------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------
// warp dot products of weight rows with the T (<= TT) token rows of x
// ------------------------------------------------------------------------------------
// V consecutive x elements (16-byte aligned) as accumulation type: V*sizeof(X)/16 loads.
// Vector loads of x matter: scalar loads of a half x cost 8 L1 wavefronts per 16-byte
// weight load, which caps the gate GEMV near the L1's rate rather than DRAM's.
template <typename X, typename A, int V>
__device__ __forceinline__ void loadx(const X* p, A* out) {
    const int PER = 16 / (int)sizeof(X);
#pragma unroll
    for (int c = 0; c < V / PER; ++c) load16<A>(p + c * PER, out + c * PER);
}

// NR = 1: s = row0 . x_t;  NR = 2: also u = row1 . x_t, the two rows' loads interleaved
// (twice the bytes in flight per warp: what a sparse, latency-bound pass needs).
template <typename W, typename X, typename A, int TT, int NR>
__device__ __forceinline__ void warp_dots(const X* __restrict__ x, const W* __restrict__ row0,
                                          const W* __restrict__ row1, int T, int D, bool vec_ok, int lane,
                                          A* s, A* u) {
    const int V = Vec<W>::N;
#pragma unroll
    for (int t = 0; t < TT; ++t) { s[t] = A(0); if (NR == 2) u[t] = A(0); }
    int nvec = vec_ok ? D / V : 0;
#pragma unroll (TT == 1 ? 8 : 2)
    for (int v = lane; v < nvec; v += 32) {
        A w0[V], w1[V];
        load16<A>(row0 + (size_t)v * V, w0);
        if (NR == 2) load16<A>(row1 + (size_t)v * V, w1);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            if (t < T) {
                A xv[V];
                loadx<X, A, V>(x + (size_t)t * D + (size_t)v * V, xv);
#pragma unroll
                for (int k = 0; k < V; ++k) {
                    s[t] += w0[k] * xv[k];
                    if (NR == 2) u[t] += w1[k] * xv[k];
                }
            }
        }
    }
    for (int i = nvec * V + lane; i < D; i += 32) {          // tail, or everything when unaligned
        A w0 = to_acc<A>(row0[i]);
        A w1 = (NR == 2) ? to_acc<A>(row1[i]) : A(0);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            if (t < T) {
                A xv = to_acc<A>(x[(size_t)t * D + i]);
                s[t] += w0 * xv;
                if (NR == 2) u[t] += w1 * xv;
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            s[t] += __shfl_xor_sync(0xffffffffu, s[t], o);
            if (NR == 2) u[t] += __shfl_xor_sync(0xffffffffu, u[t], o);
        }
    }
}

// flags
#define F_GATED 1       // gated activation (h = a(g) * b(u)); else h = a(g)
#define F_PREDICTED 2   // mask given: read only masked-in neurons, fuse the up projection
#define F_VEC 4         // weight rows and x rows 16-byte aligned: vector loads

// ------------------------------------------------------------------------------------
// 1. gate (+ select, + up when predicted)
// ------------------------------------------------------------------------------------
template <typename W, typename X, int TT>
__global__ void __launch_bounds__(32 * WARPS_PER_BLOCK, TT == 1 ? 3 : 1) ffn_gate(const X* __restrict__ x, const W* __restrict__ wg, const W* __restrict__ wu,
                         const unsigned char* __restrict__ mask, int T, int D, int F, int gate_kind,
                         int up_kind, typename Acc<W>::T act_thr, typename Acc<W>::T skip_thr, int flags,
                         int* __restrict__ cnt, int* __restrict__ cnt_next, int* __restrict__ idx,
                         typename Acc<W>::T* __restrict__ vals, typename Acc<W>::T* __restrict__ y, int nY) {
    typedef typename Acc<W>::T A;
    const int lane = threadIdx.x & 31;
    const int gtid = blockIdx.x * blockDim.x + threadIdx.x;
    const int nthreads = gridDim.x * blockDim.x;
    for (int i = gtid; i < nY; i += nthreads) y[i] = A(0);   // y is accumulated by ffn_down
    if (gtid == 0) *cnt_next = 0;                            // the counter of the next call
    const bool vec_ok = flags & F_VEC, predicted = flags & F_PREDICTED, gated = flags & F_GATED;
    const int warp = gtid >> 5, nwarps = nthreads >> 5;
    for (int f = warp; f < F; f += nwarps) {
        if (predicted && !mask[f]) continue;
        A s[TT], u[TT];
        const bool fuse_up = predicted && gated;             // read w_gate[f] and w_up[f] together
        if (fuse_up)
            warp_dots<W, X, A, TT, 2>(x, wg + (size_t)f * D, wu + (size_t)f * D, T, D, vec_ok, lane, s, u);
        else
            warp_dots<W, X, A, TT, 1>(x, wg + (size_t)f * D, wg, T, D, vec_ok, lane, s, u);
        bool any = false;
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            if (t < T) {
                s[t] = act_fn<A>(s[t], gate_kind, act_thr);
                bool keep = !(m_abs(s[t]) <= skip_thr);          // NaN counts as kept
                if (!keep) s[t] = A(0);
                any |= keep;
            }
        }
        if (!any) continue;                                  // uniform across the warp
        if (fuse_up) {                                       // h = a * b(u)
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (t < T && s[t] != A(0)) s[t] = s[t] * act_fn<A>(u[t], up_kind, act_thr);
        }
        int slot = 0;
        if (lane == 0) slot = atomicAdd(cnt, 1);
        slot = __shfl_sync(0xffffffffu, slot, 0);
        if (lane == 0) idx[slot] = f;
#pragma unroll
        for (int t = 0; t < TT; ++t)
            if (t < T && lane == t) vals[(size_t)slot * T + t] = s[t];
    }
}

// ------------------------------------------------------------------------------------
// 2. up projection of the active slots: vals = a * b(x . w_up[f])
// ------------------------------------------------------------------------------------
template <typename W, typename X, int TT>
__global__ void __launch_bounds__(32 * WARPS_PER_BLOCK, TT == 1 ? 3 : 1) ffn_up(const X* __restrict__ x, const W* __restrict__ wu, const int* __restrict__ cnt,
                       const int* __restrict__ idx, typename Acc<W>::T* __restrict__ vals, int T, int D,
                       int up_kind, typename Acc<W>::T act_thr, int flags) {
    typedef typename Acc<W>::T A;
    const int lane = threadIdx.x & 31;
    const int gtid = blockIdx.x * blockDim.x + threadIdx.x;
    const int warp = gtid >> 5, nwarps = (gridDim.x * blockDim.x) >> 5;
    const int n = *cnt;
    const bool vec_ok = flags & F_VEC;
    for (int j = warp; j < n; j += nwarps) {
        const int f = idx[j];
        A u[TT];
        warp_dots<W, X, A, TT, 1>(x, wu + (size_t)f * D, wu, T, D, vec_ok, lane, u, u);
        if (lane < T) {
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                if (t == lane) {
                    A a = vals[(size_t)j * T + t];
                    vals[(size_t)j * T + t] = (a != A(0)) ? a * act_fn<A>(u[t], up_kind, act_thr) : A(0);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------
// 3. down projection: y[t] += sum_j vals[j, t] * w_down[idx[j]]
//    grid (ceil(D / CW), G), block 32 * WARPS_PER_BLOCK, CW = 32 * VEC * NV columns
// ------------------------------------------------------------------------------------
template <typename W, int TT>
__global__ void ffn_down(const int* __restrict__ cnt, const int* __restrict__ idx,
                         const typename Acc<W>::T* __restrict__ vals, const W* __restrict__ wd,
                         typename Acc<W>::T* __restrict__ y, int T, int D, int flags) {
    typedef typename Acc<W>::T A;
    const int V = Vec<W>::N;
    const int CW = 32 * V * NV;
    __shared__ A red[WARPS_PER_BLOCK][CW];
    const int n = *cnt;
    const int G = gridDim.y;
    const int chunk = (n + G - 1) / G;
    const int lo = blockIdx.y * chunk;
    const int hi = min(n, lo + chunk);
    if (lo >= hi) return;                                    // whole block: no work
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int col0 = blockIdx.x * CW;
    const bool vec_ok = flags & F_VEC;
    A acc[TT][NV * V];
#pragma unroll
    for (int t = 0; t < TT; ++t)
#pragma unroll
        for (int k = 0; k < NV * V; ++k) acc[t][k] = A(0);
#pragma unroll 2
    for (int j = lo + wid; j < hi; j += WARPS_PER_BLOCK) {
        const W* row = wd + (size_t)idx[j] * D;
        A h[TT];
#pragma unroll
        for (int t = 0; t < TT; ++t) h[t] = (t < T) ? vals[(size_t)j * T + t] : A(0);
#pragma unroll
        for (int q = 0; q < NV; ++q) {
            const int c = col0 + q * 32 * V + lane * V;
            A w[V];
            if (vec_ok && c + V <= D) {
                load16<A>(row + c, w);
            } else {
#pragma unroll
                for (int k = 0; k < V; ++k) w[k] = (c + k < D) ? to_acc<A>(row[c + k]) : A(0);
            }
#pragma unroll
            for (int t = 0; t < TT; ++t)
#pragma unroll
                for (int k = 0; k < V; ++k) acc[t][q * V + k] += h[t] * w[k];
        }
    }
    // reduce the warps of the block, token by token, then one atomic per element
#pragma unroll
    for (int t = 0; t < TT; ++t) {
        if (t < T) {                                         // uniform across the block
#pragma unroll
            for (int q = 0; q < NV; ++q)
#pragma unroll
                for (int k = 0; k < V; ++k) red[wid][q * 32 * V + lane * V + k] = acc[t][q * V + k];
            __syncthreads();
            for (int i = threadIdx.x; i < CW; i += blockDim.x) {
                A s = A(0);
#pragma unroll
                for (int w = 0; w < WARPS_PER_BLOCK; ++w) s += red[w][i];
                if (col0 + i < D) atomicAdd(y + (size_t)t * D + col0 + i, s);
            }
            __syncthreads();
        }
    }
}

// ====================================================================================
// 4. ONE launch for the whole FFN: ffn_fused (the default sparse path since 2026-12-01)
// ====================================================================================
// Block b owns the neurons [b*P, min(F, (b+1)*P)) (P = per_block). Its 8 warps
//   (1) compute, one warp per neuron, the gate (and, for kept neurons, the up) dot
//       products: without a mask every gate row of the range is read and the up row only
//       of kept neurons; with a predicted mask only masked-in neurons are read, gate and
//       up rows interleaved. Kept neurons go to a compact list in shared memory
//       (slot, f, h[t]);
//   (2) multiply that list into w_down: each thread owns VEC consecutive columns per
//       pass, accumulates sum_j h[j, t] * w_down[f_j, c..c+VEC) in registers (16-byte
//       loads), and adds its (T, VEC) partial to the global fp32/fp64 accumulator with
//       atomics (one float4 atomic per 4 columns on sm_90);
//   (3) the LAST block to finish (a ticket counter after a memory fence: the CUDA
//       samples' threadFenceReduction pattern, no grid-wide barrier, no co-residency
//       needed) converts the accumulator to x's dtype into `out`, zeroes the
//       accumulator and resets the counters for the next launch.
// So the accumulator is all zero between launches: no memset, no second kernel, and the
// same launch can be replayed from a CUDA graph. Launches that share an accumulator must
// run in order (one stream).

template <typename X> __device__ __forceinline__ X from_acc(float v);
template <> __device__ __forceinline__ unsigned short from_acc<unsigned short>(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename X> __device__ __forceinline__ X from_acc(double v) { return (X)v; }

// acc[0..V) += p[0..V): vector atomics where the hardware has them
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* acc, const float* p, bool vec4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(MINISPARSE_NO_VEC_ATOMICS)
    if (vec4 && (V % 4) == 0) {
#pragma unroll
        for (int q = 0; q < V / 4; ++q)
            atomicAdd(reinterpret_cast<float4*>(acc + 4 * q), make_float4(p[4 * q], p[4 * q + 1], p[4 * q + 2], p[4 * q + 3]));
        return;
    }
#endif
#pragma unroll
    for (int k = 0; k < V; ++k) atomicAdd(acc + k, p[k]);
}
template <int V>
__device__ __forceinline__ void atomic_add_vec(double* acc, const double* p, bool) {
#pragma unroll
    for (int k = 0; k < V; ++k) atomicAdd(acc + k, p[k]);
}

template <typename W, typename X, int TT>
__global__ void __launch_bounds__(32 * WARPS_PER_BLOCK, TT == 1 ? 2 : 1)
ffn_fused(const X* __restrict__ x, const W* __restrict__ wg, const W* __restrict__ wu, const W* __restrict__ wd,
          const unsigned char* __restrict__ mask, int T, int D, int F, int per_block, int gate_kind, int up_kind,
          typename Acc<W>::T act_thr, typename Acc<W>::T skip_thr, int flags,
          typename Acc<W>::T* __restrict__ acc, X* __restrict__ out, unsigned int* __restrict__ counters) {
    // counters: [0] blocks done (ticket), [1] kept neurons (running sum), [2] kept neurons
    // of the last finished launch (read by the host only when stats are asked for)
    typedef typename Acc<W>::T A;
    const int V = Vec<W>::N;
    extern __shared__ __align__(16) unsigned char smem[];
    A* s_h = reinterpret_cast<A*>(smem);                               // (per_block, TT)
    int* s_idx = reinterpret_cast<int*>(smem + sizeof(A) * (size_t)per_block * TT);  // (per_block,)
    __shared__ int s_n;
    __shared__ bool s_last;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const bool vec_ok = flags & F_VEC, predicted = flags & F_PREDICTED, gated = flags & F_GATED;
    if (threadIdx.x == 0) s_n = 0;
    __syncthreads();
    const int f0 = blockIdx.x * per_block;
    const int f1 = min(F, f0 + per_block);
    // (1) gate [+ up] for the block's neurons, kept ones into the shared list
    for (int f = f0 + wid; f < f1; f += WARPS_PER_BLOCK) {
        if (predicted && !mask[f]) continue;
        A s[TT], u[TT];
        const bool pair = predicted && gated;                          // gate and up rows together
        if (pair)
            warp_dots<W, X, A, TT, 2>(x, wg + (size_t)f * D, wu + (size_t)f * D, T, D, vec_ok, lane, s, u);
        else
            warp_dots<W, X, A, TT, 1>(x, wg + (size_t)f * D, wg, T, D, vec_ok, lane, s, u);
        bool any = false;
#pragma unroll
        for (int t = 0; t < TT; ++t) {
            if (t < T) {
                s[t] = act_fn<A>(s[t], gate_kind, act_thr);
                bool keep = !(m_abs(s[t]) <= skip_thr);                 // NaN counts as kept
                if (!keep) s[t] = A(0);
                any |= keep;
            }
        }
        if (!any) continue;                                            // uniform across the warp
        if (gated) {
            if (!pair) warp_dots<W, X, A, TT, 1>(x, wu + (size_t)f * D, wu, T, D, vec_ok, lane, u, u);
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (t < T && s[t] != A(0)) s[t] = s[t] * act_fn<A>(u[t], up_kind, act_thr);
        }
        int slot = 0;
        if (lane == 0) slot = atomicAdd(&s_n, 1);
        slot = __shfl_sync(0xffffffffu, slot, 0);
        if (lane == 0) s_idx[slot] = f;
        if (lane < TT) {
#pragma unroll
            for (int t = 0; t < TT; ++t)
                if (t == lane) s_h[(size_t)slot * TT + t] = s[t];          // s[t] == 0 for t >= T
        }
    }
    __syncthreads();
    const int n = s_n;
    // (2) down projection of the block's kept neurons, atomically added to acc (T, D)
    if (n > 0) {
        const bool vec4 = (D & 3) == 0;
        for (int c = threadIdx.x * V; c < D; c += blockDim.x * V) {
            A p[TT][V];
#pragma unroll
            for (int t = 0; t < TT; ++t)
#pragma unroll
                for (int k = 0; k < V; ++k) p[t][k] = A(0);
            const bool full = vec_ok && c + V <= D;
#pragma unroll 4
            for (int j = 0; j < n; ++j) {
                const W* row = wd + (size_t)s_idx[j] * D + c;
                A w[V];
                if (full) {
                    load16<A>(row, w);
                } else {
#pragma unroll
                    for (int k = 0; k < V; ++k) w[k] = (c + k < D) ? to_acc<A>(row[k]) : A(0);
                }
#pragma unroll
                for (int t = 0; t < TT; ++t) {
                    const A h = s_h[(size_t)j * TT + t];
#pragma unroll
                    for (int k = 0; k < V; ++k) p[t][k] += h * w[k];
                }
            }
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                if (t < T) {
                    A* dst = acc + (size_t)t * D + c;
                    if (c + V <= D) {
                        atomic_add_vec<V>(dst, p[t], vec4);
                    } else {
                        for (int k = 0; k < V && c + k < D; ++k) atomicAdd(dst + k, p[t][k]);
                    }
                }
            }
        }
    }
    // (3) the last block converts acc to out and leaves acc and the counters zero
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        if (n > 0) atomicAdd(counters + 1, (unsigned int)n);
        __threadfence();
        s_last = atomicAdd(counters, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const int nY = T * D;
#pragma unroll 4
    for (int i = threadIdx.x; i < nY; i += blockDim.x) {
        const A v = __ldcg(acc + i);
        out[i] = from_acc<X>(v);
        __stcg(acc + i, A(0));
    }
    if (threadIdx.x == 0) {
        counters[2] = atomicExch(counters + 1, 0u);
        atomicExch(counters, 0u);
    }
}
