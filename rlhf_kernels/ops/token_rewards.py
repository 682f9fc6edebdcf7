"""Per-token PPO rewards: the KL penalty at every response token plus the sequence score at the last one."""

from __future__ import annotations

import torch

from .._utils import bool_mask


def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards ``(B, T)`` for PPO from sequence scores and an optional per-token KL.

    Args:
        scores: ``(B,)`` sequence scores (e.g. the reward model at the last response token), any float dtype.
        mask: ``(B, T)`` bool or 0/1: the response tokens (holes allowed, e.g. tool outputs between turns).
        kl: optional ``(B, T)`` per-token KL (:func:`rlhf_kernels.kl_penalty` or
            :func:`rlhf_kernels.kl_from_logits`); ignored with ``kl_coef`` where ``kl`` is None.
        kl_coef: the KL penalty coefficient beta.

    Returns fp32 ``(B, T)``: ``-kl_coef * kl`` at every masked token, 0 elsewhere, plus ``scores[b]`` at the last
    masked token of row b. Rows without a masked token are all zeros. Differentiable like the ops it uses.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point torch.Tensor, got {getattr(scores, 'dtype', type(scores))}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a (B, T) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    B, T = mask.shape
    if scores.shape != (B,):
        raise ValueError(
            f"scores must have shape (B,) = ({B},) to match mask {tuple(mask.shape)}, got {tuple(scores.shape)}"
        )
    if scores.device != mask.device:
        raise ValueError(f"scores are on {scores.device} but mask is on {mask.device}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    m = bool_mask(mask, (B, T), scores.device)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    if kl is not None:
        if not isinstance(kl, torch.Tensor) or not kl.is_floating_point():
            raise TypeError("kl must be a floating-point torch.Tensor")
        bool_mask(mask, kl.shape, kl.device)  # kl must match the mask
        dtype = torch.promote_types(dtype, kl.dtype)
        rewards = torch.where(m, -float(kl_coef) * kl.to(dtype), zero.to(dtype))
    else:
        rewards = torch.zeros(B, T, dtype=dtype, device=mask.device)
    if T == 0:
        return rewards
    has_token = m.any(dim=1)  # (B,)
    last = (T - 1) - m.flip(1).to(torch.uint8).argmax(dim=1)  # (B,) index of the last masked token
    bonus = torch.where(has_token, scores.to(dtype), zero.to(dtype))
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
