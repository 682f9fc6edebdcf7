// Fused PPO losses, per token, with their gradients and partial sums: the PPO-family policy losses
// (ppo_policy_fwd: clip, CISPO, SAPO; token or sequence log-ratios) and the clipped value loss (ppo_value_fwd); the
// formulas are the op table's (rlhf_kernels/_registry.py).
//
// Torch-free: raw pointers and sizes in, cudaError_t out. The binding is csrc/cuda/ppo_loss.cu; the CPU twin is
// csrc/cpu/ppo_loss.cpp.
//
// Layout: four fp32 (N,) contiguous inputs (weight last); outputs fp32 grad (N,) and partials, whose columns are
// the op's sums (the binding adds the rows). seq_offsets (sequence kernel): (S + 1,) int64.
//
// Token kernel (the value loss, and the policy loss at ratio_level 0; the loss type is a template parameter).
// Chunk c is tokens [c 2048, min(N, (c + 1) 2048)); blocks of kPpoThreads = 256 threads walk the chunks
// grid-stride, one chunk per iteration, and chunk c writes row c of the fp32 partials (P, kCols): P =
// ceil(N / 2048), a function of N only, as on the CPU backend (N = 0 launches nothing; the binding returns zero
// sums). Thread t owns the 4-token vectors t and t + 256 of its chunk, so consecutive threads read consecutive 16
// bytes of each input: one 16-byte streaming load per input and vector when every pointer is 16-byte aligned and
// the vector lies inside [0, N), else four bounds-checked scalar loads of the same tokens (the last, partial
// vector). A thread adds its tokens' terms in a fixed order (vector 0 then 1, token 0..3 of each), sums in fp64
// and counts in fp32 (exact: at most 2048); a fixed shuffle tree folds the 32 lanes of each warp, and the warps'
// values are added in warp order into the chunk's row. Which path loaded a token and which block ran a chunk do
// not change any value.
//
// Sequence kernel (the policy loss at ratio_level 1 and 2: the log-ratio of a token is the mean D_s of the
// counted log-ratios of its sequence s). One block of 256 threads per sequence (grid-stride over sequences, the
// grid capped like the token kernel's); sequence s writes row s of the fp64 partials (S, 5). Thread t owns the
// tokens begin + t, begin + t + 256, ... of its sequence (coalesced scalar loads, four tokens per input in flight;
// any length, 0 included):
//   pass 1: the counted d, summed in fp64, and their count n_s; a block sum gives D_s = sum / n_s (fp64, rounded
//           once to fp32) in every thread, and rho = exp(clamp(D_s)) once per thread;
//   pass 2: each counted token's terms at x = D_s and its grad: w (q + e) (ratio_level 2) or w e (level 1); the
//           five columns and (level 1) the sum of w q in fp64, folded by a block sum;
//   pass 3 (level 1, skipped where G_s = 0, e.g. CISPO): G_s = (sum of w q) / n_s rounded once, added to the grad
//           of the sequence's counted tokens (each thread re-reads the tokens it wrote in pass 2).
// Block sums are deterministic: a fixed shuffle tree per warp, then the 8 warps in order, read by every thread.
// Passes 2 and 3 read the sequence again (from L2 for sequences that fit there). A sequence far shorter than 256
// tokens leaves most of its block idle; packing several short sequences per block is not done here.
//
// Offsets are not checked on the device (that would synchronise the host): the kernel clamps every offset into
// [0, N] and treats a decreasing pair as an empty sequence. A malformed table (first not 0, last not N,
// decreasing) thus never reads or writes outside the tensors, but gives wrong values: tokens that no sequence
// covers keep an unspecified grad, and tokens covered by two sequences get the grad of whichever block writes
// last. The CPU backend and the Triton launcher on CPU tensors reject such a table.
//
// Precision: every per-token quantity is fp32, with rho = expf(clamp(x, -20, 20)) (CUDA's expf, at most 2 ulp; the
// extension is not compiled with fast math). The fp64 sums make a sum exact up to the per-term errors and its
// roundings to fp32 (each token chunk's row; the total of the sequence rows, which stay fp64). Products are never
// fused with a following add (the one such add, w e + G_s, is __fadd_rn), so the values are those of the formulas
// evaluated in fp32 step by step.
//
// Tokens with weight == 0 contribute exactly 0 to grad and to every sum and count, whatever their other inputs
// hold: their terms are dropped by selects, never multiplied by the zero weight.
//
// Limits: N < 2^63 (64-bit token offsets); the grids are capped at 2^31 - 1 blocks and grid-stride beyond.
#ifndef RLHF_CUDA_PPO_LOSS_CUH_
#define RLHF_CUDA_PPO_LOSS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "ppo_policy_modes.h"

