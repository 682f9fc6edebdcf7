// Argument checks of ppo_policy_fwd / ppo_value_fwd (contracts in rlhf_kernels/_registry.py), shared by the CPU
// binding (csrc/cpu/ppo_loss.cpp) and the CUDA one (csrc/cuda/ppo_loss.cu) so that both reject the same calls with
// the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace rlhf_ppo {

// The four per-token inputs of an op (weight last): on `device_type`, all on the first one's device, 1-D of one
// length, float32, contiguous. Returns the number of tokens N.
inline int64_t check_token_inputs(const char* op, c10::DeviceType device_type, const char* const (&names)[4],
                                  const at::Tensor* const (&inputs)[4]) {
  const at::Tensor& first = *inputs[0];
  TORCH_CHECK(first.device().type() == device_type, op, ": ", names[0], " must be a ",
              c10::DeviceTypeName(device_type), " tensor, got device ", first.device());
  for (int k = 0; k < 4; ++k) {
    const at::Tensor& t = *inputs[k];
    TORCH_CHECK(t.device() == first.device(), op, ": ", names[k], " must be on the device of ", names[0], " (",
                first.device(), "), got ", t.device());
    TORCH_CHECK(t.dim() == 1, op, ": ", names[k],
                " must be 1-D (N,) (flatten (B, T) inputs with .reshape(-1)), got shape ", t.sizes());
    TORCH_CHECK(t.size(0) == first.size(0), op, ": ", names[k], " must have the length of ", names[0], " (",
                first.size(0), "), got ", t.size(0));
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", names[k], " must be float32, got ", t.scalar_type(),
                " (convert with .float())");
    TORCH_CHECK(t.is_contiguous(), op, ": ", names[k], " must be contiguous (call .contiguous())");
  }
  return first.size(0);
}

inline void check_policy_clips(double clip_low, double clip_high, double dual_clip) {
  constexpr const char* op = "ppo_policy_fwd";
  TORCH_CHECK(std::isfinite(clip_low) && clip_low >= 0.0, op,
              ": clip_low must be finite and >= 0 (the ratio is clamped to [1 - clip_low, 1 + clip_high]), got ",
              clip_low);
  TORCH_CHECK(std::isfinite(clip_high) && clip_high >= 0.0, op, ": clip_high must be finite and >= 0, got ",
              clip_high);
  TORCH_CHECK(dual_clip == 0.0 || (std::isfinite(dual_clip) && dual_clip > 1.0), op,
              ": dual_clip must be 0 (dual clipping off) or a finite value > 1 (e.g. 3), got ", dual_clip);
}

inline void check_value_clip(double clip) {
  TORCH_CHECK(clip >= 0.0, "ppo_value_fwd: clip must be >= 0 (+inf for no clipping), got ", clip);
}

}  // namespace rlhf_ppo
