"""Loss aggregation over the tokens of a batch: the modes, their batch denominators, and the per-token weights
that turn every mode into one weighted sum (what the fused loss kernels take)."""

from __future__ import annotations

import math
import numbers

import torch

from .._utils import bool_mask

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_agg(agg: str) -> str:
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; valid modes are {', '.join(AGG_MODES)}")
    return agg


def check_normalizer(normalizer: object, device: torch.device) -> float | torch.Tensor | None:
    """``normalizer`` (None, a number, or a 0-dim real tensor on ``device`` or the CPU) checked to be finite and
    > 0. Returns None, a float (for a number or a CPU tensor, read on the host), or a detached 0-dim floating
    tensor on ``device``: an accelerator tensor (or any tensor under torch.compile) is checked on the device by
    ``torch._assert_async``, without a host sync; a bad value then fails asynchronously (a device-side assert)."""
    if normalizer is None:
        return None
    need = "normalizer must be a finite number > 0 (the denominator of the whole step, see aggregation_denominator)"
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but the data is on {device}")
        n = normalizer.detach()
        if n.device.type != "cpu" or torch.compiler.is_compiling():
            n = n if n.is_floating_point() else n.to(torch.float32)
            torch._assert_async((n > 0) & torch.isfinite(n), need)
            return n.to(device)
        normalizer = n.item()
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be None, a number or a 0-dim tensor, got {type(normalizer).__name__}")
    if not 0.0 < float(normalizer) < math.inf:  # False for NaN too
        raise ValueError(f"{need}, got {normalizer}")
    return float(normalizer)


def aggregation_denominator(mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """The batch-level denominator of ``agg`` for ``mask`` (..., T) (bool or 0/1; sequences are the leading
    dimensions), as a 0-dim fp32 tensor on the mask's device, computed without a host sync:

    * ``"token-mean"``: the number of masked tokens;
    * ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"``: the number of sequences with at least one masked token;
    * ``"seq-mean-token-sum-norm"``: that number times T (``mask.shape[-1]``).

    Denominators add up: the ``normalizer`` of an optimizer step split into micro-batches (and ranks) is the sum of
    their denominators (all-reduced across ranks), and passing it to every micro-batch's loss makes the sum of the
    micro-batch losses the loss of the whole step, gradient included. (For ``"seq-mean-token-sum-norm"`` this
    holds when the micro-batches share T.) A batch without masked tokens has denominator 0; a normalizer must be
    > 0, so a step that may be entirely masked out clamps the sum (``.clamp_min(1)``: its loss is 0 either way).
    For a batch with masked tokens, ``aggregate_loss(l, m, agg, normalizer=aggregation_denominator(m, agg))``
    equals ``aggregate_loss(l, m, agg)``.
    """
    check_agg(agg)
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0:
        raise ValueError(f"mask must be a (..., T) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    m = bool_mask(mask, mask.shape, mask.device).to(torch.float32)
    if agg == "token-mean":
        return m.sum()
    n_seq = (m.sum(-1) > 0).sum().to(torch.float32)
    return n_seq * mask.shape[-1] if agg == "seq-mean-token-sum-norm" else n_seq


def aggregation_weights(mask: torch.Tensor, agg: str, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weights w (same shape as ``mask`` (..., T), bool) such that the aggregated loss is sum(w * loss):
    non-zero exactly on the masked tokens, all zero for a fully masked batch (loss 0). Sequences are the leading
    dimensions. ``normalizer`` (checked by :func:`check_normalizer`) replaces the batch's own denominator
    (:func:`aggregation_denominator`, clamped to >= 1). Computed on the device without host syncs."""
    check_agg(agg)
    m = mask.to(torch.float32)
    denom = aggregation_denominator(mask, agg).clamp_min(1.0) if normalizer is None else normalizer
    if agg == "seq-mean-token-mean":
        return m / (m.sum(-1, keepdim=True).clamp_min(1.0) * denom)
    return m / denom


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token ``loss`` (..., T) over the tokens where ``mask`` is True:

    * ``"token-mean"``: sum over masked tokens / number of masked tokens;
    * ``"seq-mean-token-sum"`` / ``"seq-mean-token-mean"``: per-sequence sum / mean over its masked tokens, then
      the mean over the sequences that have at least one masked token;
    * ``"seq-mean-token-sum-norm"``: ``"seq-mean-token-sum"`` divided by T (a constant normaliser).

    ``normalizer``: the denominator of the whole optimizer step (a number or 0-dim tensor, finite, > 0), which
    replaces the batch's own one (the number of tokens, of sequences, or of sequences x T): the sum over
    micro-batches of :func:`aggregation_denominator`, for gradient accumulation and data parallelism. ``None``:
    this batch's own denominator. The per-sequence means of ``"seq-mean-token-mean"`` stay per sequence.

    A fully masked batch gives 0. Positions outside the mask never reach the result (even NaN). Differentiable.
    """
    check_agg(agg)
    m = bool_mask(mask, loss.shape, loss.device)
    normalizer = check_normalizer(normalizer, loss.device)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return (aggregation_weights(m, agg, normalizer).to(loss.dtype) * torch.where(m, loss, zero)).sum()
