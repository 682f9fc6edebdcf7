// Masked generalised advantage estimation (GAE) as a block-wide reverse scan, plus per-row advantage statistics.
//
// Torch-free: raw pointers and sizes in, cudaError_t out. The binding is csrc/cuda/gae.cu; the same maths in
// Triton is rlhf_kernels/ops/gae.py.
//
// Layout: rewards, values (B, T) contiguous of one element type T (float / __nv_bfloat16 / __half); mask (B, T)
// contiguous bytes (torch.bool: nonzero = the step is an action). Outputs fp32 contiguous: advantages (B, T),
// returns (B, T) = advantages + float(values), row_stats (B, 3) = (count, mean, M2) of the advantages at the
// masked steps of the row (all zeros for a row without one).
//
// Maths. Going backwards in time, a masked step maps the state (nv, acc) = (next_value, acc) to
//   nv' = V_t,   acc' = (r_t - V_t) + gamma nv + gamma lam acc,
// an unmasked step leaves it unchanged; advantages[t] = acc after step t, starting from (0, 0) after step T-1.
// Each step, and any composition of consecutive steps, is an affine map (p, c, d, x, y):
//   nv' = p nv + x,   acc' = c nv + d acc + y
// (masked step: p = 0, c = gamma, d = gamma lam, x = V_t, y = r_t - V_t; unmasked: the identity 1, 0, 1, 0, 0).
// gae_compose(a, b) is "a applied first, then b"; in a reverse scan, a covers the later steps.
//
// Work split: one thread block per row (grid-stride over rows), nt threads (the shared row launch rule: smallest
// power of two in [32, 256] with nt * 16 >= T), each owning kGaeStepsPerThread = 16 consecutive steps of a tile
// of nt * 16 steps (4096 for T >= 2049). The row is walked in tiles from its end; tiles are right-aligned to the
// row end, so only the earliest tile is partial (its steps before t = 0 are identities and are never stored).
// Per tile:
//   1. the tile is copied into shared memory cooperatively (coalesced; 16-byte vector loads when every row start
//      is 16-byte aligned, i.e. T % 16 == 0 and aligned base pointers, else scalar loads of the same elements),
//      as fp32 y = r - V and V, plus the mask bytes;
//   2. each thread composes its 16 steps serially into one map; an inclusive suffix scan of these maps over the
//      warp (__shfl_down_sync, 5 levels) gives lane l the map of chunks l..31 of its warp; lane 0 publishes the
//      warp's total;
//   3. each thread applies the totals of the later warps, one after the other, to the carry (the state after
//      all later tiles), which gives the state entering its warp; its own inclusive map then gives the state
//      after its chunk, and one shuffle hands that state to the lane below as its entry state (lane 31 takes
//      the warp's entry state). Each thread replays its 16 steps sequentially from its entry state (the exact
//      recursion, so the scan only rounds the entry states), writes the advantages over its own y slots, and
//      folds its chunk's (count, mean, M2) (two-pass over its 16 values) into its running statistics with
//      Chan's formula. Thread 0's state after the tile's earliest step is the carry of the next tile;
//   4. advantages and returns are stored from shared memory, coalesced (16-byte streaming stores when aligned).
// At the end of the row the per-thread statistics are merged (Chan) by a shuffle tree per warp and then over the
// warps by thread 0, which writes row_stats. Merging per thread across tiles and reducing once per row gives the
// same statistic as a per-tile block reduction merged per tile, with one block reduction per row instead of per
// tile.
// A row's outputs depend only on (its contents, T, gamma, lam): not on B, the grid, or which load path was used
// (both paths put identical values in shared memory), so they are batch-invariant.
//
// Shared memory (dynamic, 40 KiB for a 4096-step tile): y and V are fp32 arrays padded with 4 floats after every
// 32 (step i at float gae_pad(i)), which makes the 16-byte accesses of both the per-thread chunks (thread j reads
// steps 16 j .. 16 j + 15) and the cooperative copies (consecutive threads, consecutive vectors) conflict-free
// within each quarter warp; the mask bytes need no padding.
//
// Parallelism comes from B only: a row is one block walking its tiles in order. For B >= ~4 x the SM count
// (e.g. B = 512 on 132 SMs) the GPU is full and the kernel is bandwidth-bound. A batch of a few very long rows
// (B small, T >~ 10^5) leaves SMs idle and pays one memory round trip per 4096-step tile; that case is not
// optimised here (it would need the row split over blocks with a second pass or a decoupled look-back for the
// carries). Limits: T <= 2^31 - 1 (in-row counts are 32-bit); B * T may exceed 2^31 (64-bit offsets).
#ifndef RLHF_CUDA_GAE_CUH_
#define RLHF_CUDA_GAE_CUH_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace rlhf_cuda {

