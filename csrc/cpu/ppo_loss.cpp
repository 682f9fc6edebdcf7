// CPU implementation of ppo_policy_fwd and ppo_value_fwd (contracts in the op table, rlhf_kernels/_registry.py):
// the PPO clipped surrogate and the clipped value loss, per token, fused with their gradients and with the sums of
// the loss and its statistics.
//
// Work split. The N tokens are cut into blocks of kPpoBlock = 2048 consecutive tokens; block b writes row b of an
// fp64 partials buffer (P = ceil(N / 2048) rows), and the rows are then added in block order into the (K,) sums.
// Blocks are spread over threads with at::parallel_for (one block is always summed by one thread), so every output
// is bitwise the same whatever the thread count.
//
// Inside a block, tokens go by groups of kLanes = 32: token j of a group adds its terms to lane j of the block's
// accumulators, and the lanes are reduced in a fixed pairwise order (lanes_sum). The per-token loop has no
// branches (selects only) and a fixed trip count, so it vectorises (2 zmm / 4 ymm of tokens per group). It is
// instantiated per ISA (run_rows), which also gives exp_f32 its FMA: on one AVX-512 core, in cache, the policy
// loss runs about 2x faster with AVX2 than generic and 2x faster again with AVX-512. The selected values are
// formed in locals and then stored or added unconditionally: written as `acc += c ? x : 0`, GCC turns them into
// conditional memory updates, which the generic variant cannot vectorise and AVX2 does with masked loads and
// stores. A partial group at the end of the last block is copied into a zero-padded group: the padding has
// weight 0, adds exactly 0, so the result is the same as if the tail were handled token by token.
//
// Precision. Every per-token quantity is fp32 (r = exp_f32(clamp(d)), below 1 ulp). The lane sums (loss, and the
// log-ratio sum), the block partials and their total are fp64: a sum then carries only the per-term fp32 errors
// plus one final rounding to fp32, with no growth in the length (fp32 lanes would add up to 2048 / 32 + 5
// roundings per term). The lane counts are fp32, exact (at most 64 per lane). Against all-fp32 lanes this costs
// about 10% in cache, less once the 16 bytes read and 4 written per token come from memory.
//
// Tokens that do not count (weight == 0) contribute exactly 0 to grad and to every partial, whatever their other
// inputs hold (NaN, inf): their terms are discarded by selects, never multiplied by the zero weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include "ppo_loss_checks.h"
#include "row_kernel.h"

