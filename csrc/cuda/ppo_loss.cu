// CUDA implementation of rlhf_kernels_C::ppo_policy_fwd / ppo_value_fwd (contracts in the op table,
// rlhf_kernels/_registry.py).
//
// This file only validates arguments (the checks shared with the CPU backend, ppo_loss_checks.h), allocates the
// outputs, picks the kernel of ppo_loss.cuh for the loss type and ratio level (one switch per call), launches it on
// the current stream of the inputs' device, and adds the kernel's partials (one row per 2048 tokens, or per
// sequence) into the (K,) sums in fp64 with one fixed-order reduction (bitwise reproducible), rounded once to
// fp32. No host synchronisation: the values of seq_offsets are not checked here (the kernel clamps them, see
// ppo_loss.cuh), and the inputs are never copied.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/ppo_loss.cuh"
#include "ppo_loss_checks.h"
#include "ppo_policy_modes.h"

namespace {

using rlhf_ppo::PolicyParams;

// grad (N,) and sums (kCols,) of the partials (ceil(N / 2048), kCols); zeros for N = 0 (nothing to launch).
template <typename Loss>
std::tuple<at::Tensor, at::Tensor> run_loss(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& x2,
                                            const at::Tensor& weight, int64_t n, const Loss& loss) {
  constexpr int64_t kCols = Loss::kSums + Loss::kCounts;
  const c10::cuda::CUDAGuard device_guard(x0.device());
  const auto opts = x0.options();
  at::Tensor grad = at::empty({n}, opts);
  if (n == 0) return {grad, at::zeros({kCols}, opts)};
  at::Tensor partials = at::empty({rlhf_cuda::ppo_num_chunks(n), kCols}, opts);  // every row is written
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.device().index()).stream();
  C10_CUDA_CHECK(rlhf_cuda::launch_ppo_loss(x0.const_data_ptr<float>(), x1.const_data_ptr<float>(),
                                            x2.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                                            grad.mutable_data_ptr<float>(), partials.mutable_data_ptr<float>(), n,
                                            loss, stream));
  return {grad, partials.sum(0, /*keepdim=*/false, at::kDouble).to(at::kFloat)};
}

// The sequence levels: grad (N,) and sums (5,) of the fp64 partials (S, 5), one row per sequence; zeros for S = 0.
template <int kType, int kLevel>
std::tuple<at::Tensor, at::Tensor> run_policy_seq(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv,
                                                  const at::Tensor& weight, const at::Tensor& seq_offsets, int64_t n,
                                                  const PolicyParams& c) {
  const c10::cuda::CUDAGuard device_guard(lp.device());
  const auto opts = lp.options();
  // zeros: a token outside every sequence (a malformed table, clamped by the kernel) gets grad 0, as on Triton
  at::Tensor grad = at::zeros({n}, opts);
  const int64_t n_seq = seq_offsets.size(0) - 1;
  if (n_seq <= 0) return {grad, at::zeros({rlhf_cuda::kPolicyCols}, opts)};
  at::Tensor partials = at::empty({n_seq, rlhf_cuda::kPolicyCols}, opts.dtype(at::kDouble));  // all written
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(lp.device().index()).stream();
  C10_CUDA_CHECK((rlhf_cuda::launch_ppo_policy_seq<kType, kLevel>(
      lp.const_data_ptr<float>(), olp.const_data_ptr<float>(), adv.const_data_ptr<float>(),
      weight.const_data_ptr<float>(), seq_offsets.const_data_ptr<int64_t>(), grad.mutable_data_ptr<float>(),
      partials.mutable_data_ptr<double>(), n, n_seq, c, stream)));
  return {grad, partials.sum(0, /*keepdim=*/false, at::kDouble).to(at::kFloat)};
}

template <int kType>
std::tuple<at::Tensor, at::Tensor> run_policy(const at::Tensor& lp, const at::Tensor& olp, const at::Tensor& adv,
                                              const at::Tensor& weight, const at::Tensor& seq_offsets, int64_t n,
                                              int64_t ratio_level, const PolicyParams& c) {
  switch (ratio_level) {
    case rlhf_ppo::kSequenceRatio:
      return run_policy_seq<kType, rlhf_ppo::kSequenceRatio>(lp, olp, adv, weight, seq_offsets, n, c);
    case rlhf_ppo::kSequenceTokenRatio:
      return run_policy_seq<kType, rlhf_ppo::kSequenceTokenRatio>(lp, olp, adv, weight, seq_offsets, n, c);
    default: return run_loss(lp, olp, adv, weight, n, rlhf_cuda::PpoPolicyLoss<kType>{c});
  }
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_fwd_cuda(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                                       const at::Tensor& advantages, const at::Tensor& weight,
                                                       const at::Tensor& seq_offsets, double clip_low,
                                                       double clip_high, double dual_clip, int64_t loss_type,
                                                       int64_t ratio_level, double tau_pos, double tau_neg) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_policy_fwd", c10::DeviceType::CUDA,
                                                 {"logprobs", "old_logprobs", "advantages", "weight"},
                                                 {&logprobs, &old_logprobs, &advantages, &weight});
  rlhf_ppo::check_seq_offsets(seq_offsets, logprobs, ratio_level);
  rlhf_ppo::check_policy_args(clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos, tau_neg);
  // The fp32 constants are formed in fp64 and rounded once, as on the CPU backend.
  const PolicyParams c = rlhf_ppo::make_policy_params(clip_low, clip_high, dual_clip, tau_pos, tau_neg);
  const at::Tensor &lp = logprobs, &olp = old_logprobs, &adv = advantages;
  switch (loss_type) {
    case rlhf_ppo::kCispoLoss:
      return run_policy<rlhf_ppo::kCispoLoss>(lp, olp, adv, weight, seq_offsets, n, ratio_level, c);
    case rlhf_ppo::kSapoLoss:
      return run_policy<rlhf_ppo::kSapoLoss>(lp, olp, adv, weight, seq_offsets, n, ratio_level, c);
    default: return run_policy<rlhf_ppo::kClipLoss>(lp, olp, adv, weight, seq_offsets, n, ratio_level, c);
  }
}

std::tuple<at::Tensor, at::Tensor> ppo_value_fwd_cuda(const at::Tensor& values, const at::Tensor& old_values,
                                                      const at::Tensor& returns, const at::Tensor& weight,
                                                      double clip) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_value_fwd", c10::DeviceType::CUDA,
                                                 {"values", "old_values", "returns", "weight"},
                                                 {&values, &old_values, &returns, &weight});
  rlhf_ppo::check_value_clip(clip);
  return run_loss(values, old_values, returns, weight, n, rlhf_cuda::PpoValueLoss{static_cast<float>(clip)});
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CUDA, m) {
  m.impl("ppo_policy_fwd", &ppo_policy_fwd_cuda);
  m.impl("ppo_value_fwd", &ppo_value_fwd_cuda);
}
