// Argument checks of ppo_policy_fwd / ppo_value_fwd (contracts in rlhf_kernels/_registry.py), shared by the CPU
// binding (csrc/cpu/ppo_loss.cpp) and the CUDA one (csrc/cuda/ppo_loss.cu) so that both reject the same calls with
// the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "ppo_policy_modes.h"

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

// The scalar arguments of ppo_policy_fwd: clip range, dual clip, loss type, ratio level, SAPO temperatures.
inline void check_policy_args(double clip_low, double clip_high, double dual_clip, int64_t loss_type,
                              int64_t ratio_level, double tau_pos, double tau_neg) {
  constexpr const char* op = "ppo_policy_fwd";
  TORCH_CHECK(std::isfinite(clip_low) && clip_low >= 0.0, op,
              ": clip_low must be finite and >= 0 (the ratio is clamped to [1 - clip_low, 1 + clip_high]), got ",
              clip_low);
  TORCH_CHECK(std::isfinite(clip_high) && clip_high >= 0.0, op, ": clip_high must be finite and >= 0, got ",
              clip_high);
  TORCH_CHECK(dual_clip == 0.0 || (std::isfinite(dual_clip) && dual_clip > 1.0), op,
              ": dual_clip must be 0 (dual clipping off) or a finite value > 1 (e.g. 3), got ", dual_clip);
  TORCH_CHECK(loss_type == kClipLoss || loss_type == kCispoLoss || loss_type == kSapoLoss, op,
              ": loss_type must be 0 (clip), 1 (cispo) or 2 (sapo), got ", loss_type);
  TORCH_CHECK(ratio_level == kTokenRatio || ratio_level == kSequenceRatio || ratio_level == kSequenceTokenRatio, op,
              ": ratio_level must be 0 (token), 1 (sequence) or 2 (sequence_token), got ", ratio_level);
  TORCH_CHECK(dual_clip == 0.0 || loss_type == kClipLoss, op,
              ": dual_clip applies only to loss_type 0 (clip); pass dual_clip = 0 with loss_type ", loss_type,
              " (", loss_type == kCispoLoss ? "cispo" : "sapo", "), got dual_clip ", dual_clip);
  TORCH_CHECK(std::isfinite(tau_pos) && tau_pos > 0.0, op,
              ": tau_pos must be finite and > 0 (the SAPO gate temperature for A > 0), got ", tau_pos);
  TORCH_CHECK(std::isfinite(tau_neg) && tau_neg > 0.0, op,
              ": tau_neg must be finite and > 0 (the SAPO gate temperature for A <= 0), got ", tau_neg);
}

// seq_offsets of ppo_policy_fwd, on both backends: int64, 1-D, contiguous, on the device of logprobs; at least one
// entry when ratio_level != 0 (it is then read). Its values are checked by check_seq_offset_values (CPU only: on
// CUDA that would synchronise the host with the device).
inline void check_seq_offsets(const at::Tensor& seq_offsets, const at::Tensor& logprobs, int64_t ratio_level) {
  constexpr const char* op = "ppo_policy_fwd";
  TORCH_CHECK(seq_offsets.device() == logprobs.device(), op, ": seq_offsets must be on the device of logprobs (",
              logprobs.device(), "), got ", seq_offsets.device());
  TORCH_CHECK(seq_offsets.scalar_type() == at::kLong, op, ": seq_offsets must be int64, got ",
              seq_offsets.scalar_type(), " (convert with .long())");
  TORCH_CHECK(seq_offsets.dim() == 1, op,
              ": seq_offsets must be 1-D (S + 1,): the first token of each of the S sequences, then N; got shape ",
              seq_offsets.sizes());
  TORCH_CHECK(seq_offsets.is_contiguous(), op, ": seq_offsets must be contiguous (call .contiguous())");
  TORCH_CHECK(ratio_level == kTokenRatio || seq_offsets.size(0) >= 1, op,
              ": seq_offsets must have at least one entry when ratio_level != 0 (S + 1 entries for S sequences: "
              "[0, N] for one sequence of all N tokens, [0] when N = 0), got an empty tensor");
}

// The values of the (count,) offsets table: 0 first, n last, non-decreasing.
inline void check_seq_offset_values(const int64_t* offsets, int64_t count, int64_t n) {
  constexpr const char* op = "ppo_policy_fwd";
  TORCH_CHECK(offsets[0] == 0, op, ": seq_offsets[0] must be 0 (the first sequence starts at token 0), got ",
              offsets[0]);
  TORCH_CHECK(offsets[count - 1] == n, op, ": seq_offsets[-1] must be N = ", n,
              " (the number of tokens: the last sequence ends there), got ", offsets[count - 1]);
  for (int64_t s = 1; s < count; ++s)
    TORCH_CHECK(offsets[s] >= offsets[s - 1], op, ": seq_offsets must be non-decreasing, got seq_offsets[", s,
                "] = ", offsets[s], " < seq_offsets[", s - 1, "] = ", offsets[s - 1]);
}

inline void check_value_clip(double clip) {
  TORCH_CHECK(clip >= 0.0, "ppo_value_fwd: clip must be >= 0 (+inf for no clipping), got ", clip);
}

}  // namespace rlhf_ppo
