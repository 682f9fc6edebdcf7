"""The PPO / GRPO policy loss straight from the last hidden states and the LM head, in one sweep.

Every term of the loss is a weighted sum over tokens whose weights depend only on the mask (see
:func:`rlhf_kernels.ops.ppo_loss.aggregation_weights`), so the gradient of each token's loss with respect to its
log-prob and entropy is known as soon as that token's log-prob is. Per chunk of tokens the forward therefore:
  1. computes the chunk's logits (GEMM 1),
  2. reads them once for log-prob, entropy and the softmax statistics (the log-prob kernel),
  3. evaluates the clipped surrogate with its gradient (the PPO kernel), plus the KL and entropy terms,
  4. turns those per-token gradients into logit gradients (the log-prob backward kernel),
  5. applies them: grad_hidden (GEMM 2) and grad_weight (GEMM 3, accumulated in fp32).
No chunk's logits are computed twice (the unfused path needs four GEMMs per chunk) and nothing of size
(tokens x vocab) outlives a chunk. Tokens outside the mask are left out of the GEMMs altogether. The backward
only scales the saved gradients by the incoming gradient.
"""

from __future__ import annotations

import torch

from .. import reference
from .._backend import resolve_backend
from .._utils import check_label_range, check_labels, check_temperature, require_none
from ._linear import (
    autocast_off,
    check_chunk_size,
    chunk_rows,
    detach_without_grad,
    linear_operands,
    run_chunks,
    save_linear_grads,
    scaled_linear_grads,
    select_rows,
    sequence_chunks,
    token_chunks,
)
from ._policy_inputs import (
    check_clip,
    check_is_weights,
    check_policy_mode,
    check_token_inputs,
    is_weight_stats,
    policy_stats,
    tokens_fp32,
)
from .aggregation import aggregation_weights, check_agg, check_normalizer
from .kl_penalty import check_kl_estimator, kl_penalty_and_grad

# Slots of the per-call totals: the weighted loss terms, then the counts and sums behind the statistics (the
# policy op's sums from _CLIP_LOW to _LOWER).
_PPO, _ENT, _KL, _CLIP_LOW, _CLIP_HIGH, _LOG_RATIO, _LOWER, _ENT_SUM, _KL_SUM, _MAX_DEV, _PG_COUNT = range(11)


class FusedLinearPPOLossFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) int64 (ignore_index where not counted), old,
    adv, ref | None, w, w_pg: (N,) fp32 (aggregation weights; times the importance weights) -> (loss (), totals
    (11,)) fp32. ``seq_lengths``: None (token ratios), or the rows of each sequence (rows laid out sequence by
    sequence) for the sequence-level ratios, whose chunks then hold whole sequences."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, old, adv, ref, w, w_pg, coefs, policy, estimator, inv_t, ignore,
                chunk, seq_lengths, be):  # fmt: skip
        kl_coef, entropy_coef = coefs
        no_offsets = torch.empty(0, dtype=torch.int64, device=hidden.device)

        def step(chunk_, logits, y, old_c, adv_c, w_c, w_pg_c, ref_c):  # logits (C, V), the rest (C,)
            counted = w_c != 0
            offsets = no_offsets if chunk_.info is None else chunk_.info
            lp, ent, row_max, log_norm = torch.ops.rlhf_kernels.logprobs_fwd(logits[None], y[None], inv_t, ignore, be)
            g_lp, sums = torch.ops.rlhf_kernels.ppo_policy_fwd(lp[0], old_c, adv_c, w_pg_c, offsets, *policy, be)
            kl, kl_sum = sums.new_zeros(()), sums.new_zeros(())
            if ref_c is not None:
                k, dk = kl_penalty_and_grad(lp[0] - ref_c, estimator)
                kl_sum = torch.where(counted, k, 0.0).sum()
                kl = torch.where(counted, w_c * k, 0.0).sum()
                if kl_coef != 0.0:
                    g_lp = g_lp + torch.where(counted, (kl_coef * w_c) * dk, 0.0)
            dev = torch.where(counted, (lp[0] - old_c).abs(), 0.0).max()
            # in the slot order; ent is 0 at tokens that do not count (their label is ignore_index)
            pg_count = (w_pg_c != 0).sum().to(torch.float32)
            totals = torch.stack((sums[0], (w_c * ent[0]).sum(), kl, *sums[1:], ent.sum(), kl_sum, dev, pg_count))
            g_ent = w_c * -entropy_coef
            args = (logits[None], y[None], g_lp[None], g_ent[None], row_max, log_norm, ent, inv_t, ignore, be)
            return torch.ops.rlhf_kernels.logprobs_bwd(*args)[0], totals  # (C, V), dtype of the logits

        if seq_lengths is None:
            chunks = token_chunks(hidden.shape[0], chunk)
        else:
            chunks = sequence_chunks(seq_lengths, chunk, hidden.device)
        inputs = (labels, old, adv, w, w_pg, ref)
        outs, grads = run_chunks(hidden, weight, bias, chunks, step, inputs, ctx.needs_input_grad[:3])
        save_linear_grads(ctx, grads)
        totals = torch.zeros(11, dtype=torch.float32, device=hidden.device)
        for part in outs:  # added in chunk order; the largest deviation is a maximum
            totals[:_MAX_DEV] += part[:_MAX_DEV]
            totals[_MAX_DEV] = torch.maximum(totals[_MAX_DEV], part[_MAX_DEV])
            totals[_PG_COUNT] += part[_PG_COUNT]
        ctx.mark_non_differentiable(totals)
        loss = totals[_PPO] + kl_coef * totals[_KL] - entropy_coef * totals[_ENT]
        return loss, totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_totals):
        grad_h, grad_w, grad_b = scaled_linear_grads(ctx, grad_loss)
        return (
            grad_h,  # hidden
            grad_w,  # weight
            grad_b,  # bias
            None,  # labels
            None,  # old
            None,  # adv
            None,  # ref
            None,  # w
            None,  # w_pg
            None,  # coefs
            None,  # policy
            None,  # estimator
            None,  # inv_t
            None,  # ignore
            None,  # chunk
            None,  # seq_lengths
            None,  # be
        )


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
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
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO / GRPO policy loss from the policy's last hidden states and LM head, gradients computed in one sweep.

    loss = agg(clipped surrogate) + kl_coef * agg(KL estimator ``kl_estimator`` against ``ref_logprobs``)
           - entropy_coef * agg(entropy),
    with log-probs and entropy of softmax((hidden @ weight.T + bias) / temperature) at ``labels``; each term as in
    :func:`rlhf_kernels.ppo_policy_loss`, :func:`rlhf_kernels.kl_penalty` and :func:`rlhf_kernels.aggregate_loss`.

    Args:
        hidden: ``(..., T, H)``; ``hidden[..., t, :]`` predicts ``labels[..., t]`` (shift inputs by one first).
        weight: ``(V, H)`` LM head; ``bias``: optional ``(V,)``; one float dtype.
        labels: ``(..., T)`` int: the sampled tokens. Values outside ``mask`` are not used.
        old_logprobs: ``(..., T)`` log-probs at sampling time. advantages: ``(..., T)`` per token (PPO), or
            ``(...)`` per sequence (GRPO), broadcast over the mask.
        mask: ``(..., T)`` bool or 0/1: the response tokens.
        ref_logprobs: ``(..., T)`` reference log-probs; required when ``kl_coef`` is non-zero (the KL-in-loss
            form of GRPO). kl_estimator: ``"k1"``, ``"abs"``, ``"k2"`` or ``"k3"``.
        clip_low, clip_high, dual_clip, loss_type, ratio_level, sapo_tau_pos, sapo_tau_neg, agg, normalizer: as in
            :func:`rlhf_kernels.ppo_policy_loss`; the ``normalizer`` (the denominator of the whole optimizer step)
            divides all three terms. With a sequence-level ratio the chunks hold whole sequences (a sequence
            longer than ``chunk_size`` is a chunk of its own).
        is_weights: ``(..., T)`` or ``(...)`` importance weights >= 0 multiplied into the surrogate term only (not
            the KL and entropy terms), as in :func:`rlhf_kernels.ppo_policy_loss`.
        chunk_size: tokens per chunk (default :func:`rlhf_kernels.ops._linear.default_chunk_size`).
        check: verify labels at masked positions lie in [0, V) (one host sync).

    Returns ``(loss, stats)``: 0-dim fp32 ``loss`` differentiable with respect to ``hidden``, ``weight`` and
    ``bias``; detached ``stats``: ``policy/clipfrac``, ``policy/clipfrac_low``, ``policy/clipfrac_high``,
    ``policy/approxkl``, ``policy/clipfrac_lower`` (over the tokens the surrogate counts, as in
    :func:`rlhf_kernels.ppo_policy_loss`; ``policy/is_weight_mean`` and ``policy/is_weight_zero_frac`` with
    ``is_weights``), ``policy/entropy`` (mean over masked tokens), ``policy/kl`` (mean ``kl_estimator`` estimate
    over masked tokens; only with ``ref_logprobs``) and ``policy/max_abs_log_ratio`` (largest
    |log pi - log pi_old| over masked tokens: 0 at the first mini-batch of an update when the rollout log-probs are
    reproduced exactly), all over this batch's tokens, whatever the ``normalizer``.

    The gradients are computed during the forward pass (three GEMMs per chunk, no recomputation) and saved;
    ``backward`` scales them by the incoming gradient, once (a second backward through the same graph, as with
    ``retain_graph=True``, sees the same saved gradients). grad_weight is accumulated in fp32 across chunks and
    saved in the weight's dtype.
    """
    hidden, weight, bias = linear_operands("hidden", hidden, "weight", weight, "bias", bias)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., T, H), got {tuple(hidden.shape)}")
    tok_shape = hidden.shape[:-1]
    check_labels(labels, tok_shape, hidden.device)
    others = {"old_logprobs": old_logprobs, "advantages": advantages}
    if ref_logprobs is not None:
        others["ref_logprobs"] = ref_logprobs
    m = check_token_inputs("old_logprobs", old_logprobs, others, mask)
    if old_logprobs.shape != tok_shape or (ref_logprobs is not None and ref_logprobs.shape != tok_shape):
        raise ValueError(
            f"old_logprobs and ref_logprobs must have the token shape {tuple(tok_shape)} of hidden (..., T, H)"
        )
    check_clip(clip_low, clip_high, dual_clip)
    codes = check_policy_mode(loss_type, ratio_level, dual_clip, sapo_tau_pos, sapo_tau_neg)
    c = check_is_weights(is_weights, tok_shape, hidden.device)
    check_agg(agg)
    normalizer = check_normalizer(normalizer, hidden.device)
    check_kl_estimator(kl_estimator)
    temperature = check_temperature(temperature)
    check_chunk_size(chunk_size)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef is non-zero but ref_logprobs is None: pass the reference log-probs")
    V, H = weight.shape
    y = torch.where(m, labels.to(torch.int64), ignore_index)  # tokens outside the mask are skipped by the kernels
    name = resolve_backend(backend, hidden.device, "logprobs")
    if check and not torch.compiler.is_compiling():
        check_label_range(y, V, ignore_index)
        require_none(
            m & (labels == ignore_index), f"mask selects a position whose label is ignore_index={ignore_index}"
        )
    if name == "reference":  # the reference takes (..., T) advantages: broadcast per-sequence ones (GRPO) first
        adv = advantages if advantages.shape == tok_shape else advantages.unsqueeze(-1).expand(tok_shape)
        with autocast_off(hidden.device):  # the dtype rule (linear_operands): the operands' dtype
            loss, stats = reference.fused_linear_ppo_loss(
                hidden, weight, y, old_logprobs, adv, m, bias, ref_logprobs, kl_coef, kl_estimator, entropy_coef,
                temperature, clip_low, clip_high, dual_clip, agg, ignore_index, normalizer, loss_type, ratio_level,
                sapo_tau_pos, sapo_tau_neg, c,
            )  # fmt: skip
        return loss, {**stats, **is_weight_stats(c, m)}
    old, adv = tokens_fp32(old_logprobs, tok_shape), tokens_fp32(advantages, tok_shape)
    ref = None if ref_logprobs is None else tokens_fp32(ref_logprobs, tok_shape)
    w = aggregation_weights(m, agg, normalizer)
    w_pg = (w if c is None else w * c).reshape(-1)
    w = w.reshape(-1)
    # GEMMs on the masked tokens only; autograd scatters grad_hidden back
    y = y.reshape(-1).contiguous()
    idx, h, y, old, adv, w, w_pg, ref = select_rows(m.reshape(-1), hidden.reshape(-1, H), y, old, adv, w, w_pg, ref)
    seq_lengths = None
    if codes[1] != 0:  # sequence-level ratios: chunks of whole sequences (rows stay sequence by sequence)
        T = tok_shape[-1]
        seq_lengths = [T] * (m.numel() // max(T, 1)) if idx is None else m.reshape(-1, T).sum(-1).tolist()
    chunk = chunk_rows(chunk_size, h.shape[0], weight)
    h, weight, bias = detach_without_grad(h, weight, bias)
    policy = (float(clip_low), float(clip_high), float(dual_clip or 0.0), *codes, float(sapo_tau_pos),
              float(sapo_tau_neg))  # fmt: skip
    loss, totals = FusedLinearPPOLossFunction.apply(
        h, weight, bias, y, old, adv, ref, w, w_pg, (float(kl_coef), float(entropy_coef)), policy,
        kl_estimator, 1.0 / temperature, int(ignore_index), chunk, seq_lengths, name,
    )  # fmt: skip
    count = m.sum().clamp_min(1).to(torch.float32)
    stats = {
        **policy_stats(totals[[_PPO, _CLIP_LOW, _CLIP_HIGH, _LOG_RATIO, _LOWER]], totals[_PG_COUNT]),
        "policy/entropy": totals[_ENT_SUM] / count,
        "policy/max_abs_log_ratio": totals[_MAX_DEV],
        **is_weight_stats(c, m),
    }
    if ref is not None:
        stats["policy/kl"] = totals[_KL_SUM] / count
    return loss, stats
