// CPU implementation of ppo_policy_fwd and ppo_value_fwd (contracts in the op table, rlhf_kernels/_registry.py):
// the PPO-family policy losses (clip, CISPO, SAPO; token or sequence log-ratios) and the clipped value loss, per
// token, fused with their gradients and with the sums of the loss and its statistics.
//
// Token work split (value loss, and the policy loss at ratio_level 0). The N tokens are cut into blocks of
// kPpoBlock = 2048 consecutive tokens; block b writes row b of an fp64 partials buffer (P = ceil(N / 2048) rows),
// and the rows are then added in block order into the (K,) sums. Blocks are spread over threads with
// at::parallel_for (one block is always summed by one thread), so every output is bitwise the same whatever the
// thread count.
//
// Sequence work split (ratio_level 1 and 2: the log-ratio of a token is the mean D_s over the counted tokens of
// its sequence s). Sequences are spread over threads, one sequence always on one thread, and sequence s writes
// row s of the partials (S rows, added in sequence order). Per sequence: pass 1 sums its counted log-ratios in
// fp64 (D_s, rounded once to fp32); pass 2 computes every token's loss, gradient and statistics at x = D_s; pass 3
// (ratio_level 1 only) adds G_s = (sum of w q over the sequence) / n_s to the gradient of its counted tokens (it
// is skipped when G_s = 0, e.g. for CISPO, whose q is 0). The passes walk the sequence by 2048-token blocks like
// the token split, so the lanes below never count past 64 per lane and every fp64 total is added block by block.
//
// Inside a block, tokens go by groups of kLanes = 32: token j of a group adds its terms to lane j of the block's
// accumulators, and the lanes are reduced in a fixed pairwise order (lanes_sum). The per-token loops have no
// branches (selects only) and a fixed trip count, so they vectorise (2 zmm / 4 ymm of tokens per group; GCC 12
// leaves the generic, SSE2 variant of the sequence passes scalar); the loss type is a template parameter, chosen
// once per call outside the loops. They are instantiated per ISA (run_rows),
// which also gives exp_f32 its FMA: on one AVX-512 core, in cache, the clip loss runs about 2x faster with AVX2
// than generic and 2x faster again with AVX-512. The selected values are formed in locals and then stored or
// added unconditionally: written as `acc += c ? x : 0`, GCC turns them into conditional memory updates, which the
// generic variant cannot vectorise and AVX2 does with masked loads and stores. A partial group at the end of a
// block is copied into a zero-padded group: the padding has weight 0, adds exactly 0, so the result is the same
// as if the tail were handled token by token.
//
// Precision. Every per-token quantity is fp32 (rho = exp_f32(clamp(x)), below 1 ulp). The lane sums, the block
// partials and their totals are fp64: a sum then carries only the per-term fp32 errors plus one final rounding to
// fp32, with no growth in the length (fp32 lanes would add up to 2048 / 32 + 5 roundings per term). The lane
// counts are fp32, exact (at most 64 per lane). Against all-fp32 lanes this costs about 10% in cache, less once
// the 16 bytes read and 4 written per token come from memory.
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
#include "ppo_policy_modes.h"
#include "row_kernel.h"

