"""Reward-model losses on K ranked responses per prompt (InstructGPT's ranked comparisons, Plackett-Luce).

A labeller ranks K responses to one prompt; every pair of responses with different ranks is one comparison, C(K, 2)
of them without ties. InstructGPT (https://arxiv.org/abs/2203.02155, section 3.5) trains on all of one prompt's
comparisons together, each prompt weighted equally: loss = -1/n_p * sum over its n_p pairs (w better than l) of
log sigmoid(r_w - r_l), then the mean over prompts. Each response is scored once, whatever K, where splitting the
ranking into independent pairs scores it K - 1 times. The Plackett-Luce alternative
(https://en.wikipedia.org/wiki/Discrete_choice#Plackett-Luce) is the likelihood of the whole ranking as successive
choices: best of all K, then best of the rest, and so on.

The maths is a few ops on ``(P, K, K)`` pair tensors (K is small: 2 to 9 in practice); the cost lies in scoring the
responses, which the reward model does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._policy_inputs import _float_tensor
from .aggregation import check_normalizer

RANK_LOSS_MODES = ("pairwise", "plackett_luce")


def _check_inputs(rewards, ranks, mode: str, margins, center_coef: float):
    if mode not in RANK_LOSS_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(RANK_LOSS_MODES)}")
    rewards = _float_tensor("rewards", rewards)
    if rewards.dim() != 2:
        shape = tuple(rewards.shape)
        raise ValueError(f"rewards must be (P, K): one row of K response rewards per prompt, got {shape}")
    if not isinstance(ranks, torch.Tensor) or ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        got = getattr(ranks, "dtype", ranks)
        raise TypeError(f"ranks must be an integer tensor (0 = best, -1 = no response), got {got}")
    if ranks.shape != rewards.shape:
        raise ValueError(f"ranks shape {tuple(ranks.shape)} does not match rewards {tuple(rewards.shape)}")
    if ranks.device != rewards.device:
        raise ValueError(f"ranks is on {ranks.device} but rewards is on {rewards.device}")
    if margins is not None:
        if mode != "pairwise":
            raise ValueError("margins apply to mode='pairwise' only")
        margins = _float_tensor("margins", margins)
        P, K = rewards.shape
        if margins.shape not in ((P, K), (P, K, K)):
            raise ValueError(
                f"margins must be (P, K) scores (the margin of a pair is the difference of its two scores) or "
                f"(P, K, K) per-pair margins, got {tuple(margins.shape)} for rewards {tuple(rewards.shape)}"
            )
        if margins.device != rewards.device:
            raise ValueError(f"margins is on {margins.device} but rewards is on {rewards.device}")
    if not (math.isfinite(center_coef) and center_coef >= 0.0):
        raise ValueError(f"center_coef must be a finite number >= 0, got {center_coef}")
    return rewards, margins


def ranked_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """``(P, K, K)`` bool: ``[p, w, l]`` is True when responses ``w`` and ``l`` of prompt ``p`` are both present
    (rank >= 0) and ``w`` is ranked strictly better (lower rank) than ``l``. Tied responses form no pair."""
    present = ranks >= 0
    both = present[:, :, None] & present[:, None, :]
    return both & (ranks[:, :, None] < ranks[:, None, :])


def pairwise_losses(rewards, pairs, margins=None, center_coef: float = 0.0) -> torch.Tensor:
    """Per-prompt losses ``(P,)``: the mean over the prompt's ranked pairs of ``-log sigmoid(r_w - r_l - m_wl)``
    plus ``center_coef * (r_w + r_l)^2``; 0 for a prompt without pairs."""
    diff = rewards[:, :, None] - rewards[:, None, :]  # (P, K, K): r_w - r_l
    if margins is not None:
        diff = diff - (margins if margins.dim() == 3 else margins[:, :, None] - margins[:, None, :])
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (rewards[:, :, None] + rewards[:, None, :]).square()
    count = pairs.sum((1, 2))
    total = torch.where(pairs, per_pair, torch.zeros_like(per_pair)).sum((1, 2))
    return total / count.clamp_min(1).to(total.dtype)


def plackett_luce_losses(rewards, ranks, pairs, center_coef: float = 0.0) -> torch.Tensor:
    """Per-prompt negative log-likelihoods ``(P,)`` of the ranking under Plackett-Luce: the sum over present
    responses ``i`` of ``logsumexp(r_j for j ranked no better than i) - r_i``. A tie group is chosen from the
    same remaining set by each of its members (Breslow's rule for ties). 0 for a prompt without pairs."""
    present = ranks >= 0
    # remaining[p, i, j]: j is still unchosen when i is chosen, i.e. rank_j >= rank_i (j = i included)
    # (the diagonal is always in, so that an absent i's logsumexp stays finite and its zero gradient not NaN)
    K = ranks.shape[1]
    eye = torch.eye(K, dtype=torch.bool, device=ranks.device)
    remaining = (present[:, None, :] & (ranks[:, None, :] >= ranks[:, :, None])) | eye
    scores = rewards[:, None, :].expand(-1, rewards.shape[1], -1)
    log_norm = torch.logsumexp(scores.masked_fill(~remaining, -math.inf), -1)  # (P, K); -inf for absent i
    terms = torch.where(present, log_norm - rewards, torch.zeros_like(rewards))
    losses = terms.sum(-1)
    if center_coef:
        square = (rewards[:, :, None] + rewards[:, None, :]).square()
        count = pairs.sum((1, 2)).clamp_min(1).to(rewards.dtype)
        losses = losses + center_coef * torch.where(pairs, square, torch.zeros_like(square)).sum((1, 2)) / count
    return torch.where(pairs.any(-1).any(-1), losses, torch.zeros_like(losses))


@torch.no_grad()
def kendall_tau(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per-prompt Kendall tau-b ``(P,)`` between the order of the rewards and the label ranking (rank 0 best),
    over the present responses; NaN where it is undefined (fewer than two distinct labels or rewards)."""
    present = ranks >= 0
    K = ranks.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=ranks.device).triu(1)
    both = present[:, :, None] & present[:, None, :] & upper  # each unordered pair once
    label = torch.sign(ranks[:, None, :] - ranks[:, :, None]).to(rewards.dtype)  # +1: i ranked better than j
    model = torch.sign(rewards[:, :, None] - rewards[:, None, :])  # +1: i scored higher than j
    zero = torch.zeros_like(model)
    s = torch.where(both, label * model, zero).sum((1, 2))  # concordant - discordant
    untied_label = torch.where(both, label.abs(), zero).sum((1, 2))
    untied_model = torch.where(both, model.abs(), zero).sum((1, 2))
    return s / (untied_label * untied_model).sqrt()  # 0 / 0 = NaN where undefined


def ranked_reward_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    *,
    mode: str = "pairwise",
    margins: torch.Tensor | None = None,
    center_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss on K ranked responses per prompt.

    Args:
        rewards: ``(P, K)`` float, the reward model's score of each response (differentiable). Slots without a
            response may hold anything finite (their rank is -1).
        ranks: ``(P, K)`` int: 0 = best, larger = worse, equal ranks = a tie (tied responses form no pair),
            -1 = no response in that slot (so prompts may have different numbers of responses).
        mode: ``"pairwise"`` (InstructGPT): per prompt, the mean over its ranked pairs (w better than l) of
            ``-log sigmoid(r_w - r_l - margin_wl)``; ``"plackett_luce"``: per prompt, the negative log-likelihood
            of the ranking as successive choices, ``sum_i logsumexp(r_j : rank_j >= rank_i) - r_i`` over the
            present responses (members of a tie group choose from the same set).
        margins: pairwise mode only: ``(P, K)`` scores, the margin of a pair being ``scores_w - scores_l``, or
            ``(P, K, K)`` margins ``[p, w, l]`` given per pair. None: no margin.
        center_coef: adds ``center_coef * (r_w + r_l)^2`` averaged over each prompt's pairs (keeps rewards centred
            on 0; for K = 2 this is the Bradley-Terry pair loss's centring term).
        normalizer: the number of prompts with at least one ranked pair in the whole optimizer step (all
            micro-batches and ranks): the loss is then the sum of the prompt losses divided by it. ``None``: this
            batch's count. Prompts without a pair (one response, or all tied) add nothing.

    Returns ``(loss, stats)``: ``loss`` fp32 (fp64 for fp64 rewards), 0 when no prompt has a pair; ``stats``
    detached, over this batch: ``accuracy`` (fraction of all ranked pairs scored in the label order, r_w > r_l),
    ``kendall_tau`` (mean over prompts where it is defined of the Kendall tau-b between rewards and labels),
    ``reward/mean``, ``reward/min``, ``reward/max`` (over present responses), ``num_pairs``, ``num_prompts``
    (prompts with a pair), ``num_tau_prompts`` (prompts with a defined tau).
    """
    rewards, margins = _check_inputs(rewards, ranks, mode, margins, center_coef)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.to(dtype)
    m = None if margins is None else margins.detach().to(dtype)
    normalizer = check_normalizer(normalizer, r.device)
    pairs = ranked_pairs(ranks)
    has_pair = pairs.any(-1).any(-1)  # (P,)
    if mode == "pairwise":
        per_prompt = pairwise_losses(r, pairs, m, center_coef)
    else:
        per_prompt = plackett_luce_losses(r, ranks, pairs, center_coef)
    if normalizer is None:
        loss = per_prompt.sum() / has_pair.sum().clamp_min(1).to(dtype)
    else:
        loss = per_prompt.sum() / torch.as_tensor(normalizer, dtype=dtype, device=r.device)
    return loss, ranked_stats(r, ranks, pairs)


@torch.no_grad()
def ranked_stats(rewards: torch.Tensor, ranks: torch.Tensor, pairs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch statistics of :func:`ranked_reward_loss` (see there)."""
    r = rewards.detach()
    present = ranks >= 0
    correct = pairs & (r[:, :, None] > r[:, None, :])
    num_pairs = pairs.sum()
    tau = kendall_tau(r, ranks)
    defined = ~tau.isnan()
    values = r[present]
    nan = torch.tensor(math.nan, dtype=r.dtype, device=r.device)
    return {
        "accuracy": correct.sum().to(r.dtype) / num_pairs.clamp_min(1),
        "kendall_tau": torch.where(defined, tau, 0.0).sum() / defined.sum().clamp_min(1),
        "reward/mean": values.mean() if values.numel() else nan,
        "reward/min": values.min() if values.numel() else nan,
        "reward/max": values.max() if values.numel() else nan,
        "num_pairs": num_pairs,
        "num_prompts": pairs.any(-1).any(-1).sum(),
        "num_tau_prompts": defined.sum(),
    }
