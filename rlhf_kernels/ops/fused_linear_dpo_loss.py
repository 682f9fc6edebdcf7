"""DPO-family losses straight from the last hidden states and the LM head, gradients computed in one sweep.

The batch loss is the mean of per-pair losses, and a pair's loss depends only on its own two sequences. So the
forward runs over chunks of whole pairs (:mod:`._sequence_loss`, units of two sequences): per chunk the logits
of the pairs' response tokens, their log-probs, the sequence log-probs and the pair losses with their gradient,
the logit gradients and the gradients of hidden and weight. Three GEMMs per chunk and nothing recomputed, where
computing the sequence log-probs first and the loss after needs the logits twice. Prompt and padding tokens
never enter a GEMM.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._utils import check_labels
from ._linear import check_chunk_size, chunk_rows, detach_without_grad, linear_operands
from ._sequence_loss import check_responses, fused_sequence_loss
from .aggregation import check_normalizer
from .dpo_loss import (
    AVERAGED_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    check_dpo_options,
    dpo_loss,
    dpo_stats,
    pair_losses,
    reference_logps,
    sequence_logps,
)
from .fused_linear_logprobs import fused_linear_logprobs

_DPO_OPTIONS = ("beta", "loss_type", "label_smoothing", "gamma", "reference_free")


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
    normalizer: float | torch.Tensor | None = None,
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
        weight: ``(V, H)`` LM head; ``bias``: optional ``(V,)``; one float dtype.
        labels: ``(2B, T)`` int: the response tokens, ``ignore_index`` on prompt and padding.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` precomputed reference sequence log-probs, summed or
            averaged the same way as the policy's.
        average_log_prob: average the token log-probs over each response instead of summing them. ``None``
            (default): what the loss type is defined on (averaged for ``"ipo"`` and ``"simpo"``, summed otherwise).
        normalizer: the number of pairs in the whole optimizer step, as in :func:`rlhf_kernels.dpo_loss`.
        chunk_size: response tokens per chunk (default :func:`rlhf_kernels.ops._linear.default_chunk_size`);
            chunks hold whole pairs, so a pair longer than this is a chunk of its own.
        dpo_options: ``beta``, ``loss_type``, ``label_smoothing``, ``gamma``, ``reference_free`` as in
            :func:`rlhf_kernels.dpo_loss`.
        check: verify labels (each in [0, V) or ``ignore_index``, and at least one response token per sequence);
            one host sync. Finding the response tokens costs one more.

    Returns ``(loss, stats)`` as :func:`rlhf_kernels.dpo_loss`, equal to ``dpo_loss`` applied to the sums (or
    means) of :func:`rlhf_kernels.fused_linear_logprobs`. Gradients flow to ``hidden``, ``weight`` and ``bias``;
    they are computed during the forward (three GEMMs per chunk of pairs) and the backward only scales them.
    Under ``torch.compile``, or with ``backend="reference"``, the unfused composition runs instead.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(
            f"hidden must be (2B, T, H) with the chosen sequences first, got {getattr(hidden, 'shape', hidden)}"
        )
    hidden, weight, bias = linear_operands("hidden", hidden, "weight", weight, "bias", bias)
    check_labels(labels, hidden.shape[:-1], hidden.device)
    check_chunk_size(chunk_size)
    unknown = set(dpo_options) - set(_DPO_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; DPO options are {', '.join(_DPO_OPTIONS)}")
    beta, loss_type = dpo_options.get("beta", 0.1), dpo_options.get("loss_type", "sigmoid")
    eps, gamma = dpo_options.get("label_smoothing", 0.0), dpo_options.get("gamma", 0.0)
    check_dpo_options(beta, loss_type, eps, gamma)
    normalizer = check_normalizer(normalizer, hidden.device)
    (S, T, _), V, B = hidden.shape, weight.shape[0], hidden.shape[0] // 2
    no_ref = dpo_options.get("reference_free", False) or loss_type in REFERENCE_FREE_LOSS_TYPES
    rc, rr = reference_logps(
        ref_chosen_logps, ref_rejected_logps, hidden.new_empty(B, dtype=torch.float32), no_ref, torch.float32
    )
    compiling = torch.compiler.is_compiling()
    if check and not compiling:
        check_responses(labels, V, ignore_index, "a DPO pair needs a non-empty chosen and rejected response")
    if average_log_prob is None:
        average_log_prob = loss_type in AVERAGED_LOSS_TYPES
    name = resolve_backend(backend, hidden.device, "logprobs")
    if name == "reference" or compiling:
        token_lp = fused_linear_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, backend=name,
            check=False,
        )  # (2B, T) fp32  # fmt: skip
        seq = sequence_logps(token_lp, labels, ignore_index, average_log_prob)
        return dpo_loss(seq[:B], seq[B:], ref_chosen_logps, ref_rejected_logps, normalizer=normalizer, **dpo_options)
    budget = chunk_rows(chunk_size, S * T, weight)
    hidden, weight, bias = detach_without_grad(hidden, weight, bias)
    denominator = B if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
    eps = float(eps)

    def unit_loss(s, p0, p1):  # s: the chunk's n chosen then n rejected sequence log-probs
        n = p1 - p0
        return pair_losses(s[:n] - rc[p0:p1], s[n:] - rr[p0:p1], float(beta), loss_type, eps, float(gamma)).sum() / (
            denominator
        )

    loss, seq = fused_sequence_loss(
        hidden, weight, bias, labels, width=2, unit_loss=unit_loss, average=average_log_prob,
        ignore_index=ignore_index, budget=budget, backend=name,
    )  # fmt: skip
    return loss, dpo_stats(seq[:B], seq[B:], rc, rr, beta)
