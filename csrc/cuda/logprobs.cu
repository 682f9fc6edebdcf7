// CUDA implementation of rlhf_kernels_C::logprobs_fwd / logprobs_bwd (contracts in the op table,
// rlhf_kernels/_registry.py).
//
// This file only validates arguments, allocates outputs and launches the torch-free kernels of logprobs.cuh on
// the current stream of the logits' device. No host synchronisation, and the logits are never copied.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/dispatch.h"
#include "cuda/logprobs.cuh"

namespace {

using rlhf_cuda::CudaElem;

// Checks shared by forward and backward: logits (B, T, V) on CUDA, supported dtype, unit stride along V;
// labels (B, T) int64 on the same device (any strides: the callers make them contiguous).
void check_logits_labels(const char* op, const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be 3-D (B, T, V), got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dt);
  const int64_t V = logits.size(2);
  TORCH_CHECK(V >= 1, op, ": the vocabulary dimension V = logits.size(2) must be >= 1");
  TORCH_CHECK(V <= rlhf_cuda::kLogprobsMaxVocab, op, ": V = ", V, " exceeds the supported maximum ",
              rlhf_cuda::kLogprobsMaxVocab);
  TORCH_CHECK(logits.stride(2) == 1 || V == 1, op,
              ": logits must have stride 1 along V (got strides ", logits.strides(),
              "); slicing B / T is fine, but transposed logits need .contiguous()");
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels must be on the logits' device ", logits.device(),
              ", got ", labels.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1), op,
              ": labels must have shape (B, T) = (", logits.size(0), ", ", logits.size(1), "), got ", labels.sizes());
}

// A per-row fp32 (B, T) input of the backward, returned contiguous (as on the CPU backend it may have any strides,
// e.g. expanded by autograd; the copy is O(B T) and only made when needed).
at::Tensor row_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ", logits.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1), op, ": ", name,
              " must have shape (B, T) = (", logits.size(0), ", ", logits.size(1), "), got ", t.sizes());
  return t.contiguous();
}

// Returns (logprobs, entropy, row_max, log_norm), all fp32 (B, T) contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels_in, double inv_temperature, int64_t ignore_index) {
  constexpr const char* op = "logprobs_fwd";
  check_logits_labels(op, logits, labels_in);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({B, T}, opts);
  at::Tensor entropy = at::empty({B, T}, opts);
  at::Tensor row_max = at::empty({B, T}, opts);
  at::Tensor log_norm = at::empty({B, T}, opts);
  if (B * T == 0) return {logprobs, entropy, row_max, log_norm};
  const at::Tensor labels = labels_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  RLHF_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "logprobs_fwd_cuda", [&] {
    using elem_t = typename CudaElem<scalar_t>::type;
    C10_CUDA_CHECK(rlhf_cuda::launch_logprobs_fwd<elem_t>(
        reinterpret_cast<const elem_t*>(logits.const_data_ptr<scalar_t>()), labels.const_data_ptr<int64_t>(),
        logprobs.mutable_data_ptr<float>(), entropy.mutable_data_ptr<float>(), row_max.mutable_data_ptr<float>(),
        log_norm.mutable_data_ptr<float>(), B, T, V, logits.stride(0), logits.stride(1),
        static_cast<float>(inv_temperature), ignore_index, stream));
  });
  return {logprobs, entropy, row_max, log_norm};
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& grad_logprobs_in,
                             const at::Tensor& grad_entropy_in, const at::Tensor& row_max_in,
                             const at::Tensor& log_norm_in, const at::Tensor& entropy_in, double inv_temperature,
                             int64_t ignore_index) {
  constexpr const char* op = "logprobs_bwd";
  check_logits_labels(op, logits, labels_in);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor grad_logprobs = row_input(op, "grad_logprobs", grad_logprobs_in, logits);
  const at::Tensor grad_entropy = row_input(op, "grad_entropy", grad_entropy_in, logits);
  const at::Tensor row_max = row_input(op, "row_max", row_max_in, logits);
  const at::Tensor log_norm = row_input(op, "log_norm", log_norm_in, logits);
  const at::Tensor entropy = row_input(op, "entropy", entropy_in, logits);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  at::Tensor grad_logits = at::empty({B, T, V}, logits.options());  // contiguous, logits dtype
  if (B * T == 0) return grad_logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  RLHF_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "logprobs_bwd_cuda", [&] {
    using elem_t = typename CudaElem<scalar_t>::type;
    C10_CUDA_CHECK(rlhf_cuda::launch_logprobs_bwd<elem_t>(
        reinterpret_cast<const elem_t*>(logits.const_data_ptr<scalar_t>()), labels.const_data_ptr<int64_t>(),
        grad_logprobs.const_data_ptr<float>(), grad_entropy.const_data_ptr<float>(), row_max.const_data_ptr<float>(),
        log_norm.const_data_ptr<float>(), entropy.const_data_ptr<float>(),
        reinterpret_cast<elem_t*>(grad_logits.mutable_data_ptr<scalar_t>()), B, T, V, logits.stride(0),
        logits.stride(1), static_cast<float>(inv_temperature), ignore_index, stream));
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CUDA, m) {
  m.impl("logprobs_fwd", &logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &logprobs_bwd_cuda);
}
