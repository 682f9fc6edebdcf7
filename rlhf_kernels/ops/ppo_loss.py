"""PPO policy and value losses, each one fused kernel that returns the loss terms and their gradient together.

Per token (counted where the aggregation weight w is non-zero), with d = logprobs - old_logprobs:
    policy:  r = exp(clamp(d, -20, 20)),  l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)),
             capped at -A c for A < 0 under a dual clip c > 1; or the CISPO / SAPO losses, and r at the level of
             the sequence (GSPO): the op table's ppo_policy_fwd (rlhf_kernels/_registry.py) has every formula;
    value:   l = 0.5 max((v - R)^2, (clip(v, old - c, old + c) - R)^2).
Every aggregation mode is a weighted sum over tokens, sum_t w_t l_t, whose weights depend only on the mask
(:func:`aggregation_weights`). So the kernel computes the loss and w_t dl_t/dx_t in one pass: the forward saves
that gradient and the backward only scales it. The statistics (clip fractions, approximate KL) come out of the
same pass as per-block partial sums.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from .._backend import resolve_backend
from .._utils import FP_FUSION, tl, triton
from ._policy_inputs import (
    _ratio,
    check_clip,
    check_is_weights,
    check_policy_mode,
    check_token_inputs,
    is_weight_stats,
    policy_stats,
    sequence_offsets,
    tokens_fp32,
)
from .aggregation import aggregation_weights, check_agg, check_normalizer

LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_old| is clamped to this before the exponential

# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernels: one program per BLOCK tokens, each writing one row of partial sums.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _policy_terms(lp, adv, x, lo, hi, dual_clip, tau_pos, tau_neg, LOSS_TYPE: tl.constexpr):
    """Per token, from the log-ratio x of its ratio rho: (loss l, q = dl/dlog rho, e = dl/dlogprobs at fixed rho,
    clip-low, clip-high, lower) of the op table's loss_type."""
    saturated = (x > 20.0) | (x < -20.0)  # the clamp is flat there: no gradient through rho
    rho = tl.exp(tl.minimum(tl.maximum(x, -20.0), 20.0))
    zero = tl.zeros_like(rho)
    lower = zero != zero
    if LOSS_TYPE == 0:  # clip (PPO), with the dual clip
        l1 = -adv * rho
        l2 = -adv * tl.minimum(tl.maximum(rho, lo), hi)
        clipped = l2 > l1
        loss = tl.where(clipped, l2, l1)
        cap = -adv * dual_clip
        lower = (dual_clip > 0.0) & (adv < 0.0) & (loss > cap)
        loss = tl.where(lower, cap, loss)
        q = tl.where(clipped | lower | saturated, 0.0, l1)
        e = zero
        low, high = clipped & (adv < 0.0), clipped & (adv > 0.0)
    elif LOSS_TYPE == 1:  # cispo: the clipped ratio is a constant weight on -A logprobs
        e = -tl.minimum(tl.maximum(rho, lo), hi) * adv
        loss = e * lp
        q = zero
        low, high = rho < lo, rho > hi
    else:  # sapo: a sigmoid gate in place of the hard clip
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        g = tl.sigmoid(tau * (rho - 1.0))
        loss = -g * (4.0 / tau) * adv
        q = tl.where(saturated, 0.0, -4.0 * adv * g * (1.0 - g) * rho)
        e = zero
        low, high = (adv < 0.0) & (rho < lo), (adv > 0.0) & (rho > hi)
    return loss, q, e, low, high, lower