inline constexpr int kGaeStepsPerThread = 16;  // consecutive steps per thread and tile (one 16-byte mask vector)
inline constexpr int kGaeMaxThreads = 256;     // largest block: 4096-step tiles
inline constexpr int kGaeMaxWarps = kGaeMaxThreads / 32;
// Caps registers at 64 so that four 256-thread blocks (40 KiB of shared memory each) fit per SM: B = 512 rows then
// run in one wave on a 132-SM H100.
inline constexpr int kGaeMinBlocksPerSm = 4;
inline constexpr int64_t kGaeMaxSteps = 0x7fffffff;  // T limit (32-bit in-row counts)

// Threads per block for rows of n_t steps (the shared row launch rule, one row per block).
inline int gae_threads(int64_t n_t) {
  return pow2_row_launch(n_t, kGaeMaxThreads, kGaeStepsPerThread, /*min_block=*/32).threads_per_row;
}

// Padded shared-memory layout of a tile: n floats take gae_padded(n) slots; step i lives at float gae_pad(i).
__host__ __device__ constexpr int gae_padded(int n) { return n + n / 8; }
__device__ __forceinline__ int gae_pad(int i) { return i + ((i >> 5) << 2); }

// Dynamic shared memory of a block of nt threads: y and V (padded fp32), then the mask bytes.
inline size_t gae_smem_bytes(int nt) {
  const int tile = nt * kGaeStepsPerThread;
  return 2 * sizeof(float) * static_cast<size_t>(gae_padded(tile)) + static_cast<size_t>(tile);
}

// ---------------------------------------------------------------------------------------------------------------
// Affine maps of the state, the state itself, and (count, mean, M2) statistics.
// ---------------------------------------------------------------------------------------------------------------
struct GaeMap {
  float p, c, d, x, y;  // nv' = p nv + x, acc' = c nv + d acc + y
};

struct GaeState {
  float nv, acc;
};

struct GaeStats {
  int n;  // number of masked steps
  float mean, m2;
};

__device__ __forceinline__ GaeMap gae_identity() { return {1.f, 0.f, 1.f, 0.f, 0.f}; }

// a applied first, then b. p stays exactly 0 or 1 (products of 0s and 1s).
__device__ __forceinline__ GaeMap gae_compose(const GaeMap& a, const GaeMap& b) {
  GaeMap r;
  r.p = a.p * b.p;
  r.c = fmaf(b.c, a.p, b.d * a.c);
  r.d = a.d * b.d;
  r.x = fmaf(b.p, a.x, b.x);
  r.y = fmaf(b.c, a.x, fmaf(b.d, a.y, b.y));
  return r;
}

__device__ __forceinline__ GaeState gae_apply(const GaeMap& f, const GaeState& s) {
  return {fmaf(f.p, s.nv, f.x), fmaf(f.c, s.nv, fmaf(f.d, s.acc, f.y))};
}

