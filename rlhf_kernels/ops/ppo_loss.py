"""PPO policy and value losses, each one fused kernel that returns the loss terms and their gradient together.

Per token (counted where the aggregation weight w is non-zero), with d = logprobs - old_logprobs:
    policy:  r = exp(clamp(d, -20, 20)),  l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)),
             capped at -A c for A < 0 under a dual clip c > 1;
    value:   l = 0.5 max((v - R)^2, (clip(v, old - c, old + c) - R)^2).
Every aggregation mode is a weighted sum over tokens, sum_t w_t l_t, whose weights depend only on the mask
(:func:`aggregation_weights`). So the kernel computes the loss and w_t dl_t/dx_t in one pass: the forward saves
that gradient and the backward only scales it. The statistics (clip fractions, approximate KL) come out of the
same pass as per-block partial sums.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import reference
from .._backend import resolve_backend
from .._utils import FP_FUSION, bool_mask, tl, triton

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| is clamped to this before the exponential

# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernels: one program per BLOCK tokens, each writing one row of partial sums.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _ppo_policy_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, grad_ptr, part_ptr, N, clip_low, clip_high, dual_clip,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    counted = w != 0.0
    lp = tl.load(lp_ptr + offs, mask=counted, other=0.0)
    old = tl.load(old_ptr + offs, mask=counted, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=counted, other=0.0)
    d = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(d, -20.0), 20.0))
    l1 = -adv * ratio
    l2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    clipped = l2 > l1
    loss = tl.where(clipped, l2, l1)
    cap = -adv * dual_clip
    lower = (dual_clip > 0.0) & (adv < 0.0) & (loss > cap)
    loss = tl.where(lower, cap, loss)
    g = tl.where(clipped | lower | (d > 20.0) | (d < -20.0), 0.0, l1)  # dl/dlp = -A r on the unclipped branch
    tl.store(grad_ptr + offs, tl.where(counted, w * g, 0.0), mask=offs < N)
    row = part_ptr + pid * 4
    tl.store(row, tl.sum(tl.where(counted, w * loss, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(counted & clipped, 1.0, 0.0), axis=0))
    tl.store(row + 2, tl.sum(tl.where(counted, -d, 0.0), axis=0))
    tl.store(row + 3, tl.sum(tl.where(counted & lower, 1.0, 0.0), axis=0))


@triton.jit
def _ppo_value_fwd_kernel(v_ptr, old_ptr, ret_ptr, w_ptr, grad_ptr, part_ptr, N, clip, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    counted = w != 0.0
    v = tl.load(v_ptr + offs, mask=counted, other=0.0)
    old = tl.load(old_ptr + offs, mask=counted, other=0.0)
    ret = tl.load(ret_ptr + offs, mask=counted, other=0.0)
    a = v - ret
    b = tl.minimum(tl.maximum(v, old - clip), old + clip) - ret
    clipped = b * b > a * a
    loss = 0.5 * tl.where(clipped, b * b, a * a)
    tl.store(grad_ptr + offs, tl.where(counted & ~clipped, w * a, 0.0), mask=offs < N)
    row = part_ptr + pid * 2
    tl.store(row, tl.sum(tl.where(counted, w * loss, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(counted & clipped, 1.0, 0.0), axis=0))


# ---------------------------------------------------------------------------------------------------------
# 2. Launchers and ops: every tensor (N,) fp32 contiguous. Returns (grad (N,), column sums (K,)).
# ---------------------------------------------------------------------------------------------------------

_BLOCK = 1024


def _policy_triton(lp, old, adv, w, clip_low, clip_high, dual_clip):
    n = lp.shape[0]
    grad = torch.empty_like(lp)
    programs = triton.cdiv(n, _BLOCK)
    partials = torch.zeros((max(programs, 1), 4), dtype=torch.float32, device=lp.device)
    if programs > 0:
        _ppo_policy_fwd_kernel[(programs,)](
            lp,
            old,
            adv,
            w,
            grad,
            partials,
            n,
            clip_low,
            clip_high,
            dual_clip,
            BLOCK=_BLOCK,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    return grad, partials


def _value_triton(v, old, ret, w, clip):
    n = v.shape[0]
    grad = torch.empty_like(v)
    programs = triton.cdiv(n, _BLOCK)
    partials = torch.zeros((max(programs, 1), 2), dtype=torch.float32, device=v.device)
    if programs > 0:
        _ppo_value_fwd_kernel[(programs,)](
            v, old, ret, w, grad, partials, n, clip, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION
        )
    return grad, partials


# The ops torch.ops.rlhf_kernels.ppo_policy_fwd / ppo_value_fwd (contract and fake in rlhf_kernels/_registry.py)
# run these for backend="triton", the compiled ops for "cpu" / "cuda".
def _check_tokens(op: str, **inputs: torch.Tensor) -> None:
    """The layout every backend requires (the compiled ops check the same): (N,) float32 contiguous, one N."""
    n = next(iter(inputs.values())).shape
    for name, x in inputs.items():
        if x.dim() != 1 or x.shape != n or x.dtype != torch.float32 or not x.is_contiguous():
            got = f"{x.dtype} {tuple(x.shape)} strides {x.stride()}"
            raise ValueError(f"{op}: {name} must be a contiguous float32 (N,) tensor like the others, got {got}")


def ppo_policy_fwd_triton(logprobs, old_logprobs, advantages, weight, clip_low, clip_high, dual_clip):
    """(N,) x4 fp32 -> (weight * dl/dlogprobs (N,), sums (4,)): the per-block partials added by one reduction."""
    _check_tokens("ppo_policy_fwd", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, weight=weight)
    grad, partials = _policy_triton(logprobs, old_logprobs, advantages, weight, clip_low, clip_high, dual_clip)
    return grad, partials.sum(0)


def ppo_value_fwd_triton(values, old_values, returns, weight, clip):
    """(N,) x4 fp32 -> (weight * dl/dvalues (N,), sums (2,)); ``clip`` may be inf (no clipping)."""
    _check_tokens("ppo_value_fwd", values=values, old_values=old_values, returns=returns, weight=weight)
    grad, partials = _value_triton(values, old_values, returns, weight, clip)
    return grad, partials.sum(0)


class PrecomputedGradFunction(torch.autograd.Function):
    """``loss`` (a 0-dim tensor computed without autograd) attached to ``x`` with d loss / dx = ``grad``: the
    backward of a loss whose gradient was computed in the forward pass, scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, x, loss, grad):
        ctx.save_for_backward(grad)
        ctx.dtype = x.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (
            (grad * grad_loss).to(ctx.dtype),  # x
            None,  # loss
            None,  # grad
        )


