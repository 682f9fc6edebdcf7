"""Argument checks, layouts and statistics shared by the policy-loss ops (``ppo_policy_loss``,
``fused_linear_ppo_loss``) and the other token losses: the loss variants, importance weights, sequence offsets."""

from __future__ import annotations

import math

import torch

from .._utils import bool_mask, require_none

LOSS_TYPES = ("clip", "cispo", "sapo")  # loss_type, in the order of the op's codes 0, 1, 2
RATIO_LEVELS = ("token", "sequence", "sequence_token")  # ratio_level, in the order of the op's codes


def _float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_token_inputs(shape_name: str, x: torch.Tensor, others: dict, mask: object) -> torch.Tensor:
    """Every tensor in ``others`` has the shape of ``x`` (..., T) or its leading shape (...) (a per-sequence
    value, broadcast over T), and lives on its device; returns ``mask`` as bool."""
    _float_tensor(shape_name, x)
    if x.dim() == 0:
        raise ValueError(f"{shape_name} must have at least one dimension (..., T), got a scalar")
    for name, y in others.items():
        _float_tensor(name, y)
        if y.shape != x.shape and y.shape != x.shape[:-1]:
            raise ValueError(
                f"{name} shape {tuple(y.shape)} must equal {shape_name} shape {tuple(x.shape)} (or its leading "
                f"shape {tuple(x.shape[:-1])} for one value per sequence)"
            )
        if y.device != x.device:
            raise ValueError(f"{name} is on {y.device} but {shape_name} is on {x.device}")
    return bool_mask(mask, x.shape, x.device)


def check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= float(clip_low) < 1.0:
        raise ValueError(f"clip_low must lie in [0, 1), got {clip_low}")
    if not 0.0 <= float(clip_high) < float("inf"):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high}")
    if dual_clip is not None and not 1.0 < float(dual_clip) < float("inf"):
        raise ValueError(f"dual_clip must be None or a finite number > 1, got {dual_clip}")


def tokens_fp32(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``x`` of ``shape`` (..., T) or its leading shape, detached, as a flat fp32 contiguous (N,) tensor."""
    x = x.detach()
    if x.shape != shape:
        x = x.unsqueeze(-1).expand(shape)
    return x.to(torch.float32).reshape(-1).contiguous()


def _ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp_min(1).to(torch.float32)


def check_policy_mode(loss_type: str, ratio_level: str, dual_clip: float | None, tau_pos: float, tau_neg: float):
    """Validates the loss variant; returns the op's (loss_type, ratio_level) codes."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    if dual_clip is not None and loss_type != "clip":
        raise ValueError(f"dual_clip applies to loss_type='clip' only, got loss_type={loss_type!r}")
    for name, tau in (("sapo_tau_pos", tau_pos), ("sapo_tau_neg", tau_neg)):
        if not 0.0 < float(tau) < math.inf:
            raise ValueError(f"{name} must be a finite number > 0, got {tau}")
    return LOSS_TYPES.index(loss_type), RATIO_LEVELS.index(ratio_level)


def check_is_weights(is_weights: object, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """``is_weights`` (None, or a float tensor of ``shape`` (..., T) or its leading shape) checked finite and >= 0
    (no host sync on accelerators), as a detached (..., T) fp32 tensor."""
    if is_weights is None:
        return None
    _float_tensor("is_weights", is_weights)
    if is_weights.shape not in (shape, shape[:-1]):
        raise ValueError(
            f"is_weights shape {tuple(is_weights.shape)} must be the token shape {tuple(shape)} or its leading "
            f"shape {tuple(shape[:-1])} (one weight per sequence)"
        )
    if is_weights.device != device:
        raise ValueError(f"is_weights is on {is_weights.device} but the log-probs are on {device}")
    c = is_weights.detach().to(torch.float32)
    require_none(~(torch.isfinite(c) & (c >= 0)), "is_weights must be finite and >= 0")
    return c if c.shape == shape else c.unsqueeze(-1).expand(shape)


def sequence_offsets(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(S + 1,) int64 offsets of the S rows of length T of a flattened (..., T) batch; empty for ``shape`` ()
    (the offsets of ratio_level 0, never read)."""
    if len(shape) == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.arange(0, math.prod(shape) + 1, max(shape[-1], 1), dtype=torch.int64, device=device)


def policy_stats(sums: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """The policy statistics from the op's (5,) sums and the number of counted tokens."""
    return {
        "policy/clipfrac": _ratio(sums[1] + sums[2], count),
        "policy/clipfrac_low": _ratio(sums[1], count),
        "policy/clipfrac_high": _ratio(sums[2], count),
        "policy/approxkl": _ratio(sums[3], count),
        "policy/clipfrac_lower": _ratio(sums[4], count),
    }


def is_weight_stats(is_weights: torch.Tensor | None, m: torch.Tensor) -> dict[str, torch.Tensor]:
    """``policy/is_weight_mean`` and ``policy/is_weight_zero_frac`` (tokens the weights drop) over the mask."""
    if is_weights is None:
        return {}
    count = m.sum()
    return {
        "policy/is_weight_mean": _ratio(torch.where(m, is_weights, 0.0).sum(), count),
        "policy/is_weight_zero_frac": _ratio((m & (is_weights == 0)).sum().to(torch.float32), count),
    }
