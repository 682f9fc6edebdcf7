"""Log-probs and entropy straight from the last hidden states and the LM head, in chunks of tokens.

``fused_linear_logprobs(hidden, weight, labels)`` equals ``logprobs(hidden @ weight.T + bias, labels)`` but never
holds more than one chunk of logits: peak extra memory is O(chunk x V) instead of O(N x V). The forward keeps
O(N) statistics; the backward recomputes each chunk's logits (one GEMM), turns them into logit gradients with
the log-prob backward kernel, and applies two more GEMMs for ``grad_hidden`` and ``grad_weight``.
``grad_weight`` and ``grad_bias`` accumulate in fp32 across chunks.
"""

from __future__ import annotations

import torch

from .. import reference
from .._backend import resolve_backend
from .._utils import check_label_range, check_labels, check_temperature
from ._linear import (
    autocast_off,
    cat_rows,
    check_chunk_size,
    chunk_rows,
    detach_without_grad,
    linear_operands,
    run_chunks,
    select_rows,
    token_chunks,
)


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) int64 -> fp32 (logprobs, entropy) (N,).
    Recomputes each chunk's logits in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index, chunk, backend):
        def step(_, logits, y):  # (C, V), (C,) -> no logit gradient; logprobs, entropy, row_max, log_norm (C,)
            out = torch.ops.rlhf_kernels.logprobs_fwd(logits[None], y[None], inv_temperature, ignore_index, backend)
            return None, tuple(x[0] for x in out)

        outs, _ = run_chunks(hidden, weight, bias, token_chunks(hidden.shape[0], chunk), step, (labels,))
        lp, ent, row_max, log_norm = cat_rows(outs, 4, hidden)
        ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_norm, ent)
        ctx.args = (inv_temperature, ignore_index, chunk, backend)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, labels, row_max, log_norm, ent = ctx.saved_tensors
        inv_temperature, ignore_index, chunk, backend = ctx.args
        grad_lp = torch.zeros_like(ent) if grad_lp is None else grad_lp.float().contiguous()
        grad_ent = torch.zeros_like(ent) if grad_ent is None else grad_ent.float().contiguous()

        def step(_, logits, *rows):  # rows (C,): labels, grad_lp, grad_ent, row_max, log_norm, entropy
            args = (logits[None], *(x[None] for x in rows), inv_temperature, ignore_index, backend)
            return torch.ops.rlhf_kernels.logprobs_bwd(*args)[0], None  # (C, V), dtype of the logits

        inputs = (labels, grad_lp, grad_ent, row_max, log_norm, ent)
        chunks = token_chunks(hidden.shape[0], chunk)
        _, (grad_h, grad_w, grad_b) = run_chunks(hidden, weight, bias, chunks, step, inputs, ctx.needs_input_grad[:3])
        return (
            grad_h,  # hidden
            grad_w,  # weight
            grad_b,  # bias
            None,  # labels
            None,  # inv_temperature
            None,  # ignore_index
            None,  # chunk
            None,  # backend
        )


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
    check: bool = True,
):
    """Log-probs (and entropy) of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``(..., H)`` last hidden states (float32, bfloat16 or float16).
        weight: ``(V, H)`` LM head, same dtype as ``hidden``; ``bias``: optional ``(V,)``.
        labels: ``(...)`` int64 or int32.
        chunk_size: tokens per chunk; default :func:`default_chunk_size` (logits chunk ~ size of ``hidden``).
        Other arguments as in :func:`rlhf_kernels.logprobs`.

    Returns fp32 ``logprobs`` of shape ``(...)``, or ``(logprobs, entropy)``. Gradients flow to ``hidden``,
    ``weight`` and ``bias`` (returned in their dtypes; weight and bias gradients are summed in fp32). The full
    ``(N, V)`` logits are never materialised: peak extra memory is O(chunk_size x V). Rows whose label is
        ``ignore_index`` (prompt, padding) are left out of the GEMMs (one host sync finds them).

    Example::

        lp = rlhf_kernels.fused_linear_logprobs(h[:, :-1], model.lm_head.weight, input_ids[:, 1:])
    """
    hidden, weight, bias = linear_operands("hidden", hidden, "weight", weight, "bias", bias)
    check_labels(labels, hidden.shape[:-1], hidden.device)
    temperature = check_temperature(temperature)
    check_chunk_size(chunk_size)
    V, H = weight.shape
    name = resolve_backend(backend, hidden.device, "logprobs")
    if check and not torch.compiler.is_compiling():
        check_label_range(labels, V, ignore_index)
    if name == "reference":
        with autocast_off(hidden.device):  # the dtype rule (linear_operands): the operands' dtype
            lp, ent = reference.fused_linear_logprobs(hidden, weight, labels, bias, temperature, ignore_index)
        lp, ent = lp.float(), ent.float()
    else:
        y = labels.reshape(-1).to(torch.int64).contiguous()  # (N,)
        idx, h, y = select_rows(y != ignore_index, hidden.reshape(-1, H), y)  # GEMMs on the labelled rows only
        chunk = chunk_rows(chunk_size, h.shape[0], weight)
        h, weight, bias = detach_without_grad(h, weight, bias)
        args = (1.0 / temperature, int(ignore_index), chunk, name)
        lp, ent = FusedLinearLogprobsFunction.apply(h, weight, bias, y, *args)
        if idx is not None:  # ignored rows: 0 (differentiable scatter back)
            lp, ent = (x.new_zeros(labels.numel()).index_copy(0, idx, x) for x in (lp, ent))
        lp, ent = lp.view(labels.shape), ent.view(labels.shape)
    return (lp, ent) if return_entropy else lp