namespace rlhf_cpu {
namespace {

using rlhf_ppo::PolicyParams;

constexpr int64_t kPpoBlock = 2048;  // tokens per partials row (token split) and per block of a sequence
constexpr int kPolicyCols = 5;       // the policy sums: weighted loss, clip-low, clip-high, old - new log-prob, lower
static_assert(kPpoBlock % kLanes == 0, "a block is a whole number of lane groups");

int64_t num_blocks(int64_t n) { return (n + kPpoBlock - 1) / kPpoBlock; }

// Lane accumulators of one block: kSums fp64 sums and kCounts fp32 counts (exact: at most kPpoBlock / kLanes per
// lane). Value-initialised ({}) to zeros.
template <int kSums, int kCounts>
struct Lanes {
  double sum[kSums][kLanes];
  float count[kCounts][kLanes];
};

// Calls G::group on the tokens [i0, i1) of the four inputs (weight last) by groups of kLanes; a partial last group
// goes through a zero-padded copy (weight 0: it adds nothing), of which only the real tokens' grad is stored
// (grad may be null for a group that writes none).
template <typename G, bool kFma>
RLHF_INLINE void lane_groups(const float* const (&in)[4], float* grad, int64_t i0, int64_t i1,
                             typename G::State& st) {
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes)
    G::template group<kFma>(in[0] + i, in[1] + i, in[2] + i, in[3] + i, grad == nullptr ? nullptr : grad + i, st);
  if (i < i1) {
    float x[4][kLanes], g[kLanes];
    for (int k = 0; k < 4; ++k) {
      std::fill(x[k], x[k] + kLanes, 0.0f);
      std::copy(in[k] + i, in[k] + i1, x[k]);
    }
    G::template group<kFma>(x[0], x[1], x[2], x[3], g, st);
    if (grad != nullptr) std::copy(g, g + (i1 - i), grad + i);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Policy loss of one token: the loss l, q = dl/dlog(rho), e = dl/dlogprobs at fixed rho, and its statistics
// (formulas of the op table), from the ratio of its log-ratio x (its own d at ratio_level 0, its sequence's D_s
// otherwise; see ratio_of).
struct PolicyTerms {
  float l, q, e;
  float low, high, lower;  // 1 or 0: clip-low, clip-high, dual-clipped (floats: bool members keep the struct in
                           // memory, and the loops calling this would not vectorise)
};

// rho = exp(clamp(x, -20, 20)). The sequence kernel forms it (and rc, saturated) once per sequence: selects on
// loop-invariant values inside the token loop would keep it from vectorising.
template <bool kFma>
RLHF_INLINE float ratio_of(float x) {
  const float xc = x < -20.0f ? -20.0f : (x > 20.0f ? 20.0f : x);  // selects keep a NaN x
  return exp_f32<kFma, false>(xc);  // xc <= 20 (or NaN): no overflow check needed
}
RLHF_INLINE bool saturated_at(float x) { return (x > 20.0f) | (x < -20.0f); }  // the clamp is flat: no gradient
RLHF_INLINE float clamp_ratio(float rho, const PolicyParams& c) {
  return rho < c.lo ? c.lo : (rho > c.hi ? c.hi : rho);
}

// rho and saturated as above, rc = clamp_ratio(rho).
template <int kType, bool kFma>
RLHF_INLINE PolicyTerms policy_terms(float rho, float rc, bool saturated, float lp, float adv,
                                     const PolicyParams& c) {
  const float na = -adv;
  PolicyTerms t;
  if constexpr (kType == rlhf_ppo::kClipLoss) {
    // l2 = -A rc is l_lo below the range, l_hi above it and l1 inside. Every comparison below is between
    // products, none with a selected value: GCC turns a comparison of a select (l2 > l1, l_clip > l_dual) into a
    // select of comparisons, which it cannot vectorise. The results are those of the formulas as written.
    const float l1 = na * rho, l_lo = na * c.lo, l_hi = na * c.hi;
    const float l_dual = na * c.dual;  // the dual-clip bound -A dual_clip
    const bool below = rho < c.lo, above = rho > c.hi;
    const bool clipped = (below & (l_lo > l1)) | (above & (l_hi > l1));  // l2 > l1
    const float l_clip = clipped ? (below ? l_lo : l_hi) : l1;
    // l_clip > l_dual where A < 0: l_clip = max(l1, l2) there, and l2 > l1 only below the range
    const bool lower = (c.dual > 0.0f) & (adv < 0.0f) & ((l1 > l_dual) | (below & (l_lo > l_dual)));
    t.l = lower ? l_dual : l_clip;
    t.q = clipped | lower | saturated ? 0.0f : l1;
    t.e = 0.0f;
    t.low = clipped & (adv < 0.0f) ? 1.0f : 0.0f;
    t.high = clipped & (adv > 0.0f) ? 1.0f : 0.0f;
    t.lower = lower ? 1.0f : 0.0f;
  } else if constexpr (kType == rlhf_ppo::kCispoLoss) {
    t.e = na * rc;  // the clipped ratio weighs -A logprobs as a constant
    t.l = t.e * lp;
    t.q = 0.0f;
    t.low = rho < c.lo ? 1.0f : 0.0f;
    t.high = rho > c.hi ? 1.0f : 0.0f;
    t.lower = 0.0f;
  } else {
    static_assert(kType == rlhf_ppo::kSapoLoss, "unknown loss type");
    const bool pos = adv > 0.0f;
    const float tau = pos ? c.tau_pos : c.tau_neg, k = pos ? c.k_pos : c.k_neg;
    const float z = tau * (rho - 1.0f);
    // g = sigmoid(z) and h = 1 - g from u = exp(-|z|) in (0, 1]: no overflow, and h keeps its relative precision
    // where g rounds to 1 (1 - g would be 0 there).
    const float u = exp_f32<kFma, false>(z < 0.0f ? z : -z);
    const float s = 1.0f / (1.0f + u), us = u * s;
    const float g = z < 0.0f ? us : s, h = z < 0.0f ? s : us;
    t.l = na * g * k;
    t.q = saturated ? 0.0f : 4.0f * na * g * h * rho;
    t.e = 0.0f;
    t.low = (adv < 0.0f) & (rho < c.lo) ? 1.0f : 0.0f;
    t.high = pos & (rho > c.hi) ? 1.0f : 0.0f;
    t.lower = 0.0f;
  }
  return t;
}

// ---------------------------------------------------------------------------------------------------------
// Token split. A Loss has Params (its fp32 constants), State (Params and the block's lanes), kCols partials
// columns, group<kFma> (kLanes tokens) and reduce (the block's lanes -> its partials row).

// Policy loss at ratio_level 0 (x = d). Columns: sum weight * l, count of clip-low, count of clip-high,
// sum (old_logprobs - logprobs), count of lower.
template <int kType>
struct PolicyLoss {
  using Params = PolicyParams;
  static constexpr int kCols = kPolicyCols;
  struct State {
    Params c;
    Lanes<2, 3> acc;
  };
  template <bool kFma>
  static RLHF_INLINE void group(const float* __restrict lp, const float* __restrict olp, const float* __restrict adv,
                                const float* __restrict w, float* __restrict grad, State& st) {
    const PolicyParams c = st.c;  // a local copy: read through st, the loop would not vectorise
    for (int j = 0; j < kLanes; ++j) {
      const float d = lp[j] - olp[j], rho = ratio_of<kFma>(d);
      const PolicyTerms t = policy_terms<kType, kFma>(rho, clamp_ratio(rho, c), saturated_at(d), lp[j], adv[j], c);
      const bool counts = w[j] != 0.0f;
      const float g = counts ? w[j] * (t.q + t.e) : 0.0f;
      const float t0 = counts ? w[j] * t.l : 0.0f, t3 = counts ? olp[j] - lp[j] : 0.0f;
      const float t1 = counts ? t.low : 0.0f, t2 = counts ? t.high : 0.0f, t4 = counts ? t.lower : 0.0f;
      grad[j] = g;
      st.acc.sum[0][j] += t0;
      st.acc.count[0][j] += t1;
      st.acc.count[1][j] += t2;
      st.acc.sum[1][j] += t3;
      st.acc.count[2][j] += t4;
    }
  }
  static RLHF_INLINE void reduce(State& st, double* out) {
    out[0] = lanes_sum(st.acc.sum[0]);
    out[1] = lanes_sum(st.acc.count[0]);  // counts are exact
    out[2] = lanes_sum(st.acc.count[1]);
    out[3] = lanes_sum(st.acc.sum[1]);
    out[4] = lanes_sum(st.acc.count[2]);
  }
};

// Clipped value loss. Params: clip (+inf: none). Columns: sum weight * l, count of clipped.
struct ValueLoss {
  using Params = float;
  static constexpr int kCols = 2;
  struct State {
    Params clip;
    Lanes<1, 1> acc;
  };
  template <bool kFma>
  static RLHF_INLINE void group(const float* __restrict v, const float* __restrict old, const float* __restrict ret,
                                const float* __restrict w, float* __restrict grad, State& st) {
    const float clip = st.clip;
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
      st.acc.sum[0][j] += t0;
      st.acc.count[0][j] += t1;
    }
  }
  static RLHF_INLINE void reduce(State& st, double* out) {
    out[0] = lanes_sum(st.acc.sum[0]);
    out[1] = lanes_sum(st.acc.count[0]);
  }
};

// One token-split call: its four (N,) inputs (weight last), outputs and constants.
template <typename Loss>
struct TokenArgs {
  const float* in[4];
  float* grad;
  double* partials;  // (P, Loss::kCols)
  int64_t n;
  typename Loss::Params c;
};

// Blocks [b0, b1) of one call (the Kernel interface of run_rows, a block standing for a row).
template <typename Loss>
struct PpoKernel {
  template <bool kFma>
  static RLHF_INLINE void rows(const TokenArgs<Loss>& p, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      typename Loss::State st{p.c, {}};
      lane_groups<Loss, kFma>(p.in, p.grad, b * kPpoBlock, std::min(p.n, (b + 1) * kPpoBlock), st);
      Loss::reduce(st, p.partials + b * Loss::kCols);
    }
  }
};

// Adds the (rows, kCols) partials in row order into (kCols,) fp32 sums.
template <int kCols>
at::Tensor sum_rows(const std::vector<double>& partials, int64_t rows, const at::TensorOptions& opts) {
  at::Tensor sums = at::empty({kCols}, opts);
  double total[kCols] = {};
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < kCols; ++c) total[c] += partials[r * kCols + c];
  float* out = sums.mutable_data_ptr<float>();
  for (int c = 0; c < kCols; ++c) out[c] = static_cast<float>(total[c]);
  return sums;
}

