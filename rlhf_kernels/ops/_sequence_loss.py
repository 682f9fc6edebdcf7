"""Losses on sequence log-probs straight from hidden states: the shared fused-linear machinery of DPO and KTO.

The sequences form U units of w sequences each (a DPO pair: w = 2, the chosen sequence u and the rejected one
U + u; a KTO example: w = 1); sequence k * U + u is member k of unit u. The loss is a sum over units of a term that
depends only on the unit's own sequence log-probs, so the forward runs over chunks of whole units: per chunk the
logits of the units' response tokens (GEMM 1), their log-probs (the log-prob kernel), the sequence log-probs, the
chunk's loss and its gradient with respect to those (a few ops on per-sequence scalars), the logit gradients (the
log-prob backward kernel) and the gradients of hidden and weight (GEMMs 2 and 3). Three GEMMs per chunk, nothing
recomputed; prompt and padding tokens never enter a GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._utils import check_label_range, require_none
from ._linear import Chunk, group_ranges, run_chunks, save_linear_grads, scaled_linear_grads


def check_responses(labels: torch.Tensor, vocab: int, ignore_index: int, what: str) -> None:
    """Each label in [0, ``vocab``) or ``ignore_index``, and every sequence (row of ``labels``) with at least one
    response token; ``what`` ends the error (why a sequence needs one). One host sync each."""
    check_label_range(labels, vocab, ignore_index)
    empty = (labels != ignore_index).sum(-1) == 0
    require_none(
        empty,
        f"a sequence of labels has no response token (all {ignore_index}); {what}.",
        lambda: f" Sequence {int(empty.nonzero()[0, 0])} ({int(empty.sum())} such sequences).",
    )


def unit_chunks(keep: torch.Tensor, units: int, width: int, T: int, budget: int) -> list[Chunk]:
    """Chunks of whole units over the response tokens (``keep`` (S * T,) bool, S = units * width): consecutive
    units whose tokens add up to at most ``budget`` (a larger unit is a chunk of its own). A chunk's rows are its
    sequences' tokens, member-major (member 0 of its n units, then member 1, ...), and its info is (u0, u1, the
    n * width sequence lengths). One host sync, to cut the batch."""
    idx = keep.nonzero().squeeze(1)  # response tokens, sorted: sequence by sequence
    counts = keep.view(units * width, T).sum(1)
    host_counts = counts.tolist()
    starts = [0]
    for c in host_counts:
        starts.append(starts[-1] + c)
    sizes = [sum(host_counts[k * units + u] for k in range(width)) for u in range(units)]
    chunks = []
    for u0, u1 in group_ranges(sizes, budget):
        tok = torch.cat([idx[starts[k * units + u0] : starts[k * units + u1]] for k in range(width)])
        lengths = torch.cat([counts[k * units + u0 : k * units + u1] for k in range(width)])
        chunks.append(Chunk(tok, (u0, u1, lengths)))
    return chunks


class FusedLinearSequenceLossFunction(torch.autograd.Function):
    """hidden (S * T, H), weight (V, H), bias | None, labels (S * T,) int64 -> (loss (), sequence log-probs (S,)
    fp32, sums or, with ``average``, means over each sequence's response tokens).

    ``unit_loss(s, u0, u1)``: the loss of units [u0, u1) (a 0-dim fp32 tensor, already divided by the caller's
    normalizer) from their sequence log-probs ``s`` (n * width,), member-major, differentiable in ``s``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, units, width, T, unit_loss, average, ignore, budget, backend):
        chunks = unit_chunks(labels != ignore, units, width, T, budget)

        def step(chunk, logits, y):  # logits (C, V), y (C,) -> grad_logits, (chunk loss, sequence log-probs)
            u0, u1, lengths = chunk.info
            lp, ent, row_max, log_norm = torch.ops.rlhf_kernels.logprobs_fwd(
                logits[None], y[None], 1.0, ignore, backend
            )
            s = torch.segment_reduce(lp[0], "sum", lengths=lengths)  # deterministic (no atomics)
            if average:
                s = s / lengths.clamp_min(1).to(s.dtype)
            with torch.enable_grad():  # the units' loss and its gradient with respect to their sequence log-probs
                leaf = s.detach().requires_grad_()
                chunk_loss = unit_loss(leaf, u0, u1)
                (g_seq,) = torch.autograd.grad(chunk_loss, leaf)
            if average:
                g_seq = g_seq / lengths.clamp_min(1).to(g_seq.dtype)
            g_lp = g_seq.repeat_interleave(lengths, output_size=y.numel()).unsqueeze(0)  # every token of a sequence
            args = (logits[None], y[None], g_lp, torch.zeros_like(g_lp), row_max, log_norm, ent, 1.0, ignore, backend)
            return torch.ops.rlhf_kernels.logprobs_bwd(*args)[0], (chunk_loss.detach(), s)  # (C, V), logits dtype

        outs, grads = run_chunks(hidden, weight, bias, chunks, step, (labels,), ctx.needs_input_grad[:3])
        save_linear_grads(ctx, grads)
        seq = torch.zeros(units * width, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for chunk, (chunk_loss, s) in zip(chunks, outs):
            u0, u1, _ = chunk.info
            n = u1 - u0
            loss += chunk_loss
            for k in range(width):
                seq[k * units + u0 : k * units + u1] = s[k * n : (k + 1) * n]
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
            None,  # units
            None,  # width
            None,  # T
            None,  # unit_loss
            None,  # average
            None,  # ignore
            None,  # budget
            None,  # backend
        )


def fused_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    width: int,
    unit_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    average: bool,
    ignore_index: int,
    budget: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, sequence log-probs (S,))`` of :class:`FusedLinearSequenceLossFunction` for ``hidden`` (S, T, H)
    and ``labels`` (S, T) (checked by the caller), S = units * ``width``."""
    S, T, H = hidden.shape
    return FusedLinearSequenceLossFunction.apply(
        hidden.reshape(S * T, H), weight, bias, labels.reshape(-1).to(torch.int64), S // width, width, T, unit_loss,
        bool(average), int(ignore_index), budget, backend,
    )  # fmt: skip
