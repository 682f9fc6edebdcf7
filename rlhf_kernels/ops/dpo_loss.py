"""The DPO family of preference losses, from sequence log-probs.

With h = (pi_c - ref_c) - (pi_r - ref_r), the difference of the policy's and the reference's log-likelihood
margins between the chosen and the rejected response (https://arxiv.org/abs/2305.18290), each loss type is a
scalar function of h (or of the two log-ratios) per pair, then the mean over pairs. The loss itself is a few
elementwise ops on (B,) tensors; the cost lies in the sequence log-probs, which
:func:`rlhf_kernels.fused_linear_dpo_loss` computes from the last hidden states without materialising logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._policy_inputs import _float_tensor
from .aggregation import check_normalizer

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "apo_zero", "simpo")
AVERAGED_LOSS_TYPES = ("ipo", "simpo")  # defined on length-averaged log-probs
REFERENCE_FREE_LOSS_TYPES = ("simpo",)  # use no reference log-probs
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "simpo")  # take label_smoothing


def check_dpo_options(beta: float, loss_type: str, label_smoothing: float, gamma: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {', '.join(DPO_LOSS_TYPES)}")
    if not (float(beta) > 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    eps = float(label_smoothing)
    if eps != 0.0 and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(f"label_smoothing applies to the sigmoid, robust and simpo losses, not {loss_type!r}")
    if not 0.0 <= eps < (0.5 if loss_type == "robust" else 1.0):
        bound = "[0, 0.5) for the robust loss" if loss_type == "robust" else "[0, 1)"
        raise ValueError(f"label_smoothing must lie in {bound}, got {label_smoothing}")
    if float(gamma) != 0.0 and loss_type != "simpo":
        raise ValueError(f"gamma (the target reward margin) applies to the simpo loss only, not {loss_type!r}")


def pair_losses(chosen_ratio, rejected_ratio, beta: float, loss_type: str, eps: float, gamma: float):
    """Per-pair loss (B,) from the log-ratios log(pi / ref) of the chosen and rejected responses."""
    if loss_type == "apo_zero":
        return 1.0 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    h = chosen_ratio - rejected_ratio
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    if loss_type == "ipo":
        return (h - 0.5 / beta).square()
    x = beta * h - gamma if loss_type == "simpo" else beta * h
    loss = -(1.0 - eps) * F.logsigmoid(x)  # log sigmoid in its overflow-free form
    if eps == 0.0:
        return loss
    if loss_type == "robust":  # the smoothing term enters with the opposite sign, then the unbiasing factor
        return (loss + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    return loss - eps * F.logsigmoid(-x)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reference_free: bool = False,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss from sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` log pi(y | x) of the chosen / rejected responses
            (differentiable). Summed over response tokens for every loss type except ``"ipo"`` and ``"simpo"``,
            which are defined on log-probs averaged over the response tokens (:func:`fused_linear_dpo_loss` does
            either; see its ``average_log_prob``).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the frozen reference (no gradient).
            Not needed (may be ``None``) with ``reference_free=True`` or ``loss_type="simpo"``.
        beta: inverse temperature of the implicit reward beta * log(pi / ref).
        loss_type: with h = (pi_c - ref_c) - (pi_r - ref_r) and eps = ``label_smoothing``:

            * ``"sigmoid"``: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (DPO; conservative DPO
              when eps > 0),
            * ``"robust"``: (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
              (https://arxiv.org/abs/2403.00409), eps < 0.5,
            * ``"hinge"``: relu(1 - beta h) (SLiC, https://arxiv.org/abs/2305.10425),
            * ``"ipo"``: (h - 1 / (2 beta))^2 (https://arxiv.org/abs/2310.12036),
            * ``"apo_zero"``: 1 - sigmoid(beta (pi_c - ref_c)) + sigmoid(beta (pi_r - ref_r))
              (https://arxiv.org/abs/2408.06266),
            * ``"simpo"``: -log sigmoid(beta (pi_c - pi_r) - gamma), no reference, with label smoothing as in
              ``"sigmoid"`` (https://arxiv.org/abs/2405.14734).
        gamma: SimPO's target reward margin. reference_free: take ref log-probs as 0.
        normalizer: the number of pairs in the whole optimizer step (all micro-batches and ranks; a number or a
            0-dim tensor, finite, > 0): the loss is then the sum of the pair losses divided by it, and the
            micro-batch losses of a step add up to the loss of the step. ``None``: this batch's B.

    Returns ``(loss, stats)``: ``loss`` the mean over pairs (fp32; fp64 for fp64 inputs); ``stats`` detached means
    over this batch's pairs (whatever the ``normalizer``): ``rewards/chosen`` = beta (pi_c - ref_c),
    ``rewards/rejected``, ``rewards/margins`` (their difference), ``rewards/accuracies`` (fraction of pairs with
    chosen reward > rejected reward), ``logps/chosen``, ``logps/rejected``.
    """
    check_dpo_options(beta, loss_type, label_smoothing, gamma)
    pc = _float_tensor("policy_chosen_logps", policy_chosen_logps)
    pr = _float_tensor("policy_rejected_logps", policy_rejected_logps)
    if pc.dim() != 1 or pr.shape != pc.shape:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must be (B,) of one shape, got {tuple(pc.shape)} and "
            f"{tuple(pr.shape)}"
        )
    dtype = torch.promote_types(pc.dtype, torch.float32)
    no_ref = reference_free or loss_type in REFERENCE_FREE_LOSS_TYPES
    rc, rr = reference_logps(ref_chosen_logps, ref_rejected_logps, pc, no_ref, dtype)
    pc, pr = pc.to(dtype), pr.to(dtype)
    normalizer = check_normalizer(normalizer, pc.device)
    losses = pair_losses(pc - rc, pr - rr, beta, loss_type, label_smoothing, gamma)
    if normalizer is None:
        loss = losses.mean()
    else:
        loss = losses.sum() / torch.as_tensor(normalizer, dtype=dtype, device=pc.device)
    return loss, dpo_stats(pc, pr, rc, rr, beta)


def reference_logps(ref_chosen, ref_rejected, policy: torch.Tensor, no_ref: bool, dtype: torch.dtype):
    """The reference sequence log-probs (checked against the policy's (B,) shape and device) in ``dtype``, or
    zeros when the loss uses no reference."""
    if no_ref:
        zero = torch.zeros(policy.shape, dtype=dtype, device=policy.device)
        return zero, zero
    for name, x in (("ref_chosen_logps", ref_chosen), ("ref_rejected_logps", ref_rejected)):
        if x is None:
            raise ValueError(f"{name} is required unless reference_free=True or loss_type='simpo'")
        if _float_tensor(name, x).shape != policy.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match policy log-probs {tuple(policy.shape)}")
        if x.device != policy.device:
            raise ValueError(f"{name} is on {x.device} but the policy log-probs are on {policy.device}")
    return ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)


@torch.no_grad()
def dpo_stats(pc, pr, rc, rr, beta: float) -> dict[str, torch.Tensor]:
    """Batch means of the implicit rewards beta * log(pi / ref) and of the policy log-probs, detached."""
    chosen, rejected = beta * (pc.detach() - rc), beta * (pr.detach() - rr)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: bool) -> torch.Tensor:
    """``(S, T)`` per-token log-probs (0 at ignored positions) -> ``(S,)`` sums, or means over response tokens."""
    total = token_logps.sum(-1)
    if not average:
        return total
    return total / (labels != ignore_index).sum(-1).clamp_min(1).to(total.dtype)
