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
