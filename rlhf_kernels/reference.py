"""Plain PyTorch references: written for clarity, used as the test oracle, the benchmark baseline and the
last-resort backend.

Inputs are upcast to at least fp32 (fp64 stays fp64, which is how tests build their oracle). These functions
allocate full ``(N, V)`` temporaries; the kernels exist to avoid exactly that.
"""

from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of ``labels`` and entropy under softmax(logits / temperature).

    logits (..., V), labels (...) -> (logprobs (...), entropy (...)), in fp32 (fp64 for fp64 logits).
    Rows whose label is ``ignore_index`` give 0.0 for both; rows with a NaN or +-inf logit give NaN for both;
    a label outside [0, V) that is not ``ignore_index`` gives a NaN log-prob.
    """
    z = _upcast(logits) / temperature  # (..., V)
    logp = torch.log_softmax(z, dim=-1)  # (..., V)
    ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, torch.full_like(lp, float("nan")))
    ent = -(logp.exp() * logp).sum(-1)
    bad = ~torch.isfinite(z).all(-1)
    nan = torch.full_like(lp, float("nan"))
    lp = torch.where(bad, nan, lp)
    ent = torch.where(bad, nan, ent)
    zero = torch.zeros_like(lp)
    return torch.where(ignored, zero, lp), torch.where(ignored, zero, ent)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dimension: (..., V) -> (...)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs(logits, labels, temperature)[1]


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs(hidden @ weight.T + bias, labels)``: hidden (..., H), weight (V, H), bias (V,)."""
    logits = torch.nn.functional.linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    return logprobs(logits, labels, temperature, ignore_index)


def kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    direction: str = "reverse",
) -> torch.Tensor:
    """Exact per-token KL between p = softmax(logits / T) and q = softmax(ref_logits / T): (..., V) -> (...).

    ``direction="reverse"``: KL(p || q) = sum_v p_v (log p_v - log q_v); ``"forward"``: KL(q || p). Computed in
    fp32 (fp64 if either input is fp64); clamped at 0; 0.0 where ``mask`` is False; NaN for a row holding a NaN or
    +-inf logit in either input. ``ref_logits`` is treated as frozen (no gradient).
    """
    dtype = torch.promote_types(_upcast(logits).dtype, _upcast(ref_logits).dtype)
    if mask is not None:  # masked-out rows are ignored entirely: their values (even NaN) reach no output or gradient
        keep = mask.bool().unsqueeze(-1)
        logits = torch.where(keep, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        ref_logits = torch.where(keep, ref_logits, torch.zeros((), dtype=ref_logits.dtype, device=ref_logits.device))
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
    logq = torch.log_softmax(ref_logits.detach().to(dtype) / temperature, dim=-1)  # (..., V)
    if direction == "forward":
        logp, logq = logq, logp
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
    bad = ~(torch.isfinite(logits).all(-1) & torch.isfinite(ref_logits).all(-1))
    kl = torch.where(bad, torch.full_like(kl, float("nan")), kl)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def fused_linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    direction: str = "reverse",
) -> torch.Tensor:
    """``kl_from_logits(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias)``."""
    linear = torch.nn.functional.linear
    logits = linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    ref_b = None if ref_bias is None else _upcast(ref_bias).detach()
    ref_logits = linear(_upcast(ref_hidden).detach(), _upcast(ref_weight).detach(), ref_b)
    return kl_from_logits(logits, ref_logits, temperature, mask, direction)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation with masked positions skipped: the per-time-step loop, (B, T) -> (B, T).

    Going from t = T-1 down to 0 with next_value = acc = 0: where mask[t], delta = r_t + gamma next_value - V_t,
    acc = delta + gamma lam acc and next_value = V_t; elsewhere both carry through. advantages[t] = acc after step
    t; returns = advantages + values. fp32 (fp64 for fp64 inputs).
    """
    dtype = torch.promote_types(_upcast(rewards).dtype, _upcast(values).dtype)
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=dtype, device=r.device)
    acc = torch.zeros(B, dtype=dtype, device=r.device)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        acc = torch.where(m[:, t], delta + gamma * lam * acc, acc)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        adv[:, t] = acc
    return adv, adv + v