namespace rlhf_cuda {

using rlhf_ppo::PolicyParams;

inline constexpr int kPpoThreads = 256;
inline constexpr int kPpoWarps = kPpoThreads / 32;
inline constexpr int kPpoVecsPerThread = 2;                                         // 4-token vectors per thread
inline constexpr int64_t kPpoChunk = int64_t{kPpoThreads} * kPpoVecsPerThread * 4;  // tokens per partials row
inline constexpr int kPolicyCols = 5;  // weighted loss, clip-low, clip-high, old - new log-prob, lower
inline constexpr int kPpoSeqUnroll = 4;  // tokens per thread and tile of the sequence kernel
inline constexpr int64_t kPpoSeqTile = int64_t{kPpoThreads} * kPpoSeqUnroll;

// Rows of partials for n >= 1 tokens (the binding returns zero sums for n = 0).
inline int64_t ppo_num_chunks(int64_t n) { return (n + kPpoChunk - 1) / kPpoChunk; }

// ---------------------------------------------------------------------------------------------------------
// Policy loss of one token from its ratio: rho = exp(clamp(x, -20, 20)) of its log-ratio x (its own d, or its
// sequence's D_s), rc = rho clamped to [lo, hi], saturated = |x| > 20 (no gradient through rho). Returns the loss
// l, q = dl/dlog(rho), e = dl/dlogprobs at fixed rho, and the token's statistics.
struct PpoPolicyTerms {
  float l, q, e;
  bool low, high, lower;  // clip-low, clip-high, dual-clipped
};

__device__ __forceinline__ float ppo_ratio(float x) {
  return expf(x < -20.0f ? -20.0f : (x > 20.0f ? 20.0f : x));  // selects, not fminf / fmaxf: keep a NaN x
}
__device__ __forceinline__ bool ppo_saturated(float x) { return x > 20.0f || x < -20.0f; }
__device__ __forceinline__ float ppo_clamp_ratio(float rho, const PolicyParams& c) {
  return rho < c.lo ? c.lo : (rho > c.hi ? c.hi : rho);
}

template <int kType>
__device__ __forceinline__ PpoPolicyTerms ppo_policy_terms(float rho, float rc, bool saturated, float lp, float adv,
                                                           const PolicyParams& c) {
  const float na = -adv;
  PpoPolicyTerms t;
  if constexpr (kType == rlhf_ppo::kClipLoss) {
    const float l1 = na * rho, l2 = na * rc;
    const bool clipped = l2 > l1;
    const float l_dual = na * c.dual;  // the dual-clip bound -A dual_clip
    const float l_clip = clipped ? l2 : l1;
    t.lower = c.dual > 0.0f && adv < 0.0f && l_clip > l_dual;
    t.l = t.lower ? l_dual : l_clip;
    t.q = clipped || t.lower || saturated ? 0.0f : l1;
    t.e = 0.0f;
    t.low = clipped && adv < 0.0f;
    t.high = clipped && adv > 0.0f;
  } else if constexpr (kType == rlhf_ppo::kCispoLoss) {
    t.e = na * rc;  // the clipped ratio weighs -A logprobs as a constant
    t.l = t.e * lp;
    t.q = 0.0f;
    t.low = rho < c.lo;
    t.high = rho > c.hi;
    t.lower = false;
  } else {
    static_assert(kType == rlhf_ppo::kSapoLoss, "unknown loss type");
    const bool pos = adv > 0.0f;
    const float tau = pos ? c.tau_pos : c.tau_neg, k = pos ? c.k_pos : c.k_neg;
    const float z = tau * (rho - 1.0f);
    // g = sigmoid(z) and h = 1 - g from u = exp(-|z|) in (0, 1]: no overflow, and h keeps its relative precision
    // where g rounds to 1 (1 - g would be 0 there)
    const float u = expf(z < 0.0f ? z : -z);
    const float s = __frcp_rn(1.0f + u), us = u * s;
    const float g = z < 0.0f ? us : s, h = z < 0.0f ? s : us;
    t.l = na * g * k;
    t.q = saturated ? 0.0f : 4.0f * na * g * h * rho;
    t.e = 0.0f;
    t.low = adv < 0.0f && rho < c.lo;
    t.high = pos && rho > c.hi;
    t.lower = false;
  }
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// Token kernel. A Loss has kSums fp64 sums and kCounts fp32 counts per token, partials column sum_col(k) /
// count_col(k) of each, and operator() (one token: adds its terms, returns its grad).

// Policy loss at ratio_level 0 (x = d). Columns: sum weight * l, count of clip-low, count of clip-high,
// sum (old_logprobs - logprobs), count of lower.
template <int kType>
struct PpoPolicyLoss {
  static constexpr int kSums = 2, kCounts = 3;
  __host__ __device__ static constexpr int sum_col(int k) { return k == 0 ? 0 : 3; }
  __host__ __device__ static constexpr int count_col(int k) { return k == 0 ? 1 : (k == 1 ? 2 : 4); }
  PolicyParams c;

  __device__ __forceinline__ float operator()(float lp, float olp, float adv, float w, double (&sum)[kSums],
                                              float (&count)[kCounts]) const {
    const float d = lp - olp, rho = ppo_ratio(d);
    const PpoPolicyTerms t = ppo_policy_terms<kType>(rho, ppo_clamp_ratio(rho, c), ppo_saturated(d), lp, adv, c);
    const bool counts = w != 0.0f;
    sum[0] += counts ? static_cast<double>(w * t.l) : 0.0;
    count[0] += counts && t.low ? 1.0f : 0.0f;
    count[1] += counts && t.high ? 1.0f : 0.0f;
    sum[1] += counts ? static_cast<double>(olp - lp) : 0.0;
    count[2] += counts && t.lower ? 1.0f : 0.0f;
    return counts ? w * (t.q + t.e) : 0.0f;
  }
};

// Clipped value loss: clip (+inf: none). Columns: sum weight * l, count of clipped.
struct PpoValueLoss {
  static constexpr int kSums = 1, kCounts = 1;
  __host__ __device__ static constexpr int sum_col(int) { return 0; }
  __host__ __device__ static constexpr int count_col(int) { return 1; }
  float clip;

  __device__ __forceinline__ float operator()(float v, float old, float ret, float w, double (&sum)[kSums],
                                              float (&count)[kCounts]) const {
    const float a = v - ret;
    const float vlo = old - clip, vhi = old + clip;
    const float vc_low = v < vlo ? vlo : v;
    const float vc = vc_low > vhi ? vhi : vc_low;
    const float b = vc - ret;
    const float a2 = a * a, b2 = b * b;
    const bool clipped = b2 > a2;
    const float l = 0.5f * (clipped ? b2 : a2);
    const bool counts = w != 0.0f;
    sum[0] += counts ? static_cast<double>(w * l) : 0.0;
    count[0] += counts && clipped ? 1.0f : 0.0f;
    return counts && !clipped ? w * a : 0.0f;
  }
};

// blockDim.x must be kPpoThreads. The chunk loop is block-uniform, so every thread reaches both barriers and
// every lane takes part in the shuffles.
template <typename Loss, bool kVec>
__global__ void __launch_bounds__(kPpoThreads)
    ppo_loss_kernel(const float* __restrict__ x0, const float* __restrict__ x1, const float* __restrict__ x2,
                    const float* __restrict__ weight, float* __restrict__ grad, float* __restrict__ partials,
                    int64_t n, int64_t n_chunks, Loss loss) {
  constexpr int kSums = Loss::kSums, kCounts = Loss::kCounts, kCols = kSums + kCounts;
  __shared__ double s_sum[kPpoWarps][kSums];
  __shared__ float s_count[kPpoWarps][kCounts];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    double sum[kSums];
    float count[kCounts];
#pragma unroll
    for (int k = 0; k < kSums; ++k) sum[k] = 0.0;
#pragma unroll
    for (int k = 0; k < kCounts; ++k) count[k] = 0.0f;
    const int64_t base = c * kPpoChunk;
#pragma unroll
    for (int v = 0; v < kPpoVecsPerThread; ++v) {
      const int64_t i0 = base + 4 * static_cast<int64_t>(tid + v * kPpoThreads);
      if (kVec && i0 + 4 <= n) {
        const float4 a = __ldcs(reinterpret_cast<const float4*>(x0 + i0));
        const float4 b = __ldcs(reinterpret_cast<const float4*>(x1 + i0));
        const float4 e = __ldcs(reinterpret_cast<const float4*>(x2 + i0));
        const float4 w = __ldcs(reinterpret_cast<const float4*>(weight + i0));
        float4 g;
        g.x = loss(a.x, b.x, e.x, w.x, sum, count);
        g.y = loss(a.y, b.y, e.y, w.y, sum, count);
        g.z = loss(a.z, b.z, e.z, w.z, sum, count);
        g.w = loss(a.w, b.w, e.w, w.w, sum, count);
        __stcs(reinterpret_cast<float4*>(grad + i0), g);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i = i0 + e;
          if (i < n) grad[i] = loss(__ldg(x0 + i), __ldg(x1 + i), __ldg(x2 + i), __ldg(weight + i), sum, count);
        }
      }
    }

#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) sum[k] += __shfl_down_sync(0xffffffffu, sum[k], off);
#pragma unroll
      for (int k = 0; k < kCounts; ++k) count[k] += __shfl_down_sync(0xffffffffu, count[k], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kSums; ++k) s_sum[warp][k] = sum[k];
#pragma unroll
      for (int k = 0; k < kCounts; ++k) s_count[warp][k] = count[k];
    }
    __syncthreads();
    float* row = partials + c * kCols;
    if (tid < kSums) {
      double s = 0.0;
#pragma unroll
      for (int w = 0; w < kPpoWarps; ++w) s += s_sum[w][tid];
      row[Loss::sum_col(tid)] = static_cast<float>(s);
    } else if (tid < kCols) {
      float cnt = 0.0f;
#pragma unroll
      for (int w = 0; w < kPpoWarps; ++w) cnt += s_count[w][tid - kSums];
      row[Loss::count_col(tid - kSums)] = cnt;
    }
    __syncthreads();  // s_sum / s_count are refilled by the next chunk
  }
}

