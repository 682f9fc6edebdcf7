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
from .._utils import check_float_tensor, check_label_range, check_labels, check_temperature


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: the chunk's logits hold about as many elements as the hidden states (N x H), as a
    power of two, at least 128 rows so that the GEMMs stay efficient, and at most N."""
    target = max(1, (n_tokens * hidden) // max(vocab, 1))
    chunk = max(128, 1 << (target - 1).bit_length())
    return max(1, min(chunk, n_tokens))


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for a, b in any float dtype, accumulating the product in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # bf16/fp16 GEMM with an fp32 output
    else:
        acc.addmm_(a.float(), b.float())  # CPU: no mixed-dtype GEMM; chunk-sized upcasts only


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
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_lp = torch.zeros_like(ent) if grad_lp is None else grad_lp.float().contiguous()
        grad_ent = torch.zeros_like(ent) if grad_ent is None else grad_ent.float().contiguous()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            h = hidden[s:e]
            logits = F.linear(h, weight, bias).unsqueeze(0)  # (1, C, V), recomputed
            g = torch.ops.rlhf_kernels.logprobs_bwd(
                logits, labels[s:e].unsqueeze(0), grad_lp[s:e].unsqueeze(0), grad_ent[s:e].unsqueeze(0),
                row_max[s:e].unsqueeze(0), log_norm[s:e].unsqueeze(0), ent[s:e].unsqueeze(0),
                inv_temperature, ignore_index, backend,
            )[0]  # (C, V), dtype of the logits  # fmt: skip
            if need_h:
                torch.mm(g, weight, out=grad_h[s:e])
            if need_w:
                _addmm_fp32(grad_w, g.t(), h)
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
        return (
            grad_h,  # hidden
            None if grad_w is None else grad_w.to(weight.dtype),  # weight
            None if grad_b is None else grad_b.to(bias.dtype),  # bias
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
    ``(N, V)`` logits are never materialised: peak extra memory is O(chunk_size x V).

    Example::

        lp = rlhf_kernels.fused_linear_logprobs(h[:, :-1], model.lm_head.weight, input_ids[:, 1:])
    """
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    if hidden.dim() == 0 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected hidden (..., H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has V = 0 rows")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share one dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
        raise ValueError("hidden, weight and bias must be on the same device")
    check_labels(labels, hidden.shape[:-1], hidden.device)
    temperature = check_temperature(temperature)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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
        chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(h.shape[0], V, H)
        lp, ent = FusedLinearLogprobsFunction.apply(
            h, weight, bias, y, 1.0 / temperature, int(ignore_index), max(chunk, 1), name
        )
        lp, ent = lp.view(labels.shape), ent.view(labels.shape)
    return (lp, ent) if return_entropy else lp
