"""The pieces of group-sampling RL (GRPO and its successors) that are plain functions of a rollout batch: outcome
advantages by estimator, DAPO's overlong shaping, the groups dynamic sampling drops, and the importance weights
that correct for the sampler's log-probs differing from the trainer's.

Shapes: ``B`` sequences (``prompts x G`` samples, the G samples of a prompt sharing a group id), ``T`` response
tokens. Every option list is defined here, next to its code; the config, ``--help`` and the README read it.
"""

from __future__ import annotations

import torch

import rlhf_kernels

# advantage estimators: (name, paper)
ADVANTAGE_ESTIMATORS = {
    "grpo": "GRPO, https://arxiv.org/abs/2402.03300: reward minus its group's mean, scaled by scale_rewards",
    "dr_grpo": "Dr. GRPO, https://arxiv.org/abs/2503.20783: reward minus its group's mean, never divided by a std",
    "rloo": "RLOO, https://arxiv.org/abs/2402.14740: reward minus the mean of the other samples of its group",
    "reinforce_pp": "REINFORCE++, https://arxiv.org/abs/2501.03262: reward whitened over the whole batch",
}
SCALE_REWARDS = ("group", "batch", "none")  # the std that divides GRPO's centred rewards
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "grpo", scale_rewards: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:  # fmt: skip
    """Per-sequence advantages ``(B,)`` fp32 from the rewards ``(B,)`` and group ids ``(B,)``.

    ``scale_rewards`` applies to ``"grpo"`` only: ``"group"`` divides by the group's std (+ eps), ``"batch"`` by
    the std of all the batch's rewards (+ eps), ``"none"`` by nothing. ``"reinforce_pp"``: (r - batch mean) /
    (batch std + eps). A group of one sample gets advantage 0 under the group estimators.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    r = rewards.float()
    if estimator == "reinforce_pp":
        return (r - r.mean()) / (r.std(unbiased=False) + eps) if r.numel() > 1 else torch.zeros_like(r)
    if estimator == "rloo":
        return rlhf_kernels.group_advantages(r, group_ids, mode="rloo")
    by_group_std = estimator == "grpo" and scale_rewards == "group"
    a = rlhf_kernels.group_advantages(r, group_ids, mode="grpo", scale_by_std=by_group_std, eps=eps)
    if estimator == "grpo" and scale_rewards == "batch" and r.numel() > 1:
        a = a / (r.std() + eps)
    return a


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the samples whose group's rewards are all equal (no learning signal: every group advantage is
    0); dynamic sampling drops these groups."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    r = rewards.double()
    lo = torch.full((n,), float("inf"), dtype=r.dtype).scatter_reduce(0, inv, r, "amin")
    hi = torch.full((n,), float("-inf"), dtype=r.dtype).scatter_reduce(0, inv, r, "amax")
    return (lo == hi)[inv]


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (https://arxiv.org/abs/2503.14476), ``(B,)`` fp32 added to the rewards: 0
    up to ``max_length - buffer`` tokens, then falling linearly to ``-penalty`` at ``max_length`` (and beyond)."""
    if buffer < 1 or buffer > max_length:
        raise ValueError(f"overlong_buffer must lie in [1, max_completion_length={max_length}], got {buffer}")
    start = max_length - buffer
    excess = (lengths.float() - start).clamp(0.0, float(buffer))
    return -penalty * excess / buffer


def rollout_correction(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str, cap: float = 2.0
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Importance weights ``(B, T)`` between the trainer's log-probs at sampling time (``old_logprobs``) and the
    sampler's own (``sampler_logprobs``), for ``is_weights`` of the policy loss, and the mismatch statistics.

    With rho = exp(old - sampler) per token (``token_*``) or exp(sum over the sequence's tokens) (``sequence_*``):
    ``*_truncate`` weights min(rho, cap); ``*_mask`` weights 1 inside [1 / cap, cap] and 0 outside. ``"none"``:
    no weights (None). Statistics: ``rollout/logprob_diff_max`` and ``rollout/logprob_diff_mean`` (|old -
    sampler| over the mask), and with weights ``rollout/is_weight_mean`` and ``rollout/is_capped_frac`` (tokens
    whose weight was truncated or masked).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout_correction {mode!r}; valid: {', '.join(ROLLOUT_CORRECTIONS)}")
    if not cap > 1.0:
        raise ValueError(f"rollout_correction_cap must be > 1, got {cap}")
    m = mask.bool()
    diff = torch.where(m, old_logprobs.float() - sampler_logprobs.float(), 0.0)
    count = max(int(m.sum()), 1)
    stats = {
        "rollout/logprob_diff_max": float(diff.abs().max()) if diff.numel() else 0.0,
        "rollout/logprob_diff_mean": float(diff.abs().sum()) / count,
    }
    if mode == "none":
        return None, stats
    log_rho = diff if mode.startswith("token") else diff.sum(-1, keepdim=True).expand_as(diff)
    rho = log_rho.clamp(max=80.0).exp()
    if mode.endswith("truncate"):
        w, changed = rho.clamp(max=cap), rho > cap
    else:
        inside = (rho >= 1.0 / cap) & (rho <= cap)
        w, changed = inside.float(), ~inside
    w = torch.where(m, w, 0.0)
    stats["rollout/is_weight_mean"] = float(w.sum()) / count
    stats["rollout/is_capped_frac"] = float((changed & m).sum()) / count
    return w, stats
