"""DPO-family losses straight from the last hidden states and the LM head, gradients computed in one sweep.

The batch loss is the mean of per-pair losses, and a pair's loss depends only on its own two sequences. So the
forward runs over chunks of whole pairs: per chunk it computes the logits of the pairs' response tokens
(GEMM 1), their log-probs (the log-prob kernel), the sequence log-probs and the pair losses with their gradient
(a few ops on per-pair scalars), the logit gradients (the log-prob backward kernel) and the gradients of hidden
and weight (GEMMs 2 and 3). Three GEMMs per chunk and nothing recomputed, where computing the sequence
log-probs first and the loss after needs the logits twice. Prompt and padding tokens never enter a GEMM.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._utils import check_label_range, check_labels, require_none
from ._linear import (
    Chunk,
    check_chunk_size,
    chunk_rows,
    detach_without_grad,
    group_ranges,
    linear_operands,
    run_chunks,
    save_linear_grads,
    scaled_linear_grads,
)
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


def pair_chunks(counts: list[int], pairs: int, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges [p0, p1) of pairs whose response tokens (chosen + rejected, from ``counts`` (2B,))
    add up to at most ``budget``, except that a pair larger than the budget forms a chunk of its own."""
    return group_ranges([counts[p] + counts[pairs + p] for p in range(pairs)], budget)


def _pair_token_chunks(keep: torch.Tensor, pairs: int, T: int, budget: int) -> list[Chunk]:
    """Chunks of whole pairs (:func:`pair_chunks`) over the response tokens (``keep`` (2B * T,) bool): each
    chunk's rows are its pairs' tokens, sequence by sequence (the n chosen responses, then the n rejected ones),
    and its info (p0, p1, the 2n sequence lengths). One host sync, to cut the batch."""
    idx = keep.nonzero().squeeze(1)  # response tokens, sorted: sequence by sequence
    counts = keep.view(2 * pairs, T).sum(1)
    host_counts = counts.tolist()
    starts = [0]
    for c in host_counts:
        starts.append(starts[-1] + c)
    chunks = []
    for p0, p1 in pair_chunks(host_counts, pairs, budget):
        tok = torch.cat((idx[starts[p0] : starts[p1]], idx[starts[pairs + p0] : starts[pairs + p1]]))
        lengths = torch.cat((counts[p0:p1], counts[pairs + p0 : pairs + p1]))  # (2n,)
        chunks.append(Chunk(tok, (p0, p1, lengths)))
    return chunks


class FusedLinearDPOLossFunction(torch.autograd.Function):
    """hidden (2B * T, H), weight (V, H), bias | None, labels (2B * T,) int64, ref_c / ref_r (B,) fp32 ->
    (loss (), sequence log-probs (2B,) fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_c, ref_r, norm, T, options, average, ignore, budget, backend):
        beta, loss_type, eps, gamma = options
        pairs = ref_c.shape[0]
        chunks = _pair_token_chunks(labels != ignore, pairs, T, budget)

        def step(chunk, logits, y):  # logits (C, V), y (C,) -> grad_logits, (chunk loss, sequence log-probs (2n,))
            p0, p1, lengths = chunk.info
            n = p1 - p0
            lp, ent, row_max, log_norm = torch.ops.rlhf_kernels.logprobs_fwd(
                logits[None], y[None], 1.0, ignore, backend
            )
            s = torch.segment_reduce(lp[0], "sum", lengths=lengths)  # (2n,), deterministic (no atomics)
            if average:
                s = s / lengths.clamp_min(1).to(s.dtype)
            with torch.enable_grad():  # the pair losses and their gradient with respect to the chunk's 2n values
                leaf = s.detach().requires_grad_()
                chunk_loss = pair_losses(leaf[:n] - ref_c[p0:p1], leaf[n:] - ref_r[p0:p1], beta, loss_type, eps, gamma)
                chunk_loss = chunk_loss.sum() / (pairs if norm is None else norm)
                (g_seq,) = torch.autograd.grad(chunk_loss, leaf)
            if average:
                g_seq = g_seq / lengths.clamp_min(1).to(g_seq.dtype)
            g_lp = g_seq.repeat_interleave(lengths, output_size=y.numel()).unsqueeze(0)  # every token of a sequence
            args = (logits[None], y[None], g_lp, torch.zeros_like(g_lp), row_max, log_norm, ent, 1.0, ignore, backend)
            return torch.ops.rlhf_kernels.logprobs_bwd(*args)[0], (chunk_loss.detach(), s)  # (C, V), logits dtype

        outs, grads = run_chunks(hidden, weight, bias, chunks, step, (labels,), ctx.needs_input_grad[:3])
        save_linear_grads(ctx, grads)
        seq = torch.zeros(2 * pairs, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for chunk, (chunk_loss, s) in zip(chunks, outs):
            p0, p1, _ = chunk.info
            loss += chunk_loss
            seq[p0:p1], seq[pairs + p0 : pairs + p1] = s[: p1 - p0], s[p1 - p0 :]
        ctx.mark_non_differentiable(seq)
        return loss, seq

    @staticmethod
    def backward(ctx, grad_loss, _grad_seq):
        grad_h, grad_w, grad_b = scaled_linear_grads(ctx, grad_loss)
        return (
            grad_h,  # hidden
            grad_w,  # weight
            grad_b,  # bias
            None,  # labels
            None,  # ref_c
            None,  # ref_r
            None,  # norm
            None,  # T
            None,  # options
            None,  # average
            None,  # ignore
            None,  # budget
            None,  # backend
        )


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
    (S, T, H), V, B = hidden.shape, weight.shape[0], hidden.shape[0] // 2
    no_ref = dpo_options.get("reference_free", False) or loss_type in REFERENCE_FREE_LOSS_TYPES
    rc, rr = reference_logps(
        ref_chosen_logps, ref_rejected_logps, hidden.new_empty(B, dtype=torch.float32), no_ref, torch.float32
    )
    compiling = torch.compiler.is_compiling()
    if check and not compiling:
        check_label_range(labels, V, ignore_index)
        empty = (labels != ignore_index).sum(-1) == 0  # (2B,)
        require_none(
            empty,
            f"a sequence of labels has no response token (all {ignore_index}); a DPO pair needs a non-empty "
            "chosen and rejected response.",
            lambda: f" Sequence {int(empty.nonzero()[0, 0])} ({int(empty.sum())} such sequences).",
        )
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
    loss, seq = FusedLinearDPOLossFunction.apply(
        hidden.reshape(S * T, H), weight, bias, labels.reshape(-1).to(torch.int64), rc, rr,
        None if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device), T,
        (float(beta), loss_type, float(eps), float(gamma)), bool(average_log_prob), int(ignore_index), budget, name,
    )  # fmt: skip
    return loss, dpo_stats(seq[:B], seq[B:], rc, rr, beta)
