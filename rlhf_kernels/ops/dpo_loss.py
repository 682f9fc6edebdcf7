"""The DPO family of preference losses, from sequence log-probs or fused with the LM head.

With h = (pi_c - ref_c) - (pi_r - ref_r), the difference of the policy's and the reference's log-likelihood
margins between the chosen and the rejected response (https://arxiv.org/abs/2305.18290), each loss type is a
scalar function of h (or of the two log-ratios) per pair, then the mean over pairs. The loss itself is a few
elementwise ops on (B,) tensors; the cost lies in the sequence log-probs, which
:func:`fused_linear_dpo_loss` computes chunk by chunk from the last hidden states without materialising logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._utils import check_labels
from .fused_linear_logprobs import fused_linear_logprobs
from .ppo_loss import _float_tensor

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "apo_zero", "simpo")
AVERAGED_LOSS_TYPES = ("ipo", "simpo")  # defined on length-averaged log-probs


def check_dpo_options(beta: float, loss_type: str, label_smoothing: float, gamma: float) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are {', '.join(DPO_LOSS_TYPES)}")
    if not (float(beta) > 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    eps = float(label_smoothing)
    if eps != 0.0 and loss_type not in ("sigmoid", "robust", "simpo"):
        raise ValueError(f"label_smoothing applies to the sigmoid, robust and simpo losses, not {loss_type!r}")
    if not 0.0 <= eps < (0.5 if loss_type == "robust" else 1.0):
        bound = "[0, 0.5) for the robust loss" if loss_type == "robust" else "[0, 1)"
        raise ValueError(f"label_smoothing must lie in {bound}, got {label_smoothing}")
    if float(gamma) != 0.0 and loss_type != "simpo":
        raise ValueError(f"gamma (the target reward margin) applies to the simpo loss only, not {loss_type!r}")


def _pair_losses(chosen_ratio, rejected_ratio, beta: float, loss_type: str, eps: float, gamma: float):
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

    Returns ``(loss, stats)``: ``loss`` the mean over pairs (fp32; fp64 for fp64 inputs); ``stats`` detached batch
    means: ``rewards/chosen`` = beta (pi_c - ref_c), ``rewards/rejected``, ``rewards/margins`` (their difference),
    ``rewards/accuracies`` (fraction of pairs with chosen reward > rejected reward), ``logps/chosen``,
    ``logps/rejected``.
    """
    check_dpo_options(beta, loss_type, label_smoothing, gamma)
    pc = _float_tensor("policy_chosen_logps", policy_chosen_logps)
    pr = _float_tensor("policy_rejected_logps", policy_rejected_logps)
    if pc.dim() != 1 or pr.shape != pc.shape:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must be (B,) of one shape, got {tuple(pc.shape)} and "
            f"{tuple(pr.shape)}"
        )
    no_ref = reference_free or loss_type == "simpo"
    for name, x in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if x is None:
            if not no_ref:
                raise ValueError(f"{name} is required unless reference_free=True or loss_type='simpo'")
            continue
        if _float_tensor(name, x).shape != pc.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match policy log-probs {tuple(pc.shape)}")
        if x.device != pc.device:
            raise ValueError(f"{name} is on {x.device} but the policy log-probs are on {pc.device}")
    dtype = torch.promote_types(pc.dtype, torch.float32)
    pc, pr = pc.to(dtype), pr.to(dtype)
    rc = 0.0 if no_ref else ref_chosen_logps.detach().to(dtype)
    rr = 0.0 if no_ref else ref_rejected_logps.detach().to(dtype)
    losses = _pair_losses(pc - rc, pr - rr, beta, loss_type, label_smoothing, gamma)
    with torch.no_grad():
        chosen = beta * (pc.detach() - rc)
        rejected = beta * (pr.detach() - rr)
        stats = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).to(dtype).mean(),
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }
    return losses.mean(), stats


def sequence_logps(token_logps: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: bool) -> torch.Tensor:
    """``(S, T)`` per-token log-probs (0 at ignored positions) -> ``(S,)`` sums, or means over response tokens."""
    total = token_logps.sum(-1)
    if not average:
        return total
    return total / (labels != ignore_index).sum(-1).clamp_min(1).to(total.dtype)


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average_log_prob: bool | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    check: bool = True,
    **dpo_options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss straight from the policy's last hidden states and LM head, never materialising logits.

    Args:
        hidden: ``(2B, T, H)``: the B chosen sequences first, then the B rejected ones, in the same pair order.
            ``hidden[:, t]`` predicts ``labels[:, t]`` (shift inputs by one before calling, as for
            :func:`rlhf_kernels.fused_linear_logprobs`).
        weight: ``(V, H)`` LM head; ``bias``: optional ``(V,)``.
        labels: ``(2B, T)`` int: the response tokens, ``ignore_index`` on prompt and padding.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` precomputed reference sequence log-probs, summed or
            averaged the same way as the policy's.
        average_log_prob: average the token log-probs over each response instead of summing them. ``None``
            (default): what the loss type is defined on (averaged for ``"ipo"`` and ``"simpo"``, summed otherwise).
        dpo_options: ``beta``, ``loss_type``, ``label_smoothing``, ``gamma``, ``reference_free`` as in
            :func:`dpo_loss`.
        check: verify that every sequence has at least one response token (one host sync).

    Returns ``(loss, stats)`` as :func:`dpo_loss`, equal to ``dpo_loss`` applied to the sums (or means) of
    :func:`fused_linear_logprobs`. Gradients flow to ``hidden``, ``weight`` and ``bias``: the forward keeps O(2B T)
    statistics; the backward recomputes each chunk's logits.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(
            f"hidden must be (2B, T, H) with the chosen sequences first, got {getattr(hidden, 'shape', hidden)}"
        )
    check_labels(labels, hidden.shape[:-1], hidden.device)
    check_dpo_options(
        dpo_options.get("beta", 0.1),
        dpo_options.get("loss_type", "sigmoid"),
        dpo_options.get("label_smoothing", 0.0),
        dpo_options.get("gamma", 0.0),
    )
    unknown = set(dpo_options) - {"beta", "loss_type", "label_smoothing", "gamma", "reference_free"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    if check and not torch.compiler.is_compiling():
        empty = ((labels != ignore_index).sum(-1) == 0).nonzero()
        if empty.numel():
            raise ValueError(
                f"sequence {int(empty[0, 0])} of labels has no response token (all {ignore_index}); "
                f"{empty.numel()} such sequences. A DPO pair needs a non-empty chosen and rejected response."
            )
    if average_log_prob is None:
        average_log_prob = dpo_options.get("loss_type", "sigmoid") in AVERAGED_LOSS_TYPES
    token_lp = fused_linear_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
        check=check,
    )  # (2B, T) fp32  # fmt: skip
    seq = sequence_logps(token_lp, labels, ignore_index, average_log_prob)
    B = hidden.shape[0] // 2
    return dpo_loss(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, **dpo_options)
