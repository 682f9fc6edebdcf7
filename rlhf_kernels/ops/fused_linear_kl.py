"""Exact per-token KL from the last hidden states and LM heads of the policy and the reference, in token chunks.

``fused_linear_kl(hidden, weight, ref_hidden, ref_weight)`` equals
``kl_from_logits(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias)`` but holds at most one chunk of
each model's logits. Forward: two GEMMs and the KL kernel per chunk, O(N) statistics kept. Backward: the two GEMMs
again, the KL backward kernel, and two GEMMs for ``grad_hidden`` and ``grad_weight`` (summed in fp32). The
reference is frozen: ``ref_hidden``, ``ref_weight`` and ``ref_bias`` never get gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from .._backend import resolve_backend
from .._utils import bool_mask, check_temperature
from ._linear import (
    autocast_off,
    cat_rows,
    check_chunk_size,
    chunk_rows,
    detach_without_grad,
    linear_operands,
    run_chunks,
    token_chunks,
)
from .kl import check_direction


class FusedLinearKLFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None; ref_hidden (N, H2), ref_weight (V, H2), ref_bias | None;
    mask (N,) bool | None -> fp32 kl (N,). Recomputes both models' logits of each chunk in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, inv_temp, reverse, chunk, backend):
        def step(_, logits, ref_h, m):  # (C, V), (C, H2), (C,) | None -> kl, row_max, log_norm, ref stats (C,)
            ref_logits = F.linear(ref_h, ref_weight, ref_bias)  # (C, V)
            return None, torch.ops.rlhf_kernels.kl_fwd(logits[None], ref_logits[None], m, inv_temp, reverse, backend)

        chunks = token_chunks(hidden.shape[0], chunk)
        outs, _ = run_chunks(hidden, weight, bias, chunks, step, (ref_hidden, mask))
        kl, m_p, ln_p, m_q, ln_q = cat_rows(outs, 5, hidden)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, m_p, ln_p, m_q, ln_q, kl)
        ctx.args = (inv_temp, reverse, chunk, backend)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, m_p, ln_p, m_q, ln_q, kl = ctx.saved_tensors
        inv_temp, reverse, chunk, backend = ctx.args
        grad_kl = grad_kl.float().contiguous()

        def step(_, logits, ref_h, m, *rows):  # rows (C,): grad_kl, row_max, log_norm, ref_row_max, ref_log_norm, kl
            ref_logits = F.linear(ref_h, ref_weight, ref_bias)  # (C, V), recomputed
            args = (logits[None], ref_logits[None], m, *rows, inv_temp, reverse, backend)
            return torch.ops.rlhf_kernels.kl_bwd(*args)[0], None  # (C, V), dtype of the logits

        inputs = (ref_hidden, mask, grad_kl, m_p, ln_p, m_q, ln_q, kl)
        chunks = token_chunks(hidden.shape[0], chunk)
        _, (grad_h, grad_w, grad_b) = run_chunks(hidden, weight, bias, chunks, step, inputs, ctx.needs_input_grad[:3])
        return (
            grad_h,  # hidden
            grad_w,  # weight
            grad_b,  # bias
            None,  # ref_hidden: the reference is frozen
            None,  # ref_weight
            None,  # ref_bias
            None,  # mask
            None,  # inv_temp
            None,  # reverse
            None,  # chunk
            None,  # backend
        )


def fused_linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    direction: str = "reverse",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact per-token KL between policy and reference computed from their last hidden states and LM heads.

    Args:
        hidden: ``(..., H)`` policy hidden states; ``weight``: ``(V, H)`` policy LM head; ``bias``: ``(V,)`` or
            None. One float dtype for the three.
        ref_hidden: ``(..., H_ref)`` reference hidden states, same leading shape; ``ref_weight``: ``(V, H_ref)``;
            ``ref_bias``: ``(V,)`` or None. One float dtype for these three, which may differ from the policy's
            (and ``H_ref`` may differ from ``H``). Frozen: never given a gradient.
        temperature, mask, direction, backend: as in :func:`rlhf_kernels.kl_from_logits`.
        chunk_size: tokens per chunk; default: each chunk of logits holds about as many elements as ``hidden``.

    Returns fp32 ``(...)``, the same value as :func:`rlhf_kernels.kl_from_logits` on the two models' logits, with
    gradients for ``hidden``, ``weight`` and ``bias`` (in their dtypes). Peak extra memory is O(chunk_size x V):
    neither model's full ``(N, V)`` logits are ever materialised. Masked-out tokens still go through the GEMMs
    (skipping them would need a host sync) but are not read by the KL kernels.

    Example::

        kl = rlhf_kernels.fused_linear_kl(h, policy.lm_head.weight, ref_h, ref.lm_head.weight, mask=response_mask)
    """
    hidden, weight, bias = linear_operands("hidden", hidden, "weight", weight, "bias", bias)
    ref_hidden, ref_weight, ref_bias = linear_operands(
        "ref_hidden", ref_hidden, "ref_weight", ref_weight, "ref_bias", ref_bias
    )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"weight and ref_weight must have the same vocabulary size, got {weight.shape[0]} and {ref_weight.shape[0]}"
        )
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"hidden and ref_hidden must have the same leading shape, got {tuple(hidden.shape)} and "
            f"{tuple(ref_hidden.shape)}"
        )
    if ref_hidden.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but ref_hidden is on {ref_hidden.device}")
    temperature = check_temperature(temperature)
    reverse = check_direction(direction)
    check_chunk_size(chunk_size)
    lead = hidden.shape[:-1]
    mask = None if mask is None else bool_mask(mask, lead, hidden.device)
    name = resolve_backend(backend, hidden.device, "kl")
    if name == "reference":
        with autocast_off(hidden.device):  # the dtype rule (linear_operands): the operands' dtype
            kl = reference.fused_linear_kl(
                hidden, weight, ref_hidden, ref_weight, bias, ref_bias, temperature, mask, direction
            )
        return kl.float()
    h = hidden.reshape(-1, weight.shape[1])  # (N, H)
    rh = ref_hidden.detach().reshape(-1, ref_weight.shape[1])  # (N, H_ref)
    m = None if mask is None else mask.reshape(-1).contiguous()
    chunk = chunk_rows(chunk_size, h.shape[0], weight)
    detach = lambda t: None if t is None else t.detach()
    h, weight, bias = detach_without_grad(h, weight, bias)
    kl = FusedLinearKLFunction.apply(
        h, weight, bias, rh, detach(ref_weight), detach(ref_bias), m, 1.0 / temperature, reverse, chunk, name
    )
    return kl.view(lead)