// Launcher. n == 0 launches nothing (the sums are then the caller's to fill); otherwise partials must hold
// ppo_num_chunks(n) rows of Loss::kSums + Loss::kCounts floats, all of which are written.
template <typename Loss>
cudaError_t launch_ppo_loss(const float* x0, const float* x1, const float* x2, const float* weight, float* grad,
                            float* partials, int64_t n, Loss loss, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t n_chunks = ppo_num_chunks(n);
  const auto aligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; };
  const bool vec = aligned(x0) && aligned(x1) && aligned(x2) && aligned(weight) && aligned(grad);
  const unsigned grid = capped_grid(n_chunks);
  if (vec)
    ppo_loss_kernel<Loss, true><<<grid, kPpoThreads, 0, stream>>>(x0, x1, x2, weight, grad, partials, n, n_chunks,
                                                                  loss);
  else
    ppo_loss_kernel<Loss, false><<<grid, kPpoThreads, 0, stream>>>(x0, x1, x2, weight, grad, partials, n, n_chunks,
                                                                   loss);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------------
// Sequence kernel.

// Sums of v[0..K) over the block, in every thread. A fixed shuffle tree per warp, then the warps in order; smem
// holds kPpoWarps rows of at least K doubles. Every thread of the block must call it (it has two barriers).
template <int K, int kSmemCols>
__device__ __forceinline__ void ppo_block_sum(double (&v)[K], double (&smem)[kPpoWarps][kSmemCols]) {
  static_assert(K <= kSmemCols, "smem rows too short");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_down_sync(0xffffffffu, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kPpoWarps; ++w) s += smem[w][k];
    v[k] = s;
  }
  __syncthreads();  // smem is refilled by the next call
}

