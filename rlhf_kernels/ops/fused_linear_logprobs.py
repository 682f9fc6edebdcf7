"""Log-probs and entropy straight from the last hidden states and the LM head, in chunks of tokens.

``fused_linear_logprobs(hidden, weight, labels)`` equals ``logprobs(hidden @ weight.T + bias, labels)`` but never
holds more than one chunk of logits: peak extra memory is O(chunk x V) instead of O(N x V). The forward keeps
O(N) statistics; the backward recomputes each chunk's logits (one GEMM), turns them into logit gradients with
the log-prob backward kernel, and applies two more GEMMs for ``grad_hidden`` and ``grad_weight``.
``grad_weight`` and ``grad_bias`` accumulate in fp32 across chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from .._backend import resolve_backend
from .._utils import check_label_range, check_labels, check_temperature
from ._linear import LinearGrads, check_chunk_size, check_linear, default_chunk_size, detach_without_grad, kept_rows


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) int64 -> fp32 (logprobs, entropy) (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index, chunk, backend):
        N = hidden.shape[0]
        lp, ent, row_max, log_norm = (hidden.new_empty(N, dtype=torch.float32) for _ in range(4))
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = F.linear(hidden[s:e], weight, bias).unsqueeze(0)  # (1, C, V)
            out = torch.ops.rlhf_kernels.logprobs_fwd(
                logits, labels[s:e].unsqueeze(0), inv_temperature, ignore_index, backend
            )
            for dst, src in zip((lp, ent, row_max, log_norm), out):
                dst[s:e] = src[0]
        ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_norm, ent)
        ctx.args = (inv_temperature, ignore_index, chunk, backend)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, bias, labels, row_max, log_norm, ent = ctx.saved_tensors
        inv_temperature, ignore_index, chunk, backend = ctx.args
        grad_lp = torch.zeros_like(ent) if grad_lp is None else grad_lp.float().contiguous()
        grad_ent = torch.zeros_like(ent) if grad_ent is None else grad_ent.float().contiguous()
        grads = LinearGrads(hidden, weight, bias, ctx.needs_input_grad[:3])
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            h = hidden[s:e]
            logits = F.linear(h, weight, bias).unsqueeze(0)  # (1, C, V), recomputed
            g = torch.ops.rlhf_kernels.logprobs_bwd(
                logits, labels[s:e].unsqueeze(0), grad_lp[s:e].unsqueeze(0), grad_ent[s:e].unsqueeze(0),
                row_max[s:e].unsqueeze(0), log_norm[s:e].unsqueeze(0), ent[s:e].unsqueeze(0),
                inv_temperature, ignore_index, backend,
            )[0]  # (C, V), dtype of the logits  # fmt: skip
            grads.add_chunk(s, e, g)
        grad_h, grad_w, grad_b = grads.result()
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
    check_linear("hidden", hidden, "weight", weight, "bias", bias)
    check_labels(labels, hidden.shape[:-1], hidden.device)
    temperature = check_temperature(temperature)
    check_chunk_size(chunk_size)
    V, H = weight.shape
    name = resolve_backend(backend, hidden.device)
    if check and not torch.compiler.is_compiling():
        check_label_range(labels, V, ignore_index)
    if name == "reference":
        lp, ent = reference.fused_linear_logprobs(hidden, weight, labels, bias, temperature, ignore_index)
        lp, ent = lp.float(), ent.float()
    else:
        h = hidden.reshape(-1, H)  # (N, H)
        y = labels.reshape(-1).to(torch.int64).contiguous()  # (N,)
        idx = kept_rows(y != ignore_index)
        if idx is not None:  # GEMMs on the labelled rows only
            h, y = h.index_select(0, idx), y.index_select(0, idx)
        chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(h.shape[0], V, H)
        h, weight, bias = detach_without_grad(h, weight, bias)
        lp, ent = FusedLinearLogprobsFunction.apply(
            h, weight, bias, y, 1.0 / temperature, int(ignore_index), max(chunk, 1), name
        )
        if idx is not None:  # ignored rows: 0 (differentiable scatter back)
            lp, ent = (x.new_zeros(labels.numel()).index_copy(0, idx, x) for x in (lp, ent))
        lp, ent = lp.view(labels.shape), ent.view(labels.shape)
    return (lp, ent) if return_entropy else lp
