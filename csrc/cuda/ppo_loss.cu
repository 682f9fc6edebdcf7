// CUDA implementation of rlhf_kernels_C::ppo_policy_fwd / ppo_value_fwd (contracts in the op table,
// rlhf_kernels/_registry.py).
//
// This file only validates arguments (the checks shared with the CPU backend, ppo_loss_checks.h), allocates the
// outputs, launches the torch-free kernel of ppo_loss.cuh on the current stream of the inputs' device, and adds the
// kernel's per-chunk partials (fp32, one row per 2048 tokens) into the (K,) sums in fp64 with one fixed-order
// reduction (bitwise reproducible), rounded once to fp32. No host synchronisation, and the inputs are never copied.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/ppo_loss.cuh"
#include "ppo_loss_checks.h"

namespace {

// grad (N,) and sums (2 kPairs,) of the partials (ceil(N / 2048), 2 kPairs); zeros for N = 0 (nothing to launch).
template <typename Loss>
std::tuple<at::Tensor, at::Tensor> run_loss(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& x2,
                                            const at::Tensor& weight, int64_t n, const Loss& loss) {
  constexpr int64_t kCols = 2 * Loss::kPairs;
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

std::tuple<at::Tensor, at::Tensor> ppo_policy_fwd_cuda(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                                       const at::Tensor& advantages, const at::Tensor& weight,
                                                       double clip_low, double clip_high, double dual_clip) {
  const int64_t n = rlhf_ppo::check_token_inputs("ppo_policy_fwd", c10::DeviceType::CUDA,
                                                 {"logprobs", "old_logprobs", "advantages", "weight"},
                                                 {&logprobs, &old_logprobs, &advantages, &weight});
  rlhf_ppo::check_policy_clips(clip_low, clip_high, dual_clip);
  // The ratio bounds are formed in fp64 and rounded once, as on the CPU backend.
  const rlhf_cuda::PpoPolicyLoss loss{static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high),
                                      static_cast<float>(dual_clip)};
  return run_loss(logprobs, old_logprobs, advantages, weight, n, loss);
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