// The clamped [begin, end) of sequence s: every offset clamped into [0, n], a decreasing pair made empty.
__device__ __forceinline__ void ppo_sequence_range(const int64_t* __restrict__ offsets, int64_t s, int64_t n,
                                                   int64_t& begin, int64_t& end) {
  const int64_t a = __ldg(offsets + s), b = __ldg(offsets + s + 1);
  begin = a < 0 ? 0 : (a > n ? n : a);
  end = b < begin ? begin : (b > n ? n : b);
}

// blockDim.x must be kPpoThreads; partials (n_seq, kPolicyCols) fp64. The sequence loop is block-uniform (every
// thread reaches the barriers of the block sums). Each pass walks the sequence by tiles of kPpoSeqTile tokens:
// a thread first loads its kPpoSeqUnroll tokens of the tile (token u at base + tid + u kPpoThreads: coalesced),
// then uses them in order, so that kPpoSeqUnroll loads per input are in flight at once. Branch-free like the token
// kernel: the terms of a token that does not count are formed and dropped by selects.
template <int kType, int kLevel>
__global__ void __launch_bounds__(kPpoThreads)
    ppo_policy_seq_kernel(const float* __restrict__ lp, const float* __restrict__ olp, const float* __restrict__ adv,
                          const float* __restrict__ weight, const int64_t* __restrict__ offsets,
                          float* __restrict__ grad, double* __restrict__ partials, int64_t n, int64_t n_seq,
                          PolicyParams c) {
  static_assert(kLevel == rlhf_ppo::kSequenceRatio || kLevel == rlhf_ppo::kSequenceTokenRatio, "sequence levels");
  constexpr bool kSeqGrad = kLevel == rlhf_ppo::kSequenceRatio;  // level 1: G_s, the sum of w q over the sequence
  constexpr int kAcc = kPolicyCols + (kSeqGrad ? 1 : 0);
  constexpr int U = kPpoSeqUnroll;
  __shared__ double s_red[kPpoWarps][kPolicyCols + 1];
  const int tid = threadIdx.x;

  for (int64_t s = blockIdx.x; s < n_seq; s += gridDim.x) {
    int64_t begin, end;
    ppo_sequence_range(offsets, s, n, begin, end);

    // pass 1: D_s
    double mean[2] = {0.0, 0.0};  // sum of the counted d, their count
#pragma unroll 1
    for (int64_t base = begin + tid; base < end; base += kPpoSeqTile) {
      float d[U];
      bool counted[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * kPpoThreads;
        counted[u] = i < end && __ldg(weight + i) != 0.0f;
        d[u] = i < end ? __ldg(lp + i) - __ldg(olp + i) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        mean[0] += counted[u] ? static_cast<double>(d[u]) : 0.0;
        mean[1] += counted[u] ? 1.0 : 0.0;
      }
    }
    ppo_block_sum(mean, s_red);
    const float x = mean[1] > 0.0 ? static_cast<float>(mean[0] / mean[1]) : 0.0f;  // D_s, rounded once
    const float rho = ppo_ratio(x), rc = ppo_clamp_ratio(rho, c);
    const bool saturated = ppo_saturated(x);

    // pass 2: every token's terms at x = D_s
    double acc[kAcc];  // the partials columns, then (level 1) the sum of w q
#pragma unroll
    for (int k = 0; k < kAcc; ++k) acc[k] = 0.0;
#pragma unroll 1
    for (int64_t base = begin + tid; base < end; base += kPpoSeqTile) {
      float lpv[U], olpv[U], av[U], wv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * kPpoThreads;
        const bool in = i < end;
        wv[u] = in ? __ldg(weight + i) : 0.0f;
        lpv[u] = in ? __ldg(lp + i) : 0.0f;
        olpv[u] = in ? __ldg(olp + i) : 0.0f;
        av[u] = in ? __ldg(adv + i) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = base + u * kPpoThreads;
        const float w = wv[u];
        const bool counts = w != 0.0f;
        const PpoPolicyTerms t = ppo_policy_terms<kType>(rho, rc, saturated, lpv[u], av[u], c);
        acc[0] += counts ? static_cast<double>(w * t.l) : 0.0;
        acc[1] += counts && t.low ? 1.0 : 0.0;
        acc[2] += counts && t.high ? 1.0 : 0.0;
        acc[3] += counts ? static_cast<double>(olpv[u] - lpv[u]) : 0.0;
        acc[4] += counts && t.lower ? 1.0 : 0.0;
        if constexpr (kSeqGrad) acc[kPolicyCols] += counts ? static_cast<double>(w * t.q) : 0.0;
        if (i < end) grad[i] = counts ? (kSeqGrad ? w * t.e : w * (t.q + t.e)) : 0.0f;
      }
    }
    ppo_block_sum(acc, s_red);

    // pass 3 (level 1): G_s on the counted tokens, each re-read by the thread that wrote it in pass 2
    if constexpr (kSeqGrad) {
      const float gs = mean[1] > 0.0 ? static_cast<float>(acc[kPolicyCols] / mean[1]) : 0.0f;  // G_s
      if (gs != 0.0f) {  // block-uniform
#pragma unroll 1
        for (int64_t base = begin + tid; base < end; base += kPpoSeqTile) {
          float gv[U];
          bool counted[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int64_t i = base + u * kPpoThreads;
            counted[u] = i < end && __ldg(weight + i) != 0.0f;
            gv[u] = i < end ? grad[i] : 0.0f;
          }
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (counted[u]) grad[base + u * kPpoThreads] = __fadd_rn(gv[u], gs);
        }
      }
    }
    if (tid == 0) {  // (constant indices: acc stays in registers)
#pragma unroll
      for (int k = 0; k < kPolicyCols; ++k) partials[s * kPolicyCols + k] = acc[k];
    }
  }
}