@triton.jit
def _store_policy_partials(row, counted, w, loss, low, high, d, lower):
    tl.store(row, tl.sum(tl.where(counted, w * loss, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(counted & low, 1.0, 0.0), axis=0))
    tl.store(row + 2, tl.sum(tl.where(counted & high, 1.0, 0.0), axis=0))
    tl.store(row + 3, tl.sum(tl.where(counted, -d, 0.0), axis=0))
    tl.store(row + 4, tl.sum(tl.where(counted & lower, 1.0, 0.0), axis=0))


@triton.jit
def _ppo_policy_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, grad_ptr, part_ptr, N, lo, hi, dual_clip, tau_pos, tau_neg,
    LOSS_TYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """ratio_level 0 (and 2, whose x the caller gives per token): one program per BLOCK tokens, one partials row."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < N, other=0.0)
    counted = w != 0.0
    lp = tl.load(lp_ptr + offs, mask=counted, other=0.0)
    old = tl.load(old_ptr + offs, mask=counted, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=counted, other=0.0)
    d = lp - old
    loss, q, e, low, high, lower = _policy_terms(lp, adv, d, lo, hi, dual_clip, tau_pos, tau_neg, LOSS_TYPE)
    tl.store(grad_ptr + offs, tl.where(counted, w * (q + e), 0.0), mask=offs < N)
    _store_policy_partials(part_ptr + pid * 5, counted, w, loss, low, high, d, lower)


@triton.jit
def _ppo_policy_seq_kernel(
    lp_ptr, old_ptr, adv_ptr, w_ptr, off_ptr, grad_ptr, part_ptr, N, lo, hi, dual_clip, tau_pos, tau_neg,
    LOSS_TYPE: tl.constexpr, LEVEL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """ratio_level 1 / 2: one program per sequence, three sweeps over its tokens (the mean log-ratio; the terms and
    the sum of weight * q; for level 1 the gradients with that sum). Offsets are clamped into [0, N]."""
    s = tl.program_id(0).to(tl.int64)
    begin = tl.minimum(tl.maximum(tl.load(off_ptr + s), 0), N)
    end = tl.maximum(tl.minimum(tl.maximum(tl.load(off_ptr + s + 1), 0), N), begin)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offs, mask=offs < end, other=0.0)
        counted = w != 0.0
        d = tl.load(lp_ptr + offs, mask=counted, other=0.0) - tl.load(old_ptr + offs, mask=counted, other=0.0)
        total += tl.where(counted, d.to(tl.float64), 0.0)
        count += counted.to(tl.int32)
    n = tl.sum(count, axis=0)
    n64 = tl.maximum(n, 1).to(tl.float64)
    x_seq = (tl.sum(total, axis=0) / n64).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float64)  # weight * loss
    wq = tl.zeros([BLOCK], dtype=tl.float64)  # weight * q (level 1)
    n_low = tl.zeros([BLOCK], dtype=tl.int32)
    n_high = tl.zeros([BLOCK], dtype=tl.int32)
    n_lower = tl.zeros([BLOCK], dtype=tl.int32)
    neg_d = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offs, mask=offs < end, other=0.0)
        counted = w != 0.0
        lp = tl.load(lp_ptr + offs, mask=counted, other=0.0)
        d = lp - tl.load(old_ptr + offs, mask=counted, other=0.0)
        adv = tl.load(adv_ptr + offs, mask=counted, other=0.0)
        x = tl.zeros_like(d) + x_seq
        loss, q, e, low, high, lower = _policy_terms(lp, adv, x, lo, hi, dual_clip, tau_pos, tau_neg, LOSS_TYPE)
        acc += tl.where(counted, (w * loss).to(tl.float64), 0.0)
        wq += tl.where(counted, (w * q).to(tl.float64), 0.0)
        n_low += (counted & low).to(tl.int32)
        n_high += (counted & high).to(tl.int32)
        n_lower += (counted & lower).to(tl.int32)
        neg_d += tl.where(counted, -d.to(tl.float64), 0.0)
        if LEVEL == 2:  # GSPO-token: each token's log-prob moves its own ratio
            tl.store(grad_ptr + offs, tl.where(counted, w * (q + e), 0.0), mask=offs < end)
    row = part_ptr + s * 5
    tl.store(row, tl.sum(acc, axis=0).to(tl.float32))
    tl.store(row + 1, tl.sum(n_low, axis=0).to(tl.float32))
    tl.store(row + 2, tl.sum(n_high, axis=0).to(tl.float32))
    tl.store(row + 3, tl.sum(neg_d, axis=0).to(tl.float32))
    tl.store(row + 4, tl.sum(n_lower, axis=0).to(tl.float32))
    if LEVEL == 1:  # GSPO: every counted log-prob moves the sequence's ratio by 1 / n
        g_seq = (tl.sum(wq, axis=0) / n64).to(tl.float32)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            w = tl.load(w_ptr + offs, mask=offs < end, other=0.0)
            counted = w != 0.0
            lp = tl.load(lp_ptr + offs, mask=counted, other=0.0)
            adv = tl.load(adv_ptr + offs, mask=counted, other=0.0)
            x = tl.zeros_like(lp) + x_seq
            _, _, e, _, _, _ = _policy_terms(lp, adv, x, lo, hi, dual_clip, tau_pos, tau_neg, LOSS_TYPE)
            tl.store(grad_ptr + offs, tl.where(counted, w * e + g_seq, 0.0), mask=offs < end)


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
_SEQ_BLOCK = 256  # tokens per sweep step of the per-sequence kernel


def _policy_triton(lp, old, adv, w, offsets, lo, hi, dual_clip, loss_type, ratio_level, tau_pos, tau_neg):
    n = lp.shape[0]
    grad = torch.empty_like(lp)
    consts = (lo, hi, dual_clip, tau_pos, tau_neg)
    if ratio_level == 0:
        programs = triton.cdiv(n, _BLOCK)
        partials = torch.zeros((max(programs, 1), 5), dtype=torch.float32, device=lp.device)
        if programs > 0:
            _ppo_policy_fwd_kernel[(programs,)](
                lp, old, adv, w, grad, partials, n, *consts,
                LOSS_TYPE=loss_type, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip
        return grad, partials
    grad.zero_()  # every token lies in one sequence (offsets checked on the CPU; clamped by the kernel elsewhere)
    n_seq = offsets.shape[0] - 1
    partials = torch.zeros((max(n_seq, 1), 5), dtype=torch.float32, device=lp.device)
    if n_seq > 0:
        _ppo_policy_seq_kernel[(n_seq,)](
            lp, old, adv, w, offsets, grad, partials, n, *consts,
            LOSS_TYPE=loss_type, LEVEL=ratio_level, BLOCK=_SEQ_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
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


def _check_policy_args(n, seq_offsets, clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos, tau_neg):
    """The checks of the compiled op (csrc/ppo_loss_checks.h), for the Triton launcher."""
    op = "ppo_policy_fwd"
    if loss_type not in (0, 1, 2):
        raise ValueError(f"{op}: loss_type must be 0 (clip), 1 (cispo) or 2 (sapo), got {loss_type}")
    if ratio_level not in (0, 1, 2):
        raise ValueError(f"{op}: ratio_level must be 0 (token), 1 (sequence) or 2 (sequence_token), got {ratio_level}")
    if not (math.isfinite(clip_low) and clip_low >= 0 and math.isfinite(clip_high) and clip_high >= 0):
        raise ValueError(f"{op}: clip_low and clip_high must be finite and >= 0, got {clip_low}, {clip_high}")
    if dual_clip != 0.0 and (loss_type != 0 or not (math.isfinite(dual_clip) and dual_clip > 1.0)):
        need = "0 (off) or, with loss_type 0 (clip), a finite value > 1"
        raise ValueError(f"{op}: dual_clip must be {need}, got {dual_clip}")
    if not (math.isfinite(tau_pos) and tau_pos > 0 and math.isfinite(tau_neg) and tau_neg > 0):
        raise ValueError(f"{op}: tau_pos and tau_neg must be finite and > 0, got {tau_pos}, {tau_neg}")
    if seq_offsets.dtype != torch.int64 or seq_offsets.dim() != 1 or not seq_offsets.is_contiguous():
        raise ValueError(f"{op}: seq_offsets must be a contiguous int64 (S + 1,) tensor, got {seq_offsets.dtype} "
                         f"{tuple(seq_offsets.shape)}")  # fmt: skip
    if ratio_level != 0:
        if seq_offsets.shape[0] < 1:
            raise ValueError(f"{op}: seq_offsets must hold S + 1 >= 1 entries for ratio_level {ratio_level}")
        if seq_offsets.device.type == "cpu":  # on an accelerator the kernel clamps them instead of a host sync
            o = seq_offsets
            if o[0] != 0 or o[-1] != n or bool((o[1:] < o[:-1]).any()):
                raise ValueError(f"{op}: seq_offsets must start at 0, end at N = {n} and never decrease")


def ppo_policy_fwd_triton(logprobs, old_logprobs, advantages, weight, seq_offsets, clip_low, clip_high, dual_clip,
                          loss_type, ratio_level, tau_pos, tau_neg):  # fmt: skip
    """(N,) x4 fp32 and the (S + 1,) sequence offsets -> (weight * dl/dlogprobs (N,), sums (5,)): the per-block (or
    per-sequence) partials added in fp64 by one reduction."""
    _check_tokens("ppo_policy_fwd", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, weight=weight)
    if seq_offsets.device != logprobs.device:
        raise ValueError(f"ppo_policy_fwd: seq_offsets is on {seq_offsets.device}, the tokens on {logprobs.device}")
    n = logprobs.shape[0]
    args = (clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos, tau_neg)
    _check_policy_args(n, seq_offsets, *args)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high  # formed in fp64, rounded once to fp32 at the launch
    grad, partials = _policy_triton(
        logprobs, old_logprobs, advantages, weight, seq_offsets, lo, hi, dual_clip, loss_type, ratio_level,
        tau_pos, tau_neg,
    )  # fmt: skip
    return grad, partials.sum(0, dtype=torch.float64).to(torch.float32)


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


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    loss_type: str = "clip",
    ratio_level: str = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    is_weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO-family policy loss (PPO's clipped surrogate, https://arxiv.org/abs/1707.06347, and its variants) as
    one fused kernel.

    Args:
        logprobs: ``(..., T)`` log pi(y_t) under the current policy (differentiable), any float dtype.
        old_logprobs: ``(..., T)`` log-probs at sampling time; ``advantages``: ``(..., T)``, or ``(...)`` for one
            advantage per sequence (GRPO), broadcast over T. Both are constants (no gradient).
        mask: ``(..., T)`` bool or 0/1: the response tokens. Positions outside it are never read (may be NaN).
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (asymmetric when they differ).
        dual_clip: ``c > 1``: for A < 0 the per-token loss is capped at -A c (https://arxiv.org/abs/1912.09729).
            ``None``: off. Only with ``loss_type="clip"``.
        loss_type: ``"clip"``: max(-A r, -A clip(r)); ``"cispo"`` (https://arxiv.org/abs/2506.13585):
            -sg(clip(r)) A log pi, the clipped ratio a constant weight, so clipped tokens keep a gradient (run it
            with a wide range, e.g. clip_high of a few units); ``"sapo"``: the soft gate -sigmoid(tau (r - 1)) 4 / tau
            A, tau = ``sapo_tau_pos`` for A > 0 and ``sapo_tau_neg`` otherwise (its gradient at r = 1 is PPO's).
        ratio_level: ``"token"``: r = exp(log pi - log pi_old) per token; ``"sequence"`` (GSPO,
            https://arxiv.org/abs/2507.18071): every token of a sequence uses s = exp(mean of the sequence's masked
            log-ratios), clipped at the sequence level (each token's own advantage applies); ``"sequence_token"``
            (GSPO-token): the value s, with each token's gradient through its own log-prob (sg[s] pi / sg[pi]).
            The log-ratio is clamped to [-20, 20] before the exponential (no gradient beyond).
        is_weights: ``(..., T)`` or ``(...)`` per-token (or per-sequence) importance weights >= 0, constants,
            multiplied into the per-token loss (the sampler-trainer correction). A weight of 0 drops the token (and
            leaves it out of its sequence's mean log-ratio); the aggregation denominators are the mask's.
        agg: ``"token-mean"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-mean"`` or
            ``"seq-mean-token-sum-norm"`` (see :func:`aggregate_loss`).
        normalizer: the denominator of the whole optimizer step (see :func:`aggregate_loss` and
            :func:`rlhf_kernels.aggregation_denominator`); ``None``: this batch's own.

    Returns ``(loss, stats)``: ``loss`` a 0-dim fp32 tensor (0 for a fully masked batch), differentiable with
    respect to ``logprobs``; ``stats`` detached 0-dim tensors, means over the tokens that count (masked, non-zero
    importance weight), whatever the ``normalizer``: ``policy/clipfrac_low`` and ``policy/clipfrac_high`` (tokens
    where the clip acts: ratio below 1 - clip_low with A < 0, above 1 + clip_high with A > 0; for ``"cispo"``
    wherever the ratio leaves the range, whatever A; for ``"sapo"`` where the hard clip would act),
    ``policy/clipfrac`` (their sum), ``policy/approxkl`` (mean of old_logprobs - logprobs),
    ``policy/clipfrac_lower`` (capped by the dual clip; 0 without it); with ``is_weights`` also
    ``policy/is_weight_mean`` and ``policy/is_weight_zero_frac`` over the mask.
    """
    m = check_token_inputs("logprobs", logprobs, {"old_logprobs": old_logprobs, "advantages": advantages}, mask)
    check_clip(clip_low, clip_high, dual_clip)
    codes = check_policy_mode(loss_type, ratio_level, dual_clip, sapo_tau_pos, sapo_tau_neg)
    check_agg(agg)
    normalizer = check_normalizer(normalizer, logprobs.device)
    shape = logprobs.shape
    c = check_is_weights(is_weights, shape, logprobs.device)
    name = resolve_backend(backend, logprobs.device, "ppo_loss")
    if name == "reference":
        adv = advantages if advantages.shape == shape else advantages.unsqueeze(-1).expand_as(logprobs)
        loss, stats = reference.ppo_policy_loss(
            logprobs, old_logprobs, adv, m, clip_low, clip_high, dual_clip, agg, normalizer,
            loss_type, ratio_level, sapo_tau_pos, sapo_tau_neg, c,
        )  # fmt: skip
        return loss, {**stats, **is_weight_stats(c, m)}
    w = aggregation_weights(m, agg, normalizer)
    w = (w if c is None else w * c).reshape(-1)
    offsets = sequence_offsets(shape if codes[1] != 0 else shape[:0], logprobs.device)
    grad, sums = torch.ops.rlhf_kernels.ppo_policy_fwd(
        tokens_fp32(logprobs, shape), tokens_fp32(old_logprobs, shape), tokens_fp32(advantages, shape), w, offsets,
        float(clip_low), float(clip_high), float(dual_clip or 0.0), *codes, float(sapo_tau_pos), float(sapo_tau_neg),
        name,
    )  # fmt: skip
    loss = PrecomputedGradFunction.apply(logprobs, sums[0], grad.view(shape))
    return loss, {**policy_stats(sums, (w != 0).sum()), **is_weight_stats(c, m)}


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