namespace rlhf_cpu {
namespace {

constexpr int64_t kPpoBlock = 2048;  // tokens per partials row
static_assert(kPpoBlock % kLanes == 0, "a block is a whole number of lane groups");

int64_t num_blocks(int64_t n) { return (n + kPpoBlock - 1) / kPpoBlock; }

// One op call: its four (N,) inputs (weight last), outputs, and fp32 constants (their meaning is the loss's).
struct TokenArgs {
  const float* in[4];
  float* grad;
  double* partials;  // (P, 2 * Loss::kPairs)
  int64_t n;
  float c0, c1, c2;
};

// Lane accumulators of one block for kPairs (sum, count) pairs: partials columns 2 k and 2 k + 1 are sum[k] and
// count[k] reduced over the lanes. Sums are fp64; counts are fp32, exact (at most kPpoBlock / kLanes per lane).
template <int kPairs>
struct Lanes {
  double sum[kPairs][kLanes];
  float count[kPairs][kLanes];
};

// Clipped surrogate. c0 = 1 - clip_low, c1 = 1 + clip_high, c2 = dual_clip (0: off).
// Columns: sum weight * l, count of clipped, sum (old_logprobs - logprobs), count of lower.
struct PolicyLoss {
  static constexpr int kPairs = 2;
  template <bool kFma>
  static RLHF_INLINE void group(const float* __restrict lp, const float* __restrict olp, const float* __restrict adv,
                                const float* __restrict w, float* __restrict grad, const TokenArgs& p,
                                Lanes<kPairs>& acc) {
    const float lo = p.c0, hi = p.c1, dual = p.c2;
    for (int j = 0; j < kLanes; ++j) {
      const float d = lp[j] - olp[j];
      const bool saturated = (d > 20.0f) | (d < -20.0f);  // the clamp below is flat there: no gradient
      const float dc = d < -20.0f ? -20.0f : (d > 20.0f ? 20.0f : d);  // selects keep a NaN d
      const float r = exp_f32<kFma, false>(dc);  // dc <= 20 (or NaN): no overflow check needed
      const float rc = r < lo ? lo : (r > hi ? hi : r);
      const float na = -adv[j];
      const float l1 = na * r, l2 = na * rc;
      const bool clipped = l2 > l1;
      const float l_dual = na * dual;  // the dual-clip bound -A dual_clip
      const float l_clip = clipped ? l2 : l1;
      const bool lower = (dual > 0.0f) & (adv[j] < 0.0f) & (l_clip > l_dual);
      const float l = lower ? l_dual : l_clip;
      const bool counts = w[j] != 0.0f;
      const bool flows = counts & !(clipped | lower | saturated);
      const float g = flows ? w[j] * l1 : 0.0f;
      const float t0 = counts ? w[j] * l : 0.0f, t2 = counts ? olp[j] - lp[j] : 0.0f;
      const float t1 = counts & clipped ? 1.0f : 0.0f, t3 = counts & lower ? 1.0f : 0.0f;
      grad[j] = g;
      acc.sum[0][j] += t0;
      acc.count[0][j] += t1;
      acc.sum[1][j] += t2;
      acc.count[1][j] += t3;
    }
  }
};

// Clipped value loss. c0 = clip (+inf: none). Columns: sum weight * l, count of clipped.
struct ValueLoss {
  static constexpr int kPairs = 1;
  template <bool kFma>
  static RLHF_INLINE void group(const float* __restrict v, const float* __restrict old, const float* __restrict ret,
                                const float* __restrict w, float* __restrict grad, const TokenArgs& p,
                                Lanes<kPairs>& acc) {
    const float clip = p.c0;
    for (int j = 0; j < kLanes; ++j) {
      const float a = v[j] - ret[j];
      const float vlo = old[j] - clip, vhi = old[j] + clip;
      const float vc_low = v[j] < vlo ? vlo : v[j];
      const float vc = vc_low > vhi ? vhi : vc_low;
      const float b = vc - ret[j];
      const float a2 = a * a, b2 = b * b;
      const bool clipped = b2 > a2;
      const float l = 0.5f * (clipped ? b2 : a2);
      const bool counts = w[j] != 0.0f;
      const float g = counts & !clipped ? w[j] * a : 0.0f;
      const float t0 = counts ? w[j] * l : 0.0f, t1 = counts & clipped ? 1.0f : 0.0f;
      grad[j] = g;
      acc.sum[0][j] += t0;
      acc.count[0][j] += t1;
    }
  }
};

// Blocks [b0, b1) of one op call (the Kernel interface of run_rows, a block standing for a row).
template <typename Loss>
struct PpoKernel {
  template <bool kFma>
  static RLHF_INLINE void rows(const TokenArgs& p, int64_t b0, int64_t b1) {
    constexpr int kPairs = Loss::kPairs;
    for (int64_t b = b0; b < b1; ++b) {
      Lanes<kPairs> acc;
      for (int k = 0; k < kPairs; ++k)
        for (int j = 0; j < kLanes; ++j) {
          acc.sum[k][j] = 0.0;
          acc.count[k][j] = 0.0f;
        }
      const int64_t end = std::min(p.n, (b + 1) * kPpoBlock);
      int64_t i = b * kPpoBlock;
      for (; i + kLanes <= end; i += kLanes)
        Loss::template group<kFma>(p.in[0] + i, p.in[1] + i, p.in[2] + i, p.in[3] + i, p.grad + i, p, acc);
      if (i < end) {
        float x[4][kLanes], g[kLanes];
        for (int k = 0; k < 4; ++k) {
          std::fill(x[k], x[k] + kLanes, 0.0f);  // weight 0: the padding does not count
          std::copy(p.in[k] + i, p.in[k] + end, x[k]);
        }
        Loss::template group<kFma>(x[0], x[1], x[2], x[3], g, p, acc);
        std::copy(g, g + (end - i), p.grad + i);
      }
      double* out = p.partials + b * 2 * kPairs;
      for (int k = 0; k < kPairs; ++k) {
        out[2 * k] = lanes_sum(acc.sum[k]);
        out[2 * k + 1] = lanes_sum(acc.count[k]);  // exact
      }
    }
  }
};

// Allocates grad (N,) and sums (2 kPairs,), runs the blocks in parallel, then adds their partials in block order.
// N = 0: the sums are zeros.
template <typename Loss>
std::tuple<at::Tensor, at::Tensor> run_loss(const at::Tensor (&inputs)[4], int64_t n, float c0, float c1,
                                            float c2) {
  constexpr int kCols = 2 * Loss::kPairs;
  const auto opts = inputs[0].options();
  at::Tensor grad = at::empty({n}, opts);
  at::Tensor sums = at::empty({kCols}, opts);
  const int64_t n_blocks = num_blocks(n);
  std::vector<double> partials(static_cast<size_t>(n_blocks * kCols));  // every row is written by its block
  const TokenArgs args{{inputs[0].const_data_ptr<float>(), inputs[1].const_data_ptr<float>(),
                        inputs[2].const_data_ptr<float>(), inputs[3].const_data_ptr<float>()},
                       grad.mutable_data_ptr<float>(), partials.data(), n, c0, c1, c2};
  if (n > 0)
    at::parallel_for(0, n_blocks, grain_rows(kPpoBlock),
                     [&](int64_t b0, int64_t b1) { run_rows<PpoKernel<Loss>>(args, b0, b1); });
  double total[kCols] = {};
  for (int64_t b = 0; b < n_blocks; ++b)
    for (int c = 0; c < kCols; ++c) total[c] += partials[b * kCols + c];
  float* out = sums.mutable_data_ptr<float>();
  for (int c = 0; c < kCols; ++c) out[c] = static_cast<float>(total[c]);
  return {grad, sums};
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                                      const at::Tensor& advantages, const at::Tensor& weight,
                                                      double clip_low, double clip_high, double dual_clip) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_policy_fwd", c10::DeviceType::CPU,
                                                 {"logprobs", "old_logprobs", "advantages", "weight"},
                                                 {&logprobs, &old_logprobs, &advantages, &weight});
  rlhf_ppo::check_policy_clips(clip_low, clip_high, dual_clip);
  // The ratio bounds are formed in fp64 and rounded once.
  return run_loss<PolicyLoss>({logprobs, old_logprobs, advantages, weight}, n, static_cast<float>(1.0 - clip_low),
                              static_cast<float>(1.0 + clip_high), static_cast<float>(dual_clip));
}

std::tuple<at::Tensor, at::Tensor> ppo_value_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                     const at::Tensor& returns, const at::Tensor& weight,
                                                     double clip) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_value_fwd", c10::DeviceType::CPU,
                                                 {"values", "old_values", "returns", "weight"},
                                                 {&values, &old_values, &returns, &weight});
  rlhf_ppo::check_value_clip(clip);
  return run_loss<ValueLoss>({values, old_values, returns, weight}, n, static_cast<float>(clip), 0.0f, 0.0f);
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) {
  m.impl("ppo_policy_fwd", &rlhf_cpu::ppo_policy_fwd_cpu);
  m.impl("ppo_value_fwd", &rlhf_cpu::ppo_value_fwd_cpu);
}
