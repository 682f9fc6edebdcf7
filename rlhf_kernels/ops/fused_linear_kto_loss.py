"""KTO straight from the last hidden states and the LM head, gradients computed in one sweep.

An example's loss depends only on its own sequence log-prob once the reference point z is known, and z carries no
gradient. So z comes first (from the mismatched pairs' log-probs, a no-grad pass through the fused log-prob
head, or given), then the forward runs over chunks of whole examples (:mod:`._sequence_loss`, units of one
sequence): logits of the response tokens, log-probs, sequence sums, the example losses and their gradient, the
logit gradients and the gradients of hidden and weight. No (N, V) logits, nothing recomputed.
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._utils import check_labels
from ._linear import check_chunk_size, chunk_rows, detach_without_grad, linear_operands
from ._sequence_loss import check_responses, fused_sequence_loss
from .aggregation import check_normalizer
from .dpo_loss import sequence_logps
from .fused_linear_logprobs import fused_linear_logprobs
from .kto_loss import check_desirable, check_kto_options, example_losses, kto_loss, kto_stats, reference_point


def fused_linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_hidden: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ignore_index: int = -100,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss straight from the policy's last hidden states and LM head, never materialising logits.

    Args:
        hidden: ``(B, T, H)``; ``hidden[:, t]`` predicts ``labels[:, t]`` (shift inputs by one before calling, as
            for :func:`rlhf_kernels.fused_linear_logprobs`). weight ``(V, H)``, optional bias ``(V,)``.
        labels: ``(B, T)`` int: each example's completion tokens, ``ignore_index`` on prompt and padding.
        ref_logps: ``(B,)`` the reference's summed completion log-probs. desirable: ``(B,)`` bool.
        kl_hidden, kl_labels: ``(M, T', H)`` and ``(M, T')``: the policy's hidden states and labels of M
            mismatched pairs (a prompt with another example's completion), with ``ref_kl_logps`` ``(M,)``; their
            log-probs are computed without gradient and give z = max(0, mean(policy - ref)). Or ``kl``: z given
            (e.g. reduced over a step); or neither: z = 0.
        beta, desirable_weight, undesirable_weight, normalizer: as in :func:`rlhf_kernels.kto_loss`.
        chunk_size: response tokens per chunk (default :func:`rlhf_kernels.ops._linear.default_chunk_size`).
        check: verify labels (each in [0, V) or ``ignore_index``, and at least one response token per sequence).

    Returns ``(loss, stats)`` as :func:`rlhf_kernels.kto_loss`, equal to ``kto_loss`` applied to the sums of
    :func:`rlhf_kernels.fused_linear_logprobs`. Gradients flow to ``hidden``, ``weight`` and ``bias`` (none to the
    mismatched pairs: z is detached); they are computed during the forward and the backward only scales them.
    Under ``torch.compile``, or with ``backend="reference"``, the unfused composition runs instead.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got {getattr(hidden, 'shape', hidden)}")
    hidden, weight, bias = linear_operands("hidden", hidden, "weight", weight, "bias", bias)
    check_labels(labels, hidden.shape[:-1], hidden.device)
    check_chunk_size(chunk_size)
    check_kto_options(beta, desirable_weight, undesirable_weight)
    (B, T, _), V = hidden.shape, weight.shape[0]
    ref = torch.as_tensor(ref_logps)
    if ref.shape != (B,) or not ref.dtype.is_floating_point:
        raise ValueError(f"ref_logps must be a (B,) float tensor with B = {B}, got {tuple(ref.shape)} {ref.dtype}")
    ref = ref.detach().to(device=hidden.device, dtype=torch.float32)
    desirable = check_desirable(desirable, ref)
    normalizer = check_normalizer(normalizer, hidden.device)
    compiling = torch.compiler.is_compiling()
    name = resolve_backend(backend, hidden.device, "logprobs")
    policy_kl = None
    if kl_hidden is not None or kl_labels is not None:
        if kl_hidden is None or kl_labels is None or ref_kl_logps is None:
            raise ValueError("kl_hidden, kl_labels and ref_kl_logps go together: pass all three or none")
        if not isinstance(kl_hidden, torch.Tensor) or kl_hidden.dim() != 3 or kl_hidden.shape[-1] != hidden.shape[-1]:
            raise ValueError(
                f"kl_hidden must be (M, T', H) with H = {hidden.shape[-1]}, "
                f"got {getattr(kl_hidden, 'shape', kl_hidden)}"
            )
        check_labels(kl_labels, kl_hidden.shape[:-1], hidden.device)
        if check and not compiling:
            check_responses(kl_labels, V, ignore_index, "every mismatched pair needs a completion (kl_labels)")
        with torch.no_grad():
            token_lp = fused_linear_logprobs(
                kl_hidden.to(hidden.dtype), weight, kl_labels, bias=bias, ignore_index=ignore_index,
                chunk_size=chunk_size, backend=name, check=False,
            )  # fmt: skip
        policy_kl = token_lp.sum(-1)  # (M,)
    elif ref_kl_logps is not None:
        raise ValueError("ref_kl_logps needs kl_hidden and kl_labels (the policy side of the mismatched pairs)")
    z = reference_point(policy_kl, ref_kl_logps, kl, torch.float32, hidden.device)
    if check and not compiling:
        check_responses(labels, V, ignore_index, "every example needs a completion")
    options = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    if name == "reference" or compiling:
        token_lp = fused_linear_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, backend=name,
            check=False,
        )  # (B, T) fp32  # fmt: skip
        seq = sequence_logps(token_lp, labels, ignore_index, average=False)
        return kto_loss(seq, ref, desirable, kl=z, normalizer=normalizer, **options)
    budget = chunk_rows(chunk_size, B * T, weight)
    hidden, weight, bias = detach_without_grad(hidden, weight, bias)
    denominator = B if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
    beta, w_d, w_u = float(beta), float(desirable_weight), float(undesirable_weight)

    def unit_loss(s, i0, i1):  # s: the sequence log-probs of examples [i0, i1)
        return example_losses(s - ref[i0:i1], desirable[i0:i1], z, beta, w_d, w_u).sum() / denominator

    loss, seq = fused_sequence_loss(
        hidden, weight, bias, labels, width=1, unit_loss=unit_loss, average=False, ignore_index=ignore_index,
        budget=budget, backend=name,
    )  # fmt: skip
    return loss, kto_stats(seq, ref, desirable, z, beta)
