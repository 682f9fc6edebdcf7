// CUDA implementation of rlhf_kernels_C::gae_fwd (contract in the op table, rlhf_kernels/_registry.py).
//
// This file only validates arguments, allocates outputs and launches the torch-free kernel of gae.cuh on the
// current stream of the rewards' device. No host synchronisation, and the inputs are never copied.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/dispatch.h"
#include "cuda/gae.cuh"

namespace {

using rlhf_cuda::CudaElem;

// rewards, values: (B, T) CUDA, one supported float dtype, contiguous; mask: (B, T) bool contiguous; all on the
// rewards' device.
void check_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask) {
  constexpr const char* op = "gae_fwd";
  TORCH_CHECK(rewards.is_cuda(), op, ": rewards must be a CUDA tensor, got device ", rewards.device());
  TORCH_CHECK(values.device() == rewards.device(), op, ": values must be on the rewards' device ", rewards.device(),
              ", got ", values.device());
  TORCH_CHECK(mask.device() == rewards.device(), op, ": mask must be on the rewards' device ", rewards.device(),
              ", got ", mask.device());
  TORCH_CHECK(rewards.dim() == 2, op, ": rewards must be 2-D (B, T), got shape ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes(), op, ": values must have the shape of rewards ", rewards.sizes(),
              ", got ", values.sizes());
  TORCH_CHECK(mask.sizes() == rewards.sizes(), op, ": mask must have the shape of rewards ", rewards.sizes(),
              ", got ", mask.sizes());
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": rewards must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(values.scalar_type() == dt, op, ": values must have the dtype of rewards (", dt, "), got ",
              values.scalar_type(), " (convert both to one dtype first)");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type(),
              " (use mask.bool() or mask != 0)");
  TORCH_CHECK(rewards.is_contiguous(), op, ": rewards must be contiguous (call .contiguous())");
  TORCH_CHECK(values.is_contiguous(), op, ": values must be contiguous (call .contiguous())");
  TORCH_CHECK(mask.is_contiguous(), op, ": mask must be contiguous (call .contiguous())");
  TORCH_CHECK(rewards.size(1) <= rlhf_cuda::kGaeMaxSteps, op, ": T = ", rewards.size(1),
              " exceeds the supported maximum ", rlhf_cuda::kGaeMaxSteps);
}

// Returns fp32 (advantages (B, T), returns (B, T), row_stats (B, 3)), all contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_fwd_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                            const at::Tensor& mask, double gamma, double lam) {
  check_inputs(rewards, values, mask);
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({B, T}, opts);
  at::Tensor returns = at::empty({B, T}, opts);
  if (B == 0 || T == 0) return {advantages, returns, at::zeros({B, 3}, opts)};  // rows without masked steps
  at::Tensor row_stats = at::empty({B, 3}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rewards.device().index()).stream();
  const float gamma_f = static_cast<float>(gamma);
  const float gamma_lam = static_cast<float>(gamma * lam);  // the product rounded once
  RLHF_DISPATCH_FLOAT_TYPES(rewards.scalar_type(), "gae_fwd_cuda", [&] {
    using elem_t = typename CudaElem<scalar_t>::type;
    C10_CUDA_CHECK(rlhf_cuda::launch_gae_fwd<elem_t>(
        reinterpret_cast<const elem_t*>(rewards.const_data_ptr<scalar_t>()),
        reinterpret_cast<const elem_t*>(values.const_data_ptr<scalar_t>()),
        reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()), advantages.mutable_data_ptr<float>(),
        returns.mutable_data_ptr<float>(), row_stats.mutable_data_ptr<float>(), B, T, gamma_f, gamma_lam, stream));
  });
  return {advantages, returns, row_stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CUDA, m) { m.impl("gae_fwd", &gae_fwd_cuda); }
