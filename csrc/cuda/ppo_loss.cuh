// Fused PPO losses, per token, with their gradients and per-block partial sums: the clipped surrogate
// (ppo_policy_fwd) and the clipped value loss (ppo_value_fwd); the formulas are the op table's
// (rlhf_kernels/_registry.py).
//
// Torch-free: raw pointers and sizes in, cudaError_t out. The binding is csrc/cuda/ppo_loss.cu; the CPU twin is
// csrc/cpu/ppo_loss.cpp.
//
// Layout: four fp32 (N,) contiguous inputs (weight last); outputs fp32 grad (N,) and partials (P, 2 kPairs)
// row-major, whose column 2 k is the sum of term k and column 2 k + 1 the count k (the order of the ops' sums,
// which the binding forms from these rows).
//
// Work split: chunk c is tokens [c 2048, min(N, (c + 1) 2048)); blocks of kPpoThreads = 256 threads walk the
// chunks grid-stride, one chunk per iteration, and chunk c writes row c of partials: P = ceil(N / 2048), a function
// of N only, as on the CPU backend (N = 0 launches nothing; the binding returns zero sums). Thread t owns
// the 4-token vectors t and t + 256 of its chunk, so consecutive threads read consecutive 16 bytes of each input:
// one 16-byte streaming load per input and vector when every pointer is 16-byte aligned and the vector lies
// inside [0, N), else four bounds-checked scalar loads of the same tokens (the last, partial vector).
//
// Reduction, deterministic: a thread adds its tokens' terms in a fixed order (vector 0 then 1, token 0..3 of
// each), sums in fp64 and counts in fp32 (exact: at most 2048); a fixed shuffle tree folds the 32 lanes of each
// warp, and thread k then adds the 8 warps' values in warp order and writes pair k of the chunk's row. Which path
// loaded a token (vector or scalar) and which block ran a chunk do not change any value.
//
// Precision: every per-token quantity is fp32, with r = expf(clamp(d, -20, 20)) (CUDA's expf, at most 2 ulp; the
// extension is not compiled with fast math). The fp64 sums make a partial exact up to the per-term errors and its
// final rounding to fp32. No product here is followed by an add, so fused multiply-adds cannot change a value.
//
// Tokens with weight == 0 contribute exactly 0 to grad and to every sum and count, whatever their other inputs
// hold: their terms are dropped by selects, never multiplied by the zero weight.
//
// Limits: N < 2^63 (64-bit token offsets); the grid is capped at 2^31 - 1 blocks and grid-strides beyond.
#ifndef RLHF_CUDA_PPO_LOSS_CUH_
#define RLHF_CUDA_PPO_LOSS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace rlhf_cuda {

inline constexpr int kPpoThreads = 256;
inline constexpr int kPpoVecsPerThread = 2;                                      // 4-token vectors per thread
inline constexpr int64_t kPpoChunk = int64_t{kPpoThreads} * kPpoVecsPerThread * 4;  // tokens per partials row

// Rows of partials for n >= 1 tokens (the binding returns one zero row for n = 0).
inline int64_t ppo_num_chunks(int64_t n) { return (n + kPpoChunk - 1) / kPpoChunk; }

// Clipped surrogate: lo = 1 - clip_low, hi = 1 + clip_high, dual = dual_clip (0: off), all rounded once to fp32.
// Pairs: (sum weight * l, count of clipped), (sum (old_logprobs - logprobs), count of lower).
struct PpoPolicyLoss {
  static constexpr int kPairs = 2;
  float lo, hi, dual;

  // Adds the token's terms to sum / count (nothing when it does not count); returns its grad.
  __device__ __forceinline__ float operator()(float lp, float olp, float adv, float w, double (&sum)[kPairs],
                                              float (&count)[kPairs]) const {
    const float d = lp - olp;
    const bool saturated = d > 20.0f || d < -20.0f;  // the clamp is flat there: no gradient
    const float dc = d < -20.0f ? -20.0f : (d > 20.0f ? 20.0f : d);  // selects, not fminf / fmaxf: keep a NaN d
    const float r = expf(dc);
    const float rc = r < lo ? lo : (r > hi ? hi : r);
    const float na = -adv;
    const float l1 = na * r, l2 = na * rc;
    const bool clipped = l2 > l1;
    const float l_dual = na * dual;  // the dual-clip bound -A dual_clip
    const float l_clip = clipped ? l2 : l1;
    const bool lower = dual > 0.0f && adv < 0.0f && l_clip > l_dual;
    const float l = lower ? l_dual : l_clip;
    const bool counts = w != 0.0f;
    sum[0] += counts ? static_cast<double>(w * l) : 0.0;
    count[0] += counts && clipped ? 1.0f : 0.0f;
    sum[1] += counts ? static_cast<double>(olp - lp) : 0.0;
    count[1] += counts && lower ? 1.0f : 0.0f;
    return counts && !(clipped || lower || saturated) ? w * l1 : 0.0f;
  }
};

// Clipped value loss: clip (+inf: none). Pairs: (sum weight * l, count of clipped).
struct PpoValueLoss {
  static constexpr int kPairs = 1;
  float clip;

  __device__ __forceinline__ float operator()(float v, float old, float ret, float w, double (&sum)[kPairs],
                                              float (&count)[kPairs]) const {
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
  constexpr int kPairs = Loss::kPairs;
  constexpr int kWarps = kPpoThreads / 32;
  __shared__ double s_sum[kWarps][kPairs];
  __shared__ float s_count[kWarps][kPairs];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    double sum[kPairs];
    float count[kPairs];
#pragma unroll
    for (int k = 0; k < kPairs; ++k) {
      sum[k] = 0.0;
      count[k] = 0.0f;
    }
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
      for (int k = 0; k < kPairs; ++k) {
        sum[k] += __shfl_down_sync(0xffffffffu, sum[k], off);
        count[k] += __shfl_down_sync(0xffffffffu, count[k], off);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kPairs; ++k) {
        s_sum[warp][k] = sum[k];
        s_count[warp][k] = count[k];
      }
    }
    __syncthreads();
    if (tid < kPairs) {
      double s = 0.0;
      float cnt = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        s += s_sum[w][tid];
        cnt += s_count[w][tid];
      }
      float* row = partials + c * (2 * kPairs);
      row[2 * tid] = static_cast<float>(s);
      row[2 * tid + 1] = cnt;
    }
    __syncthreads();  // s_sum / s_count are refilled by the next chunk
  }
}

// Launcher. n == 0 launches nothing (partials is then the caller's to fill); otherwise partials must hold
// ppo_num_chunks(n) rows of 2 Loss::kPairs floats, all of which are written.
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

// Explicit instantiations for the two losses (this header is included by ppo_loss.cu only).
template cudaError_t launch_ppo_loss<PpoPolicyLoss>(const float*, const float*, const float*, const float*, float*,
                                                    float*, int64_t, PpoPolicyLoss, cudaStream_t);
template cudaError_t launch_ppo_loss<PpoValueLoss>(const float*, const float*, const float*, const float*, float*,
                                                   float*, int64_t, PpoValueLoss, cudaStream_t);

}  // namespace rlhf_cuda

#endif  // RLHF_CUDA_PPO_LOSS_CUH_