// Chan et al.'s merge of two (count, mean, M2) summaries; an empty operand returns the other one exactly.
__device__ __forceinline__ GaeStats gae_stats_merge(const GaeStats& a, const GaeStats& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int n = a.n + b.n;
  const float fb = static_cast<float>(b.n) / static_cast<float>(n);
  const float delta = b.mean - a.mean;
  return {n, fmaf(delta, fb, a.mean), a.m2 + b.m2 + delta * delta * static_cast<float>(a.n) * fb};
}

// ---------------------------------------------------------------------------------------------------------------
// Tile copies between global and shared memory. A tile covers row steps [lo, lo + tile) (lo < 0 only for the
// earliest tile); local step i is row step lo + i, outside the row when lo + i < 0 (zeros, mask 0, not stored).
// kVec: every row start is 16-byte aligned for all five arrays and T % 16 == 0, so a 16-byte vector of any array
// is either entirely inside or entirely outside the row (lo is a multiple of 16).
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool kVec>
__device__ __forceinline__ void gae_load_tile(const T* r_row, const T* v_row, const uint8_t* m_row, int64_t lo,
                                              float* s_y, float* s_v, uint8_t* s_m, int tid, int nt) {
  using Tr = ElemTraits<T>;
  using raw_t = typename Tr::raw_t;
  constexpr int K = kGaeStepsPerThread;
  const raw_t* r = reinterpret_cast<const raw_t*>(r_row);
  const raw_t* v = reinterpret_cast<const raw_t*>(v_row);
  if constexpr (kVec) {
    constexpr int VEC = Tr::kVec;  // elements per 16-byte vector: 4 or 8
    constexpr int NV = K / VEC;    // vectors per thread and array (the tile has nt * K / VEC of them)
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    uint4 rv[NV], vv[NV];
#pragma unroll
    for (int u = 0; u < NV; ++u) {  // every load first, then the conversions: all of them in flight at once
      const int64_t t = lo + (tid + u * nt) * VEC;
      rv[u] = t >= 0 ? ld_stream16(r + t) : zero;
      vv[u] = t >= 0 ? ld_stream16(v + t) : zero;
    }
    const int64_t tm = lo + tid * K;  // the tile's mask is nt vectors of 16 bytes: one per thread
    const uint4 mv = tm >= 0 ? ld_stream16(m_row + tm) : zero;
#pragma unroll
    for (int u = 0; u < NV; ++u) {
      raw_t rr[VEC], vr[VEC];
      unpack16(rv[u], rr);
      unpack16(vv[u], vr);
      const int i0 = (tid + u * nt) * VEC;
#pragma unroll
      for (int h = 0; h < VEC; h += 4) {
        float y4[4], v4[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v4[e] = Tr::to_float(vr[h + e]);
          y4[e] = Tr::to_float(rr[h + e]) - v4[e];
        }
        *reinterpret_cast<float4*>(s_y + gae_pad(i0 + h)) = make_float4(y4[0], y4[1], y4[2], y4[3]);
        *reinterpret_cast<float4*>(s_v + gae_pad(i0 + h)) = make_float4(v4[0], v4[1], v4[2], v4[3]);
      }
    }
    *reinterpret_cast<uint4*>(s_m + tid * K) = mv;
  } else {
#pragma unroll 8  // 24 loads in flight; a full unroll spills under the 64-register cap
    for (int s = 0; s < K; ++s) {  // element i = tid + s * nt: consecutive threads, consecutive elements
      const int i = tid + s * nt;
      const int64_t t = lo + i;
      float rf = 0.f, vf = 0.f;
      uint8_t mb = 0;
      if (t >= 0) {
        rf = Tr::to_float(ld_cached(r + t));
        vf = Tr::to_float(ld_cached(v + t));
        mb = __ldg(m_row + t);
      }
      s_y[gae_pad(i)] = rf - vf;
      s_v[gae_pad(i)] = vf;
      s_m[i] = mb;
    }
  }
}

