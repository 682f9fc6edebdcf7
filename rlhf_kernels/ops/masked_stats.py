"""Mean, variance and whitening over the masked elements of a tensor (response tokens of a padded batch).

Sums are taken in fp32 (fp64 for fp64 inputs) with PyTorch's pairwise reductions; the variance is computed from
centred values (two passes), never as E[x^2] - E[x]^2. An empty selection is a ValueError, which costs one host
sync (skipped under torch.compile, where an empty selection gives NaN instead).
"""

from __future__ import annotations

import torch

from .._utils import bool_mask

WHITEN_EPS = 1e-8


def _prepare(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    m = bool_mask(mask, x.shape, x.device)
    return x.to(torch.promote_types(x.dtype, torch.float32)), m


def _check_count(count: torch.Tensor, needed: int, what: str) -> None:
    if torch.compiler.is_compiling():
        return
    n = int(count.item())
    if n < needed:
        raise ValueError(
            f"the mask selects {n} element{'s' if n != 1 else ''}; {what} needs at least {needed} "
            f"(an all-False mask usually means every response was empty or truncated)"
        )


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over the elements where ``mask`` is True (``mask``: same shape, bool or 0/1).

    ``dim=None``: a scalar; an empty selection is a ValueError. With ``dim``: the mean over those dimensions;
    a slice with no selected element gives 0.0 (e.g. a row whose response was fully truncated).
    """
    x, m = _prepare(x, mask)
    w = m.to(x.dtype)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim)
    count = w.sum(dim=dim)
    if dim is None:
        _check_count(count, 1, "masked_mean")
        return total / count
    return total / count.clamp_min(1.0)


def _mean_var(x: torch.Tensor, m: torch.Tensor, unbiased: bool, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the selected elements of prepared ``x`` (two passes: the variance of centred values)."""
    count = m.sum(dtype=x.dtype)
    _check_count(count, 2 if unbiased else 1, what)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mean = torch.where(m, x, zero).sum() / count
    var = torch.where(m, x - mean, zero).square().sum() / (count - 1 if unbiased else count)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the selected elements (a scalar), with Bessel's correction when ``unbiased``.
    Fewer than 1 (2 when ``unbiased``) selected elements is a ValueError."""
    x, m = _prepare(x, mask)
    return _mean_var(x, m, unbiased, "masked_var" + (" with unbiased=True" if unbiased else ""))[1]


def whiten_with(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, shift_mean: bool) -> torch.Tensor:
    """(x - mean) * rsqrt(var + 1e-8), plus mean again when not ``shift_mean``; in fp32 (or x's wider dtype)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean, var = mean.to(dtype), var.to(dtype)
    out = (x.to(dtype) - mean) * torch.rsqrt(var + WHITEN_EPS)
    return out if shift_mean else out + mean


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten ``x`` with the mean and unbiased variance of its selected elements: (x - mean) * rsqrt(var + 1e-8),
    with the mean added back when ``shift_mean=False``. Every element is transformed (the statistics come from
    the selected ones only); fewer than two selected elements is a ValueError."""
    xf, m = _prepare(x, mask)
    mean, var = _mean_var(xf, m, True, "masked_whiten")
    return whiten_with(xf, mean, var, shift_mean)


def combine_row_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (count, mean, M2) (B, 3) -> the batch's (mean, unbiased variance), merged in fp64 (Chan et al.)."""
    s = stats.double()
    n, mean_i, m2_i = s[:, 0], s[:, 1], s[:, 2]
    total = n.sum()
    _check_count(total, 2, "whitening")
    mean = (n * mean_i).sum() / total
    m2 = m2_i.sum() + (n * (mean_i - mean).square()).sum()
    return mean, m2 / (total - 1)
