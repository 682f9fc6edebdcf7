"""The pieces of group-sampling RL (GRPO and its successors) that are plain functions of a rollout batch: outcome
advantages by estimator, DAPO's overlong shaping, the groups dynamic sampling drops, and the importance weights
that correct for the sampler's log-probs differing from the trainer's.

Shapes: ``B`` sequences (``prompts x G`` samples, the G samples of a prompt sharing a group id), ``T`` response
tokens. Every option list is defined here, next to its code; the config, ``--help`` and the README read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import rlhf_kernels

from .config import PTX_HELP, TrainConfig, _opt

# advantage estimators: (name, paper)
ADVANTAGE_ESTIMATORS = {
    "grpo": "GRPO, https://arxiv.org/abs/2402.03300: reward minus its group's mean, scaled by scale_rewards",
    "dr_grpo": "Dr. GRPO, https://arxiv.org/abs/2503.20783: reward minus its group's mean, never divided by a std",
    "rloo": "RLOO, https://arxiv.org/abs/2402.14740: reward minus the mean of the other samples of its group",
    "reinforce_pp": "REINFORCE++, https://arxiv.org/abs/2501.03262: reward whitened over the whole batch",
}
SCALE_REWARDS = ("group", "batch", "none")  # the std that divides GRPO's centred rewards
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
OLD_LOGPROBS = ("auto", "recompute", "sampler")

# The published combinations: recipe -> (paper, the values it sets). A config field left at None takes its
# recipe's value; any value given explicitly wins. overlong_buffer "auto" = a fifth of max_completion_length (DAPO:
# 4096 of 20480).
RECIPES: dict[str, tuple[str, dict]] = {
    "grpo": ("DeepSeekMath, https://arxiv.org/abs/2402.03300", dict(
        advantage="grpo", scale_rewards="group", beta=0.04, policy_loss="clip", ratio_level="token", clip_low=0.2,
        clip_high=0.2, agg="seq-mean-token-mean", dynamic_sampling=False, overlong_buffer=0, mask_truncated=False)),
    "dr_grpo": ("Dr. GRPO, https://arxiv.org/abs/2503.20783", dict(
        advantage="dr_grpo", scale_rewards="none", beta=0.0, policy_loss="clip", ratio_level="token", clip_low=0.2,
        clip_high=0.2, agg="seq-mean-token-sum-norm", dynamic_sampling=False, overlong_buffer=0,
        mask_truncated=False)),
    "dapo": ("DAPO, https://arxiv.org/abs/2503.14476", dict(
        advantage="grpo", scale_rewards="group", beta=0.0, policy_loss="clip", ratio_level="token", clip_low=0.2,
        clip_high=0.28, agg="token-mean", dynamic_sampling=True, overlong_buffer="auto", mask_truncated=False)),
    "gspo": ("GSPO, https://arxiv.org/abs/2507.18071", dict(
        advantage="grpo", scale_rewards="group", beta=0.0, policy_loss="clip", ratio_level="sequence",
        clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean", dynamic_sampling=False, overlong_buffer=0,
        mask_truncated=False)),
    "cispo": ("CISPO (MiniMax-M1), https://arxiv.org/abs/2506.13585; no lower bound (clip_low 0.99), clip_high 4.0 "
              "is this library's choice (the paper tunes it)", dict(
        advantage="grpo", scale_rewards="group", beta=0.0, policy_loss="cispo", ratio_level="token", clip_low=0.99,
        clip_high=4.0, agg="token-mean", dynamic_sampling=False, overlong_buffer=0, mask_truncated=False)),
}  # fmt: skip


def recipe_help() -> str:
    """One line per recipe: its paper and values (for --help and the README)."""
    return "; ".join(f"{name} ({paper}): " + ", ".join(f"{k}={v}" for k, v in values.items())
                     for name, (paper, values) in RECIPES.items())  # fmt: skip


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


# ---------------------------------------------------------------------------------------------------- config

_FROM_RECIPE = "None = the recipe's"


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO and its successors: G samples per prompt, rewards from functions, group advantages, clipped updates."""

    dataset: str = _opt("builtin:prompt", "prompt dataset: builtin:prompt, a local file/directory or a hub name")
    output_dir: str = _opt("runs/grpo", "directory for checkpoints, metrics, plots and the final model")
    lr: float = _opt(1e-5, "peak learning rate")
    recipe: str = _opt("grpo", "preset of the options left at None: " + recipe_help())
    reward_funcs: str = _opt(
        "gold",
        "comma-separated reward functions: gold (the built-in task's), a reward model directory, module:function",
    )
    reward_weights: str | None = _opt(None, "comma-separated weights of reward_funcs (None = all 1)")
    ref_model: str | None = _opt(None, "reference model for the KL (None = a frozen copy of the initial policy)")
    max_prompt_length: int = _opt(128, "prompts longer than this (tokens) are dropped or rejected (see overlong)")
    max_completion_length: int = _opt(32, "longest sampled completion (tokens)")
    temperature: float = _opt(1.0, "sampling temperature (also applied to the log-probs of the loss)")
    top_p: float = _opt(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = _opt(0, "top-k sampling (0 = off)")
    prompts_per_step: int = _opt(8, "prompts per iteration, over all processes (one 'step' is one iteration)")
    num_generations: int = _opt(8, "samples per prompt (the group size G)")
    generation_batch_size: int = _opt(0, "prompts per generate call (all G samples of each; 0 = all of them)")
    num_iterations: int = _opt(1, "passes over each batch of samples (mu)")
    mini_batch_size: int | None = _opt(None, "samples per optimizer update, over all processes (None = the batch)")
    advantage: str | None = _opt(None, "advantage estimator: " + " | ".join(ADVANTAGE_ESTIMATORS) + "; " + _FROM_RECIPE)
    scale_rewards: str | None = _opt(None, "grpo's std: " + " | ".join(SCALE_REWARDS) + "; " + _FROM_RECIPE)
    beta: float | None = _opt(None, "KL coefficient in the loss (0 = no reference model at all); " + _FROM_RECIPE)
    kl_estimator: str = _opt("k3", "KL estimator in the loss: " + " | ".join(rlhf_kernels.KL_PENALTY_KINDS))
    policy_loss: str | None = _opt(None, "policy loss: " + " | ".join(rlhf_kernels.LOSS_TYPES) + "; " + _FROM_RECIPE)
    ratio_level: str | None = _opt(None, "ratio: " + " | ".join(rlhf_kernels.RATIO_LEVELS) + "; " + _FROM_RECIPE)
    clip_low: float | None = _opt(None, "ratio clipped below at 1 - clip_low; " + _FROM_RECIPE)
    clip_high: float | None = _opt(None, "ratio clipped above at 1 + clip_high; " + _FROM_RECIPE)
    sapo_tau_pos: float = _opt(1.0, "SAPO gate temperature for positive advantages")
    sapo_tau_neg: float = _opt(1.05, "SAPO gate temperature for negative advantages")
    agg: str | None = _opt(None, "loss aggregation: " + " | ".join(rlhf_kernels.AGG_MODES) + "; " + _FROM_RECIPE)
    entropy_coef: float = _opt(0.0, "weight of the entropy bonus")
    dynamic_sampling: bool | None = _opt(None, "drop groups whose rewards are all equal and sample more prompts; "
                                         + _FROM_RECIPE)  # fmt: skip
    max_resample_rounds: int = _opt(3, "dynamic sampling: at most this many extra rounds of prompts per step")
    overlong_buffer: int | None = _opt(
        None, "soft overlong penalty over the last N tokens before max_completion_length (0 = off); " + _FROM_RECIPE
    )
    overlong_penalty: float = _opt(1.0, "reward penalty at max_completion_length (soft overlong shaping)")
    mask_truncated: bool | None = _opt(None, "leave completions cut at max_completion_length out of the loss; "
                                       + _FROM_RECIPE)  # fmt: skip
    rollout_correction: str = _opt("none", "sampler-trainer importance correction: " + " | ".join(ROLLOUT_CORRECTIONS))
    rollout_correction_cap: float = _opt(2.0, "cap of the importance weights (mask modes: kept in [1/cap, cap])")
    ptx_coef: float = _opt(0.0, PTX_HELP["ptx_coef"])
    ptx_dataset: str = _opt("builtin:sft", PTX_HELP["ptx_dataset"])
    ptx_batch_size: int = _opt(8, PTX_HELP["ptx_batch_size"])
    batch_invariant: bool = _opt(
        False, "batch-invariant attention for sampling and training: the sampler's log-probs equal the trainer's "
        "bitwise on CPU (same dtype, no top-k/top-p); slower attention (rlhf.batch_invariant)"
    )  # fmt: skip
    old_logprobs: str = _opt(
        "auto", "the ratio's old log-probs: recompute (a no-grad pass before the update) | sampler (the sampler's "
        "recorded log-probs; untruncated sampling, no rollout_correction) | auto (sampler when the update is one "
        "on-policy optimizer step: num_iterations=1, one mini-batch, no top-k/top-p, no rollout_correction)"
    )  # fmt: skip

    def validate(self) -> None:
        super().validate()
        choices = {
            "recipe": tuple(RECIPES), "advantage": tuple(ADVANTAGE_ESTIMATORS), "scale_rewards": SCALE_REWARDS,
            "kl_estimator": rlhf_kernels.KL_PENALTY_KINDS, "policy_loss": rlhf_kernels.LOSS_TYPES,
            "ratio_level": rlhf_kernels.RATIO_LEVELS, "agg": rlhf_kernels.AGG_MODES,
            "rollout_correction": ROLLOUT_CORRECTIONS, "old_logprobs": OLD_LOGPROBS,
        }  # fmt: skip
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        ranges = {
            "prompts_per_step": (lambda v: v >= 1, ">= 1"), "num_generations": (lambda v: v >= 2, ">= 2"),
            "max_completion_length": (lambda v: v >= 1, ">= 1"), "num_iterations": (lambda v: v >= 1, ">= 1"),
"beta": (lambda v: v >= 0, ">= 0"),
            "clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "clip_high": (lambda v: v >= 0, ">= 0"),
            "sapo_tau_pos": (lambda v: v > 0, "> 0"), "sapo_tau_neg": (lambda v: v > 0, "> 0"),
            "max_resample_rounds": (lambda v: v >= 0, ">= 0"), "overlong_buffer": (lambda v: v >= 0, ">= 0"),
            "overlong_penalty": (lambda v: v >= 0, ">= 0"), "rollout_correction_cap": (lambda v: v > 1, "> 1"),
        }  # fmt: skip
        for name, (ok, rule) in ranges.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name} must be {rule}; got {value!r}")
        if self.old_logprobs == "sampler" and (self.top_k or self.top_p < 1.0):
            raise ValueError("old_logprobs=sampler needs untruncated sampling (top_k=0, top_p=1): under truncation "
                             "the sampler's log-probs are those of the truncated distribution")  # fmt: skip
        if self.old_logprobs == "sampler" and self.rollout_correction != "none":
            raise ValueError("old_logprobs=sampler with a rollout_correction: the correction compares the "
                             "recomputed old log-probs with the sampler's, use old_logprobs=recompute")  # fmt: skip
        resolved = resolve_recipe(self)
        if resolved.overlong_buffer > resolved.max_completion_length:
            raise ValueError(
                f"overlong_buffer={resolved.overlong_buffer} exceeds max_completion_length={self.max_completion_length}"
            )


def reuses_sampler_logprobs(cfg: GRPOConfig) -> bool:
    """Whether the update takes the sampler's log-probs as its old log-probs (``old_logprobs``), skipping the
    no-grad pass. ``auto``: when the update is a single optimizer step on the batch just sampled (then the
    recomputed log-probs would equal the sampler's up to the forward's rounding: exactly with
    ``batch_invariant``), from untruncated sampling and without a rollout correction."""
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs == "sampler"
    one_step = cfg.num_iterations == 1 and (
        cfg.mini_batch_size is None or cfg.mini_batch_size >= cfg.prompts_per_step * cfg.num_generations
    )
    untruncated = not cfg.top_k and cfg.top_p >= 1.0
    return one_step and untruncated and cfg.rollout_correction == "none"


def resolve_recipe(cfg: GRPOConfig) -> GRPOConfig:
    """``cfg`` with every option left at None taken from its recipe (:data:`RECIPES`)."""
    values = {}
    for name, value in RECIPES[cfg.recipe][1].items():
        if getattr(cfg, name) is None:
            if value == "auto":  # DAPO's buffer: a fifth of the longest completion
                value = max(1, cfg.max_completion_length // 5)
            values[name] = value
    return dataclasses.replace(cfg, **values)