// Launcher. n_seq == 0 launches nothing (the sums are then the caller's to fill); otherwise partials must hold
// n_seq rows of kPolicyCols doubles, all of which are written.
template <int kType, int kLevel>
cudaError_t launch_ppo_policy_seq(const float* lp, const float* olp, const float* adv, const float* weight,
                                  const int64_t* offsets, float* grad, double* partials, int64_t n, int64_t n_seq,
                                  PolicyParams c, cudaStream_t stream) {
  if (n_seq <= 0) return cudaSuccess;
  ppo_policy_seq_kernel<kType, kLevel><<<capped_grid(n_seq), kPpoThreads, 0, stream>>>(
      lp, olp, adv, weight, offsets, grad, partials, n, n_seq, c);
  return cudaGetLastError();
}

// Explicit instantiations of every loss (this header is included by ppo_loss.cu only).
template cudaError_t launch_ppo_loss<PpoPolicyLoss<rlhf_ppo::kClipLoss>>(const float*, const float*, const float*,
                                                                        const float*, float*, float*, int64_t,
                                                                        PpoPolicyLoss<rlhf_ppo::kClipLoss>,
                                                                        cudaStream_t);
template cudaError_t launch_ppo_loss<PpoPolicyLoss<rlhf_ppo::kCispoLoss>>(const float*, const float*, const float*,
                                                                         const float*, float*, float*, int64_t,
                                                                         PpoPolicyLoss<rlhf_ppo::kCispoLoss>,
                                                                         cudaStream_t);