// Allocates grad (N,) and sums (kCols,), runs the blocks in parallel, then adds their partials in block order.
// N = 0: the sums are zeros.
template <typename Loss>
std::tuple<at::Tensor, at::Tensor> run_loss(const at::Tensor (&inputs)[4], int64_t n, typename Loss::Params c) {
  constexpr int kCols = Loss::kCols;
  const auto opts = inputs[0].options();
  at::Tensor grad = at::empty({n}, opts);
  const int64_t n_blocks = num_blocks(n);
  std::vector<double> partials(static_cast<size_t>(n_blocks * kCols));  // every row is written by its block
  const TokenArgs<Loss> args{{inputs[0].const_data_ptr<float>(), inputs[1].const_data_ptr<float>(),
                              inputs[2].const_data_ptr<float>(), inputs[3].const_data_ptr<float>()},
                             grad.mutable_data_ptr<float>(), partials.data(), n, c};
  if (n > 0)
    at::parallel_for(0, n_blocks, grain_rows(kPpoBlock),
                     [&](int64_t b0, int64_t b1) { run_rows<PpoKernel<Loss>>(args, b0, b1); });
  return {grad, sum_rows<kCols>(partials, n_blocks, opts)};
}

// ---------------------------------------------------------------------------------------------------------
// Sequence split (ratio_level 1 and 2).