// Stores advantages (from s_y) and returns = advantages + V of the tile's steps inside the row.
template <bool kVec>
__device__ __forceinline__ void gae_store_tile(float* adv_row, float* ret_row, int64_t lo, const float* s_y,
                                               const float* s_v, int tid, int nt) {
  constexpr int K = kGaeStepsPerThread;
  if constexpr (kVec) {
#pragma unroll
    for (int u = 0; u < K / 4; ++u) {
      const int i0 = (tid + u * nt) * 4;
      const int64_t t = lo + i0;
      if (t >= 0) {
        const float4 a = *reinterpret_cast<const float4*>(s_y + gae_pad(i0));
        const float4 v = *reinterpret_cast<const float4*>(s_v + gae_pad(i0));
        __stcs(reinterpret_cast<float4*>(adv_row + t), a);
        __stcs(reinterpret_cast<float4*>(ret_row + t), make_float4(a.x + v.x, a.y + v.y, a.z + v.z, a.w + v.w));
      }
    }
  } else {
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int i = tid + s * nt;
      const int64_t t = lo + i;
      if (t >= 0) {
        const float a = s_y[gae_pad(i)];
        adv_row[t] = a;
        ret_row[t] = a + s_v[gae_pad(i)];
      }
    }
  }
}

// Thread-owned chunk: steps c0 .. c0 + 15 of the tile (y, V from shared memory); returns the mask as bits
// (bit s set when step c0 + s is masked).
__device__ __forceinline__ uint32_t gae_read_chunk(const float* s_y, const float* s_v, const uint8_t* s_m, int c0,
                                                   float (&y)[kGaeStepsPerThread], float (&v)[kGaeStepsPerThread]) {
  static_assert(kGaeStepsPerThread == 16, "a chunk's mask is one 16-byte vector");
#pragma unroll
  for (int q = 0; q < kGaeStepsPerThread; q += 4) {
    const float4 a = *reinterpret_cast<const float4*>(s_y + gae_pad(c0 + q));
    const float4 b = *reinterpret_cast<const float4*>(s_v + gae_pad(c0 + q));
    y[q] = a.x;
    y[q + 1] = a.y;
    y[q + 2] = a.z;
    y[q + 3] = a.w;
    v[q] = b.x;
    v[q + 1] = b.y;
    v[q + 2] = b.z;
    v[q + 3] = b.w;
  }
  const uint4 mv = *reinterpret_cast<const uint4*>(s_m + c0);
  const uint32_t w[4] = {mv.x, mv.y, mv.z, mv.w};
  uint32_t bits = 0;
#pragma unroll
  for (int s = 0; s < kGaeStepsPerThread; ++s)
    bits |= static_cast<uint32_t>(((w[s >> 2] >> (8 * (s & 3))) & 0xffu) != 0u) << s;
  return bits;
}

// Inclusive suffix scan over the warp: lane l gets the composition of the maps of lanes 31, 30, ..., l (lane 31's
// applied first). Hillis-Steele: before the step with offset off, lane l holds lanes [l, min(l + off, 32)).
__device__ __forceinline__ GaeMap gae_warp_suffix_scan(GaeMap f, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    GaeMap o;
    o.p = __shfl_down_sync(0xffffffffu, f.p, off);
    o.c = __shfl_down_sync(0xffffffffu, f.c, off);
    o.d = __shfl_down_sync(0xffffffffu, f.d, off);
    o.x = __shfl_down_sync(0xffffffffu, f.x, off);
    o.y = __shfl_down_sync(0xffffffffu, f.y, off);
    if (lane + off < 32) f = gae_compose(o, f);  // o covers the later lanes
  }
  return f;
}

// Fixed shuffle tree over the 32 lanes of the warp; lane 0 gets the merged statistics.
__device__ __forceinline__ GaeStats gae_warp_stats(GaeStats st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    GaeStats o;
    o.n = __shfl_down_sync(0xffffffffu, st.n, off);
    o.mean = __shfl_down_sync(0xffffffffu, st.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, st.m2, off);
    st = gae_stats_merge(st, o);
  }
  return st;
}

