// CUDA implementation of rlhf_kernels_C::kl_fwd / kl_bwd (contracts in the op table, rlhf_kernels/_registry.py).
//
// This file only validates arguments, allocates outputs and launches the torch-free kernels of kl.cuh on the
// current stream of the logits' device. No host synchronisation, and the logits are never copied (the small
// per-row inputs of the backward are made contiguous if they are not).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/dispatch.h"
#include "cuda/kl_bwd.cuh"  // includes kl.cuh

namespace {

using rlhf_cuda::CudaElem;

// One logits-like argument: CUDA, (B, T, V) with V >= 1, supported dtype, unit stride along V.
void check_logits_arg(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (B, T, V), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(t.size(2) >= 1, op, ": the vocabulary dimension V = ", name, ".size(2) must be >= 1, got shape ",
              t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, op, ": ", name, " must have stride 1 along V (got strides ",
              t.strides(), "); slicing B / T is fine, but transposed logits need .contiguous()");
}

// Checks shared by forward and backward. Returns the number of rows N = B * T.
int64_t check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& ref_logits,
                     const std::optional<at::Tensor>& mask) {
  check_logits_arg(op, "logits", logits);
  check_logits_arg(op, "ref_logits", ref_logits);
  TORCH_CHECK(ref_logits.device() == logits.device(), op, ": ref_logits must be on the logits' device ",
              logits.device(), ", got ", ref_logits.device());
  const int64_t V = logits.size(2);
  TORCH_CHECK(ref_logits.size(2) == V, op, ": logits and ref_logits must have the same vocabulary size V, got ",
              logits.sizes(), " and ", ref_logits.sizes());
  TORCH_CHECK(V <= rlhf_cuda::kKlMaxVocab, op, ": V = ", V, " exceeds the supported maximum ",
              rlhf_cuda::kKlMaxVocab);
  const int64_t N = logits.size(0) * logits.size(1);
  const int64_t n_ref = ref_logits.size(0) * ref_logits.size(1);
  TORCH_CHECK(n_ref == N, op, ": logits and ref_logits must have the same number of rows B * T, got ", N,
              " (logits ", logits.sizes(), ") and ", n_ref, " (ref_logits ", ref_logits.sizes(), ")");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == logits.device(), op, ": mask must be on the logits' device ", logits.device(),
                ", got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type(),
                " (use mask.bool())");
    TORCH_CHECK(m.dim() == 1 && m.size(0) == N, op, ": mask must have shape (B * T,) = (", N, ",), got ",
                m.sizes(), " (flatten it with mask.reshape(-1))");
    TORCH_CHECK(m.is_contiguous(), op, ": mask must be contiguous (call .contiguous())");
  }
  return N;
}

// A per-row fp32 (N,) input of the backward, made contiguous.
at::Tensor row_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits, int64_t N) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ", logits.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape (B * T,) = (", N, ",), got ",
              t.sizes());
  return t.contiguous();
}

// Row source of the kernels: data, T of this tensor's (B, T) split, strides of B and T (in elements).
template <typename E>
rlhf_cuda::KlInput<E> kl_input(const at::Tensor& t) {
  return {static_cast<const E*>(t.const_data_ptr()), t.size(1), t.stride(0), t.stride(1)};
}

const uint8_t* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? reinterpret_cast<const uint8_t*>(mask->const_data_ptr<bool>()) : nullptr;
}

// Returns (kl, row_max, log_norm, ref_row_max, ref_log_norm), all fp32 (N,) contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& ref_logits, const std::optional<at::Tensor>& mask,
    double inv_temperature, bool reverse) {
  constexpr const char* op = "kl_fwd";
  const int64_t N = check_inputs(op, logits, ref_logits, mask);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, opts);
  at::Tensor row_max = at::empty({N}, opts);
  at::Tensor log_norm = at::empty({N}, opts);
  at::Tensor ref_row_max = at::empty({N}, opts);
  at::Tensor ref_log_norm = at::empty({N}, opts);
  if (N == 0) return {kl, row_max, log_norm, ref_row_max, ref_log_norm};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  RLHF_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "kl_fwd_cuda", [&] {
    using logits_t = typename CudaElem<scalar_t>::type;
    RLHF_DISPATCH_FLOAT_TYPES(ref_logits.scalar_type(), "kl_fwd_cuda", [&] {
      using ref_t = typename CudaElem<scalar_t>::type;
      const cudaError_t err = rlhf_cuda::launch_kl_fwd<logits_t, ref_t>(
          kl_input<logits_t>(logits), kl_input<ref_t>(ref_logits), mask_ptr(mask), kl.mutable_data_ptr<float>(),
          row_max.mutable_data_ptr<float>(), log_norm.mutable_data_ptr<float>(),
          ref_row_max.mutable_data_ptr<float>(), ref_log_norm.mutable_data_ptr<float>(), N, logits.size(2),
          static_cast<float>(inv_temperature), reverse, stream);
      C10_CUDA_CHECK(err);
    });
  });
  return {kl, row_max, log_norm, ref_row_max, ref_log_norm};
}

// Returns grad_logits: (B, T, V) contiguous, logits dtype.
at::Tensor kl_bwd_cuda(const at::Tensor& logits, const at::Tensor& ref_logits, const std::optional<at::Tensor>& mask,
                       const at::Tensor& grad_kl, const at::Tensor& row_max, const at::Tensor& log_norm,
                       const at::Tensor& ref_row_max, const at::Tensor& ref_log_norm, const at::Tensor& kl,
                       double inv_temperature, bool reverse) {
  constexpr const char* op = "kl_bwd";
  const int64_t N = check_inputs(op, logits, ref_logits, mask);
  const at::Tensor g = row_input(op, "grad_kl", grad_kl, logits, N);  // often expanded (stride 0) by autograd
  const at::Tensor m_p = row_input(op, "row_max", row_max, logits, N);
  const at::Tensor ln_p = row_input(op, "log_norm", log_norm, logits, N);
  const at::Tensor m_q = row_input(op, "ref_row_max", ref_row_max, logits, N);
  const at::Tensor ln_q = row_input(op, "ref_log_norm", ref_log_norm, logits, N);
  const at::Tensor k = row_input(op, "kl", kl, logits, N);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t V = logits.size(2);
  at::Tensor grad_logits = at::empty({logits.size(0), logits.size(1), V}, logits.options());  // contiguous
  if (N == 0) return grad_logits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  RLHF_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "kl_bwd_cuda", [&] {
    using logits_t = typename CudaElem<scalar_t>::type;
    logits_t* out = reinterpret_cast<logits_t*>(grad_logits.mutable_data_ptr<scalar_t>());
    RLHF_DISPATCH_FLOAT_TYPES(ref_logits.scalar_type(), "kl_bwd_cuda", [&] {
      using ref_t = typename CudaElem<scalar_t>::type;
      const cudaError_t err = rlhf_cuda::launch_kl_bwd<logits_t, ref_t>(
          kl_input<logits_t>(logits), kl_input<ref_t>(ref_logits), mask_ptr(mask), g.const_data_ptr<float>(),
          m_p.const_data_ptr<float>(), ln_p.const_data_ptr<float>(), m_q.const_data_ptr<float>(),
          ln_q.const_data_ptr<float>(), k.const_data_ptr<float>(), out, N, V, static_cast<float>(inv_temperature),
          reverse, stream);
      C10_CUDA_CHECK(err);
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels_C, CUDA, m) {
  m.impl("kl_fwd", &kl_fwd_cuda);
  m.impl("kl_bwd", &kl_bwd_cuda);
}