// Pass 1: the counted log-ratios d of kLanes tokens and their count.
struct SeqMean {
  struct State {
    double sum[kLanes];
    float count[kLanes];
  };
  template <bool kFma>
  static RLHF_INLINE void group(const float* __restrict lp, const float* __restrict olp, const float*,
                                const float* __restrict w, float*, State& st) {
    for (int j = 0; j < kLanes; ++j) {
      const bool counts = w[j] != 0.0f;
      const float d = counts ? lp[j] - olp[j] : 0.0f, one = counts ? 1.0f : 0.0f;
      st.sum[j] += static_cast<double>(d);
      st.count[j] += one;
    }
  }
};

// Pass 2: the policy loss of kLanes tokens at the sequence's x = D_s (rho formed once per sequence). grad:
// w (q + e) at ratio_level 2, w e at level 1 (G_s is added by pass 3). Columns: the five of PolicyLoss, then
// sum weight * q (level 1).
template <int kType, int kLevel>
struct SeqPolicy {
  static constexpr int kCols = kPolicyCols + 1;
  struct State {
    PolicyParams c;
    float rho, rc;  // the sequence's ratio and its clamp
    bool saturated;
    Lanes<3, 3> acc;
  };
  template <bool kFma>
  static RLHF_INLINE void group(const float* __restrict lp, const float* __restrict olp, const float* __restrict adv,
                                const float* __restrict w, float* __restrict grad, State& st) {
    // saturated as a compile-time constant: a loop-invariant bool inside the loop keeps GCC from vectorising it
    if (st.saturated)
      tokens<kFma, true>(lp, olp, adv, w, grad, st);
    else
      tokens<kFma, false>(lp, olp, adv, w, grad, st);
  }
  template <bool kFma, bool kSaturated>
  static RLHF_INLINE void tokens(const float* __restrict lp, const float* __restrict olp, const float* __restrict adv,
                                 const float* __restrict w, float* __restrict grad, State& st) {
    const PolicyParams c = st.c;  // local copies, as in PolicyLoss
    const float rho = st.rho, rc = st.rc;
    for (int j = 0; j < kLanes; ++j) {
      const PolicyTerms t = policy_terms<kType, kFma>(rho, rc, kSaturated, lp[j], adv[j], c);
      const bool counts = w[j] != 0.0f;
      const float g = counts ? w[j] * (kLevel == rlhf_ppo::kSequenceRatio ? t.e : t.q + t.e) : 0.0f;
      const float t0 = counts ? w[j] * t.l : 0.0f, t3 = counts ? olp[j] - lp[j] : 0.0f;
      const float t1 = counts ? t.low : 0.0f, t2 = counts ? t.high : 0.0f, t4 = counts ? t.lower : 0.0f;
      grad[j] = g;
      st.acc.sum[0][j] += t0;
      st.acc.count[0][j] += t1;
      st.acc.count[1][j] += t2;
      st.acc.sum[1][j] += t3;
      st.acc.count[2][j] += t4;
      if constexpr (kLevel == rlhf_ppo::kSequenceRatio) {
        const float t5 = counts ? w[j] * t.q : 0.0f;
        st.acc.sum[2][j] += t5;
      }
    }
  }
  // Adds the block's lanes to the sequence's totals (in block order).
  static RLHF_INLINE void reduce(State& st, double* total) {
    total[0] += lanes_sum(st.acc.sum[0]);
    total[1] += lanes_sum(st.acc.count[0]);
    total[2] += lanes_sum(st.acc.count[1]);
    total[3] += lanes_sum(st.acc.sum[1]);
    total[4] += lanes_sum(st.acc.count[2]);
    if constexpr (kLevel == rlhf_ppo::kSequenceRatio) total[5] += lanes_sum(st.acc.sum[2]);
  }
};

