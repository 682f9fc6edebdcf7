"""Shared pieces of the fused-linear ops, which run an LM head over chunks of tokens: argument checks, the
default chunk size, and the accumulation of the chunked GEMM gradients."""

from __future__ import annotations

import torch

from .._utils import check_float_tensor


def check_linear(h_name: str, hidden: object, w_name: str, weight: object, b_name: str, bias: object) -> None:
    """hidden (..., H), weight (V, H) with V >= 1, bias (V,) or None: one dtype, one device."""
    check_float_tensor(h_name, hidden)
    check_float_tensor(w_name, weight)
    if hidden.dim() == 0 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected {h_name} (..., H) and {w_name} (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has V = 0 rows")
    if bias is not None:
        check_float_tensor(b_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{b_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        dtypes = f"{hidden.dtype}, {weight.dtype}" + ("" if bias is None else f", {bias.dtype}")
        raise TypeError(f"{h_name}, {w_name} and {b_name} must share one dtype, got {dtypes}")
    if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
        raise ValueError(f"{h_name}, {w_name} and {b_name} must be on the same device")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


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


def detach_without_grad(*tensors):
    """The tensors detached when grad mode is off, so an autograd Function's ``ctx.needs_input_grad`` is False and
    heads that compute gradients in their forward skip that work under ``torch.no_grad()``."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


class LinearGrads:
    """Gradients of ``logits = hidden @ weight.T + bias`` (hidden (N, H)) accumulated chunk by chunk from the
    logit gradients: ``grad_hidden`` is written per chunk, ``grad_weight`` and ``grad_bias`` summed in fp32."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        need_h, need_w, need_b = needs
        self.grad_h = torch.empty_like(hidden) if need_h else None
        self.grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        self.grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None

    def add_chunk(self, start: int, end: int, grad_logits: torch.Tensor) -> None:
        """grad_logits (end - start, V), in the dtype of the logits."""
        if self.grad_h is not None:
            torch.mm(grad_logits, self.weight, out=self.grad_h[start:end])
        if self.grad_w is not None:
            _addmm_fp32(self.grad_w, grad_logits.t(), self.hidden[start:end])
        if self.grad_b is not None:
            self.grad_b += grad_logits.sum(0, dtype=torch.float32)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(grad_hidden, grad_weight, grad_bias) in the dtypes of hidden, weight and bias."""
        grad_w = None if self.grad_w is None else self.grad_w.to(self.weight.dtype)
        grad_b = None if self.grad_b is None else self.grad_b.to(self.bias.dtype)
        return self.grad_h, grad_w, grad_b


def kept_rows(keep: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows that need computing (``keep``: (N,) bool), or None when that is every row.

    The fused-linear ops run their GEMMs on these rows only: prompt and padding tokens (often half of a batch)
    then cost nothing. Finding them is one host sync; under torch.compile (no data-dependent shapes) every row
    is computed instead, the skipped ones giving zeros as usual."""
    if torch.compiler.is_compiling():
        return None
    idx = keep.nonzero().squeeze(1)
    return None if idx.numel() == keep.numel() else idx


def save_linear_grads(ctx, grads: tuple) -> None:
    """Save (grad_hidden, grad_weight, grad_bias), any of them None, computed in a forward pass."""
    ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))


def scaled_linear_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """The saved (grad_hidden, grad_weight, grad_bias) scaled by the incoming gradient of a scalar loss."""
    return tuple(
        g * grad_loss.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3])
    )