// One block (blockDim.x = nt from gae_threads, dynamic shared memory gae_smem_bytes(nt)) per row, grid-stride.
// Every __syncthreads below is reached by all threads: the row and tile loops are block-uniform.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kGaeMaxThreads, kGaeMinBlocksPerSm)
    gae_fwd_kernel(const T* __restrict__ rewards, const T* __restrict__ values, const uint8_t* __restrict__ mask,
                   float* __restrict__ advantages, float* __restrict__ returns, float* __restrict__ row_stats,
                   int64_t n_b, int64_t n_t, float gamma, float gamma_lam) {
  constexpr int K = kGaeStepsPerThread;
  const int nt = blockDim.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = nt >> 5;
  const int tile = nt * K;
  const int c0 = tid * K;  // first step of this thread's chunk in the tile
  extern __shared__ __align__(16) unsigned char gae_smem[];
  float* s_y = reinterpret_cast<float*>(gae_smem);  // r - V, then the advantages
  float* s_v = s_y + gae_padded(tile);
  uint8_t* s_m = reinterpret_cast<uint8_t*>(s_v + gae_padded(tile));
  __shared__ GaeMap s_warp_map[kGaeMaxWarps];  // warp w's suffix over its 32 chunks
  __shared__ GaeStats s_warp_stats[kGaeMaxWarps];
  __shared__ GaeState s_carry;  // state after the later tiles of the row
  const int64_t n_tiles = (n_t + tile - 1) / tile;

  for (int64_t row = blockIdx.x; row < n_b; row += gridDim.x) {
    const int64_t base = row * n_t;
    GaeStats st = {0, 0.f, 0.f};  // this thread's steps of the row so far
    for (int64_t k = 0; k < n_tiles; ++k) {
      const int64_t lo = n_t - (k + 1) * tile;
      __syncthreads();  // the previous tile's (or row's) readers of s_y / s_v / s_m are done
      gae_load_tile<T, kVec>(rewards + base, values + base, mask + base, lo, s_y, s_v, s_m, tid, nt);
      __syncthreads();

      // 2. own chunk -> one map (latest step first), then the suffix scan over the warp.
      float y[K], v[K];
      uint32_t bits = gae_read_chunk(s_y, s_v, s_m, c0, y, v);
      GaeMap f = gae_identity();
#pragma unroll
      for (int s = K - 1; s >= 0; --s) {
        if ((bits >> s) & 1u) {  // gae_compose(f, masked step s), with the step's constants folded in
          f.y = fmaf(gamma, f.x, fmaf(gamma_lam, f.y, y[s]));
          f.c = fmaf(gamma_lam, f.c, gamma * f.p);
          f.d *= gamma_lam;
          f.x = v[s];
          f.p = 0.f;
        }
      }
      f = gae_warp_suffix_scan(f, lane);
      if (lane == 0) s_warp_map[warp] = f;
      __syncthreads();

      // 3. entry state of the warp, of the chunk, then the sequential replay of the chunk.
      GaeState s_in_warp = {0.f, 0.f};
      if (k > 0) s_in_warp = s_carry;
      for (int w = n_warps - 1; w > warp; --w) s_in_warp = gae_apply(s_warp_map[w], s_in_warp);
      const GaeState after = gae_apply(f, s_in_warp);  // state after chunks 31 .. lane of this warp
      float nv = __shfl_down_sync(0xffffffffu, after.nv, 1);
      float acc = __shfl_down_sync(0xffffffffu, after.acc, 1);
      if (lane == 31) {
        nv = s_in_warp.nv;
        acc = s_in_warp.acc;
      }
      bits = gae_read_chunk(s_y, s_v, s_m, c0, y, v);  // re-read rather than hold 32 values across the scan
      float a[K];
#pragma unroll
      for (int s = K - 1; s >= 0; --s) {
        if ((bits >> s) & 1u) {
          acc = fmaf(gamma_lam, acc, fmaf(gamma, nv, y[s]));
          nv = v[s];
        }
        a[s] = acc;
      }
#pragma unroll
      for (int q = 0; q < K; q += 4)  // only this thread reads or writes these slots until the next barrier
        *reinterpret_cast<float4*>(s_y + gae_pad(c0 + q)) = make_float4(a[q], a[q + 1], a[q + 2], a[q + 3]);
      const int cnt = __popc(bits);
      if (cnt > 0) {  // two-pass (count, mean, M2) of the chunk, folded into the running statistics
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < K; ++s)
          if ((bits >> s) & 1u) sum += a[s];
        const float mean = sum / static_cast<float>(cnt);
        float m2 = 0.f;
#pragma unroll
        for (int s = 0; s < K; ++s) {
          if ((bits >> s) & 1u) {
            const float dev = a[s] - mean;
            m2 = fmaf(dev, dev, m2);
          }
        }
        st = gae_stats_merge(st, GaeStats{cnt, mean, m2});
      }
      __syncthreads();

      // 4. thread 0 holds the state after the tile's earliest step: the next tile's carry. It is read after
      // the next tile's second barrier, and all reads of the previous value came before the barrier above.
      if (tid == 0) s_carry = GaeState{nv, acc};
      gae_store_tile<kVec>(advantages + base, returns + base, lo, s_y, s_v, tid, nt);
    }

    st = gae_warp_stats(st);
    if (lane == 0) s_warp_stats[warp] = st;
    __syncthreads();
    if (tid == 0) {
      GaeStats total = s_warp_stats[0];
      for (int w = 1; w < n_warps; ++w) total = gae_stats_merge(total, s_warp_stats[w]);
      float* out = row_stats + row * 3;
      out[0] = static_cast<float>(total.n);
      out[1] = total.mean;
      out[2] = total.m2;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launcher. n_b == 0 or n_t == 0 launches nothing (row_stats is then the caller's to fill); n_t must be at most
// kGaeMaxSteps. gamma_lam = gamma * lam, rounded once to fp32 by the caller.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
cudaError_t launch_gae_fwd(const T* rewards, const T* values, const uint8_t* mask, float* advantages,
                           float* returns, float* row_stats, int64_t n_b, int64_t n_t, float gamma, float gamma_lam,
                           cudaStream_t stream) {
  if (n_b <= 0 || n_t <= 0) return cudaSuccess;
  if (n_t > kGaeMaxSteps) return cudaErrorInvalidValue;
  const int nt = gae_threads(n_t);
  const size_t smem = gae_smem_bytes(nt);  // <= 40 KiB: no opt-in above 48 KiB needed
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vec = n_t % 16 == 0 && aligned(rewards) && aligned(values) && aligned(mask) && aligned(advantages) &&
                   aligned(returns);
  const unsigned grid = capped_grid(n_b);  // grid-stride covers the rest
  if (vec)
    gae_fwd_kernel<T, true><<<grid, nt, smem, stream>>>(rewards, values, mask, advantages, returns, row_stats, n_b,
                                                         n_t, gamma, gamma_lam);
  else
    gae_fwd_kernel<T, false><<<grid, nt, smem, stream>>>(rewards, values, mask, advantages, returns, row_stats, n_b,
                                                          n_t, gamma, gamma_lam);
  return cudaGetLastError();
}

// Explicit instantiations for the three element types (this header is included by gae.cu only).
#define RLHF_GAE_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_gae_fwd<T>(const T*, const T*, const uint8_t*, float*, float*, float*, int64_t,    \
                                         int64_t, float, float, cudaStream_t);

RLHF_GAE_INSTANTIATE(float)
RLHF_GAE_INSTANTIATE(__nv_bfloat16)
RLHF_GAE_INSTANTIATE(__half)

#undef RLHF_GAE_INSTANTIATE

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_GAE_CUH_
