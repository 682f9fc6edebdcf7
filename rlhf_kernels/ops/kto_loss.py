"""KTO: learning from unpaired desirable / undesirable examples (Ethayarajh et al. 2024,
https://arxiv.org/abs/2402.01306).

With the log-ratio r = log pi(y|x) - log pi_ref(y|x) of an example and a reference point z, the loss of a
desirable example is lambda_D (1 - sigmoid(beta (r - z))) and of an undesirable one lambda_U (1 - sigmoid(beta (z -
r))), averaged over the examples. z estimates KL(pi || pi_ref) from mismatched pairs (x, y') of the batch (each
prompt with another example's completion): z = max(0, mean of their log-ratios), detached, so it shifts the
examples' rewards without a gradient of its own. As for DPO, the cost lies in the sequence log-probs, which
:func:`rlhf_kernels.fused_linear_kto_loss` computes from the last hidden states without materialising logits.
"""

from __future__ import annotations

import math

import torch

from ._policy_inputs import _float_tensor
from .aggregation import check_normalizer


def check_kto_options(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    if not (float(beta) > 0.0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (float(w) > 0.0 and math.isfinite(w)):
            raise ValueError(f"{name} must be a finite number > 0, got {w}")


def check_desirable(desirable, like: torch.Tensor) -> torch.Tensor:
    """``desirable`` as a ``(B,)`` bool tensor on the device of ``like`` (B,)."""
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise TypeError(
            f"desirable must be a bool tensor (True = desirable), got {getattr(desirable, 'dtype', desirable)}"
        )
    if desirable.shape != like.shape:
        raise ValueError(f"desirable shape {tuple(desirable.shape)} does not match the log-probs {tuple(like.shape)}")
    if desirable.device != like.device:
        raise ValueError(f"desirable is on {desirable.device} but the log-probs are on {like.device}")
    return desirable


def reference_point(policy_kl_logps, ref_kl_logps, kl, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """z = max(0, ``kl``) when given, else max(0, mean(policy_kl_logps - ref_kl_logps)), detached; 0 when neither
    is given."""
    if kl is not None:
        if policy_kl_logps is not None or ref_kl_logps is not None:
            raise ValueError("pass either kl or policy_kl_logps and ref_kl_logps, not both")
        z = torch.as_tensor(kl, dtype=dtype, device=device).detach()
        if z.dim() != 0 or not bool(torch.isfinite(z)):
            raise ValueError(f"kl must be a finite number or 0-dim tensor, got {kl}")
        return z.clamp_min(0)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("policy_kl_logps and ref_kl_logps go together: pass both or neither")
    if policy_kl_logps is None:
        return torch.zeros((), dtype=dtype, device=device)
    pk, rk = _float_tensor("policy_kl_logps", policy_kl_logps), _float_tensor("ref_kl_logps", ref_kl_logps)
    if pk.dim() != 1 or pk.shape != rk.shape or pk.numel() == 0:
        raise ValueError(
            f"policy_kl_logps and ref_kl_logps must be (M,) of one shape, M >= 1, got {tuple(pk.shape)} and "
            f"{tuple(rk.shape)}"
        )
    return (pk.detach().to(dtype) - rk.detach().to(dtype)).mean().clamp_min(0)


def example_losses(ratio, desirable, z, beta: float, desirable_weight: float, undesirable_weight: float):
    """Per-example losses ``(B,)`` from the log-ratios ``ratio`` (B,), ``desirable`` (B,) bool and z."""
    desirable_loss = desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z)))
    undesirable_loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - ratio)))
    return torch.where(desirable, desirable_loss, undesirable_loss)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss from sequence log-probs.

    Args:
        policy_logps: ``(B,)`` log pi(y | x) of each example's completion (differentiable), summed over its tokens.
        ref_logps: ``(B,)`` the same under the frozen reference (no gradient).
        desirable: ``(B,)`` bool, True for a desirable (thumbs-up) example.
        policy_kl_logps, ref_kl_logps: ``(M,)`` log-probs of mismatched pairs (a prompt with another example's
            completion) under the policy and the reference; z = max(0, mean of their difference), detached.
        kl: the reference point given directly (e.g. reduced over a whole step and all processes): z = max(0, kl).
            Neither given: z = 0.
        beta: inverse temperature of the implicit reward beta * (log pi - log pi_ref).
        desirable_weight, undesirable_weight: lambda_D, lambda_U (the paper balances them so that lambda_D n_D /
            (lambda_U n_U) lies in [1, 4/3]).
        normalizer: the number of examples in the whole optimizer step (all micro-batches and ranks): the loss is
            then the sum of the example losses divided by it. ``None``: this batch's B.

    Returns ``(loss, stats)``: ``loss`` = mean of lambda_D (1 - sigmoid(beta (r - z))) over desirable and
    lambda_U (1 - sigmoid(beta (z - r))) over undesirable examples, r = policy - ref (fp32; fp64 for fp64
    inputs). ``stats`` detached, over this batch: ``rewards/chosen`` and ``rewards/rejected`` (mean beta r over the
    desirable / undesirable examples, 0 when there are none), ``logps/chosen``, ``logps/rejected`` (likewise),
    ``kl`` (z), ``num_desirable``, ``num_undesirable``.
    """
    check_kto_options(beta, desirable_weight, undesirable_weight)
    pi = _float_tensor("policy_logps", policy_logps)
    ref = _float_tensor("ref_logps", ref_logps)
    if pi.dim() != 1 or ref.shape != pi.shape:
        raise ValueError(
            f"policy_logps and ref_logps must be (B,) of one shape, got {tuple(pi.shape)} and {tuple(ref.shape)}"
        )
    if ref.device != pi.device:
        raise ValueError(f"ref_logps is on {ref.device} but policy_logps is on {pi.device}")
    desirable = check_desirable(desirable, pi)
    dtype = torch.promote_types(pi.dtype, torch.float32)
    z = reference_point(policy_kl_logps, ref_kl_logps, kl, dtype, pi.device)
    normalizer = check_normalizer(normalizer, pi.device)
    pi, ref = pi.to(dtype), ref.detach().to(dtype)
    losses = example_losses(pi - ref, desirable, z, beta, desirable_weight, undesirable_weight)
    if normalizer is None:
        loss = losses.mean()
    else:
        loss = losses.sum() / torch.as_tensor(normalizer, dtype=dtype, device=pi.device)
    return loss, kto_stats(pi, ref, desirable, z, beta)


@torch.no_grad()
def kto_stats(pi, ref, desirable, z, beta: float) -> dict[str, torch.Tensor]:
    """Means of the implicit rewards and log-probs over the desirable / undesirable examples (0 when none), z and
    the counts."""
    pi = pi.detach()
    rewards = beta * (pi - ref)
    n_d, n_u = desirable.sum(), (~desirable).sum()

    def mean(x, which, n):
        return torch.where(which, x, torch.zeros_like(x)).sum() / n.clamp_min(1)

    return {
        "rewards/chosen": mean(rewards, desirable, n_d),
        "rewards/rejected": mean(rewards, ~desirable, n_u),
        "logps/chosen": mean(pi, desirable, n_d),
        "logps/rejected": mean(pi, ~desirable, n_u),
        "kl": z.detach().clone(),
        "num_desirable": n_d,
        "num_undesirable": n_u,
    }
