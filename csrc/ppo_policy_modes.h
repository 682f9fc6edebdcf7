// The modes of ppo_policy_fwd (contract in rlhf_kernels/_registry.py) and its fp32 constants, shared by the CPU
// kernels (csrc/cpu/ppo_loss.cpp), the CUDA kernels (csrc/cuda/ppo_loss.cuh) and the argument checks
// (csrc/ppo_loss_checks.h). Torch-free, so that the CUDA header can include it.
#pragma once

namespace rlhf_ppo {

// loss_type codes (the Python layer names them in rlhf_kernels/_reference_ops.py::LOSS_TYPES).
enum PolicyLossType : int { kClipLoss = 0, kCispoLoss = 1, kSapoLoss = 2 };

// ratio_level codes (RATIO_LEVELS there): the log-ratio of a token is its own (token) or the mean over the counted
// tokens of its sequence (sequence: GSPO; sequence_token: GSPO-token, whose gradient keeps each token's own path).
enum PolicyRatioLevel : int { kTokenRatio = 0, kSequenceRatio = 1, kSequenceTokenRatio = 2 };

// The op's float arguments as the kernels use them, each formed in fp64 and rounded once to fp32.
struct PolicyParams {
  float lo, hi;            // ratio bounds 1 - clip_low, 1 + clip_high
  float dual;              // dual_clip (clip loss only; 0: off)
  float tau_pos, tau_neg;  // SAPO gate temperatures for A > 0 and A <= 0
  float k_pos, k_neg;      // 4 / tau_pos, 4 / tau_neg (the SAPO loss scale)
};

inline PolicyParams make_policy_params(double clip_low, double clip_high, double dual_clip, double tau_pos,
                                       double tau_neg) {
  return {static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high), static_cast<float>(dual_clip),
          static_cast<float>(tau_pos),        static_cast<float>(tau_neg),         static_cast<float>(4.0 / tau_pos),
          static_cast<float>(4.0 / tau_neg)};
}

}  // namespace rlhf_ppo
