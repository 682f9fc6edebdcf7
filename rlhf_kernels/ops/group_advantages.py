"""Outcome advantages relative to the other samples of the same prompt: GRPO and RLOO."""

from __future__ import annotations

import torch

from .._utils import bool_mask

GROUP_MODES = ("grpo", "rloo")


def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mode: str = "grpo",
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantages from sequence scores, normalised within each group of samples of one prompt.

    Args:
        scores: ``(B,)`` sequence scores, any float dtype.
        group_ids: ``(B,)`` integer ids; samples of the same prompt share an id, in any order.
        mode: ``"grpo"`` (https://arxiv.org/abs/2402.03300): (s - mean_group) / (std_group + eps) with the
            unbiased std, or s - mean_group when ``scale_by_std=False``. ``"rloo"``
            (https://arxiv.org/abs/2402.14740): s minus the mean of the other samples of its group.
        eps: added to the std (grpo).

    Returns fp32 ``(B,)`` (fp64 for fp64 scores). A group of a single sample gets advantage 0 in both modes (grpo:
    mean = its score, std = 1; rloo: no other sample to compare with). One host sync (the number of groups).
    Use :func:`broadcast_to_tokens` to spread the result over a response mask.
    """
    if mode not in GROUP_MODES:
        raise ValueError(f"unknown group advantage mode {mode!r}; valid modes are {', '.join(GROUP_MODES)}")
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 1:
        raise TypeError("scores must be a 1-D floating-point torch.Tensor of shape (B,)")
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer torch.Tensor, got {getattr(group_ids, 'dtype', None)}")
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} does not match scores {tuple(scores.shape)}")
    if group_ids.device != scores.device:
        raise ValueError(f"group_ids are on {group_ids.device} but scores are on {scores.device}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(dtype)
    if s.numel() == 0:
        return s
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(dtype)[inv]  # (B,) size of each sample's group
    group_sum = torch.zeros(counts.numel(), dtype=dtype, device=s.device).index_add_(0, inv, s)[inv]
    single = n < 2
    zero = torch.zeros((), dtype=dtype, device=s.device)
    if mode == "rloo":
        others = (group_sum - s) / (n - 1).clamp_min(1)
        return torch.where(single, zero, s - others)
    centred = s - group_sum / n
    if scale_by_std:
        sq = torch.zeros(counts.numel(), dtype=dtype, device=s.device).index_add_(0, inv, centred.square())[inv]
        std = torch.where(single, torch.ones((), dtype=dtype, device=s.device), (sq / (n - 1).clamp_min(1)).sqrt())
        centred = centred / (std + eps)
    return torch.where(single, zero, centred)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level ``(B,)`` values spread over the response tokens: ``(B, T)``, 0 where ``mask`` is False."""
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"expected advantages (B,) and mask (B, T), got {tuple(advantages.shape)} and {tuple(mask.shape)}"
        )
    m = bool_mask(mask, mask.shape, advantages.device)
    return torch.where(m, advantages.unsqueeze(1), torch.zeros((), dtype=advantages.dtype, device=advantages.device))