struct SeqArgs {
  const float* in[4];      // logprobs, old_logprobs, advantages, weight
  const int64_t* offsets;  // (S + 1,), checked: 0 first, N last, non-decreasing
  float* grad;
  double* partials;  // (S, kPolicyCols)
  PolicyParams c;
};

// Sequences [s0, s1) of one call (the Kernel interface of run_rows, a sequence standing for a row).
template <int kType, int kLevel>
struct PolicySeqKernel {
  using Pass2 = SeqPolicy<kType, kLevel>;
  template <bool kFma>
  static RLHF_INLINE void rows(const SeqArgs& p, int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t begin = p.offsets[s], end = p.offsets[s + 1];
      double d_sum = 0.0, n_counted = 0.0;
      for (int64_t b = begin; b < end; b += kPpoBlock) {
        SeqMean::State st{};
        lane_groups<SeqMean, kFma>(p.in, nullptr, b, std::min(end, b + kPpoBlock), st);
        d_sum += lanes_sum(st.sum);
        n_counted += lanes_sum(st.count);
      }
      // D_s, rounded once; a sequence without counted tokens has no token that reads it
      const float x = n_counted > 0.0 ? static_cast<float>(d_sum / n_counted) : 0.0f;
      const float rho = ratio_of<kFma>(x);
      double total[Pass2::kCols] = {};
      for (int64_t b = begin; b < end; b += kPpoBlock) {
        typename Pass2::State st{p.c, rho, clamp_ratio(rho, p.c), saturated_at(x), {}};
        lane_groups<Pass2, kFma>(p.in, p.grad, b, std::min(end, b + kPpoBlock), st);
        Pass2::reduce(st, total);
      }
      if constexpr (kLevel == rlhf_ppo::kSequenceRatio) {
        // every counted token moves the sequence's ratio by 1 / n_s: G_s = (sum of w q) / n_s, rounded once
        const float gs = n_counted > 0.0 ? static_cast<float>(total[5] / n_counted) : 0.0f;
        if (gs != 0.0f) {
          const float* __restrict w = p.in[3];
          float* __restrict grad = p.grad;
          for (int64_t i = begin; i < end; ++i) grad[i] += w[i] != 0.0f ? gs : 0.0f;
        }
      }
      std::copy(total, total + kPolicyCols, p.partials + s * kPolicyCols);
    }
  }
};