# ---------------------------------------------------------------------------------------------------------
# 3. Aggregation and the public API
# ---------------------------------------------------------------------------------------------------------


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


def _float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def check_token_inputs(shape_name: str, x: torch.Tensor, others: dict, mask: object) -> torch.Tensor:
    """Every tensor in ``others`` has the shape of ``x`` (..., T) or its leading shape (...) (a per-sequence
    value, broadcast over T), and lives on its device; returns ``mask`` as bool."""
    _float_tensor(shape_name, x)
    if x.dim() == 0:
        raise ValueError(f"{shape_name} must have at least one dimension (..., T), got a scalar")
    for name, y in others.items():
        _float_tensor(name, y)
        if y.shape != x.shape and y.shape != x.shape[:-1]:
            raise ValueError(
                f"{name} shape {tuple(y.shape)} must equal {shape_name} shape {tuple(x.shape)} (or its leading "
                f"shape {tuple(x.shape[:-1])} for one value per sequence)"
            )
        if y.device != x.device:
            raise ValueError(f"{name} is on {y.device} but {shape_name} is on {x.device}")
    return bool_mask(mask, x.shape, x.device)


def check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= float(clip_low) < 1.0:
        raise ValueError(f"clip_low must lie in [0, 1), got {clip_low}")
    if not 0.0 <= float(clip_high) < float("inf"):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high}")
    if dual_clip is not None and not 1.0 < float(dual_clip) < float("inf"):
        raise ValueError(f"dual_clip must be None or a finite number > 1, got {dual_clip}")