template cudaError_t launch_ppo_loss<PpoPolicyLoss<rlhf_ppo::kSapoLoss>>(const float*, const float*, const float*,
                                                                        const float*, float*, float*, int64_t,
                                                                        PpoPolicyLoss<rlhf_ppo::kSapoLoss>,
                                                                        cudaStream_t);
template cudaError_t launch_ppo_loss<PpoValueLoss>(const float*, const float*, const float*, const float*, float*,
                                                   float*, int64_t, PpoValueLoss, cudaStream_t);
#define RLHF_PPO_SEQ_INSTANCE(TYPE, LEVEL)                                                                        \
  template cudaError_t launch_ppo_policy_seq<rlhf_ppo::TYPE, rlhf_ppo::LEVEL>(                                   \
      const float*, const float*, const float*, const float*, const int64_t*, float*, double*, int64_t, int64_t, \
      PolicyParams, cudaStream_t);
RLHF_PPO_SEQ_INSTANCE(kClipLoss, kSequenceRatio)
RLHF_PPO_SEQ_INSTANCE(kClipLoss, kSequenceTokenRatio)
RLHF_PPO_SEQ_INSTANCE(kCispoLoss, kSequenceRatio)
RLHF_PPO_SEQ_INSTANCE(kCispoLoss, kSequenceTokenRatio)
RLHF_PPO_SEQ_INSTANCE(kSapoLoss, kSequenceRatio)
RLHF_PPO_SEQ_INSTANCE(kSapoLoss, kSequenceTokenRatio)
#undef RLHF_PPO_SEQ_INSTANCE

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_PPO_LOSS_CUH_