template <int kType, int kLevel>
std::tuple<at::Tensor, at::Tensor> run_policy_seq(const at::Tensor (&inputs)[4], const at::Tensor& seq_offsets,
                                                  int64_t n, const PolicyParams& c) {
  const auto opts = inputs[0].options();
  at::Tensor grad = at::empty({n}, opts);  // the sequences cover [0, N): every token is written
  const int64_t n_seq = seq_offsets.size(0) - 1;
  std::vector<double> partials(static_cast<size_t>(n_seq * kPolicyCols));  // every row is written by its sequence
  const SeqArgs args{{inputs[0].const_data_ptr<float>(), inputs[1].const_data_ptr<float>(),
                      inputs[2].const_data_ptr<float>(), inputs[3].const_data_ptr<float>()},
                     seq_offsets.const_data_ptr<int64_t>(), grad.mutable_data_ptr<float>(), partials.data(), c};
  if (n_seq > 0)  // sequences per task by their mean length
    at::parallel_for(0, n_seq, grain_rows(n / n_seq), [&](int64_t s0, int64_t s1) {
      run_rows<PolicySeqKernel<kType, kLevel>>(args, s0, s1);
    });
  return {grad, sum_rows<kPolicyCols>(partials, n_seq, opts)};
}

template <int kType>
std::tuple<at::Tensor, at::Tensor> run_policy(const at::Tensor (&inputs)[4], const at::Tensor& seq_offsets,
                                              int64_t n, int64_t ratio_level, const PolicyParams& c) {
  switch (ratio_level) {
    case rlhf_ppo::kSequenceRatio: return run_policy_seq<kType, rlhf_ppo::kSequenceRatio>(inputs, seq_offsets, n, c);
    case rlhf_ppo::kSequenceTokenRatio:
      return run_policy_seq<kType, rlhf_ppo::kSequenceTokenRatio>(inputs, seq_offsets, n, c);
    default: return run_loss<PolicyLoss<kType>>(inputs, n, c);
  }
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_fwd_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                                      const at::Tensor& advantages, const at::Tensor& weight,
                                                      const at::Tensor& seq_offsets, double clip_low,
                                                      double clip_high, double dual_clip, int64_t loss_type,
                                                      int64_t ratio_level, double tau_pos, double tau_neg) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_policy_fwd", c10::DeviceType::CPU,
                                                 {"logprobs", "old_logprobs", "advantages", "weight"},
                                                 {&logprobs, &old_logprobs, &advantages, &weight});
  rlhf_ppo::check_seq_offsets(seq_offsets, logprobs, ratio_level);
  rlhf_ppo::check_policy_args(clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos, tau_neg);
  if (ratio_level != rlhf_ppo::kTokenRatio)
    rlhf_ppo::check_seq_offset_values(seq_offsets.const_data_ptr<int64_t>(), seq_offsets.size(0), n);
  const PolicyParams c = rlhf_ppo::make_policy_params(clip_low, clip_high, dual_clip, tau_pos, tau_neg);
  const at::Tensor inputs[4] = {logprobs, old_logprobs, advantages, weight};
  switch (loss_type) {
    case rlhf_ppo::kCispoLoss: return run_policy<rlhf_ppo::kCispoLoss>(inputs, seq_offsets, n, ratio_level, c);
    case rlhf_ppo::kSapoLoss: return run_policy<rlhf_ppo::kSapoLoss>(inputs, seq_offsets, n, ratio_level, c);
    default: return run_policy<rlhf_ppo::kClipLoss>(inputs, seq_offsets, n, ratio_level, c);
  }
}

std::tuple<at::Tensor, at::Tensor> ppo_value_fwd_cpu(const at::Tensor& values, const at::Tensor& old_values,
                                                     const at::Tensor& returns, const at::Tensor& weight,
                                                     double clip) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_value_fwd", c10::DeviceType::CPU,
                                                 {"values", "old_values", "returns", "weight"},
                                                 {&values, &old_values, &returns, &weight});
  rlhf_ppo::check_value_clip(clip);
  return run_loss<ValueLoss>({values, old_values, returns, weight}, n, static_cast<float>(clip));
}

}  // namespace
}  // namespace rlhf_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CPU, m) {
  m.impl("ppo_policy_fwd", &rlhf_cpu::ppo_policy_fwd_cpu);
  m.impl("ppo_value_fwd", &rlhf_cpu::ppo_value_fwd_cpu);
}