def tokens_fp32(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``x`` of ``shape`` (..., T) or its leading shape, detached, as a flat fp32 contiguous (N,) tensor."""
    x = x.detach()
    if x.shape != shape:
        x = x.unsqueeze(-1).expand(shape)
    return x.to(torch.float32).reshape(-1).contiguous()


def _ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp_min(1).to(torch.float32)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (https://arxiv.org/abs/1707.06347), with the optional dual clip of
    https://arxiv.org/abs/1912.09729, as one fused kernel.

    Args:
        logprobs: ``(..., T)`` log pi(y_t) under the current policy (differentiable), any float dtype.
        old_logprobs: ``(..., T)`` log-probs at sampling time; ``advantages``: ``(..., T)``, or ``(...)`` for one
            advantage per sequence (GRPO), broadcast over T. Both are constants (no gradient).
        mask: ``(..., T)`` bool or 0/1: the response tokens. Positions outside it are never read (may be NaN).
        clip_low, clip_high: ratio r = exp(clamp(logprobs - old_logprobs, -20, 20)) is clipped to
            [1 - clip_low, 1 + clip_high] (asymmetric clipping when they differ).
        dual_clip: ``c > 1``: for A < 0 the per-token loss is capped at -A c. ``None``: off.
        agg: ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` or
            ``"seq-mean-token-sum-norm"`` (see :func:`aggregate_loss`).
        normalizer: the denominator of the whole optimizer step (see :func:`aggregate_loss` and
            :func:`rlhf_kernels.aggregation_denominator`); ``None``: this batch's own.

    Per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), then aggregated. Returns ``(loss, stats)``:
    ``loss`` a 0-dim fp32 tensor (0 for a fully masked batch), differentiable with respect to ``logprobs``;
    ``stats`` detached 0-dim tensors: ``policy/clipfrac`` (fraction of masked tokens where the clipped term is
    the larger), ``policy/approxkl`` (masked mean of old_logprobs - logprobs), ``policy/clipfrac_lower``
    (fraction capped by the dual clip; 0 without it). The stats are means over this batch's masked tokens, whatever
    the ``normalizer``.
    """
    m = check_token_inputs("logprobs", logprobs, {"old_logprobs": old_logprobs, "advantages": advantages}, mask)
    check_clip(clip_low, clip_high, dual_clip)
    check_agg(agg)
    normalizer = check_normalizer(normalizer, logprobs.device)
    name = resolve_backend(backend, logprobs.device, "ppo_loss")
    if name == "reference":
        adv = advantages if advantages.shape == logprobs.shape else advantages.unsqueeze(-1).expand_as(logprobs)
        args = (clip_low, clip_high, dual_clip, agg, normalizer)
        return reference.ppo_policy_loss(logprobs, old_logprobs, adv, m, *args)
    shape = logprobs.shape
    w = aggregation_weights(m, agg, normalizer).reshape(-1)
    grad, sums = torch.ops.rlhf_kernels.ppo_policy_fwd(
        tokens_fp32(logprobs, shape), tokens_fp32(old_logprobs, shape), tokens_fp32(advantages, shape), w,
        float(clip_low), float(clip_high), float(dual_clip or 0.0), name,
    )  # fmt: skip
    loss = PrecomputedGradFunction.apply(logprobs, sums[0], grad.view(shape))
    count = m.sum()
    stats = {
        "policy/clipfrac": _ratio(sums[1], count),
        "policy/approxkl": _ratio(sums[2], count),
        "policy/clipfrac_lower": _ratio(sums[3], count),
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, as one fused kernel: per token 0.5 max((v - R)^2, (clip(v, old - c, old + c) - R)^2),
    aggregated by ``agg`` (see :func:`aggregate_loss`).

    Args:
        values: ``(..., T)`` current value predictions (differentiable); ``old_values``: ``(..., T)`` values at
            rollout time; ``returns``: ``(..., T)`` targets R. Any float dtype.
        mask: ``(..., T)`` bool or 0/1; positions outside it are never read.
        clip: c >= 0, or ``None`` for the plain squared error.
        normalizer: the denominator of the whole optimizer step (see :func:`aggregate_loss`); ``None``: this
            batch's own.

    Returns ``(loss, stats)``: fp32 0-dim ``loss`` (0 for a fully masked batch), differentiable with respect to
    ``values``; ``stats["val/clipfrac"]``: fraction of this batch's masked tokens where the clipped term is the
    larger (whatever the ``normalizer``).
    """
    m = check_token_inputs("values", values, {"old_values": old_values, "returns": returns}, mask)
    if clip is not None and not 0.0 <= float(clip) < float("inf"):
        raise ValueError(f"clip must be None or a finite number >= 0, got {clip}")
    check_agg(agg)
    normalizer = check_normalizer(normalizer, values.device)
    name = resolve_backend(backend, values.device, "ppo_loss")
    if name == "reference":
        old, ret = (x if x.shape == values.shape else x.unsqueeze(-1).expand_as(values) for x in (old_values, returns))
        return reference.ppo_value_loss(values, old, ret, m, clip, agg, normalizer)
    shape = values.shape
    w = aggregation_weights(m, agg, normalizer).reshape(-1)
    grad, sums = torch.ops.rlhf_kernels.ppo_value_fwd(
        tokens_fp32(values, shape), tokens_fp32(old_values, shape), tokens_fp32(returns, shape), w,
        float("inf") if clip is None else float(clip), name,
    )  # fmt: skip
    loss = PrecomputedGradFunction.apply(values, sums[0], grad.view(shape))
    return loss, {"val/clipfrac": _ratio(sums[1], m.sum())}
