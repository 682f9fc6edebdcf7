"""Fused per-token log-probabilities and entropy: kernels, launchers, torch.library ops, autograd.

For each row x (V logits) and label y, with z = x / temperature:
    logprob = log softmax(z)[y],  entropy = -sum_v p_v log p_v,  p = softmax(z)
The forward reads each row once, keeping an online max m, s = sum exp(z - m) and t = sum exp(z - m) (z - m);
then log p_v = (z_v - m) - log s and entropy = log s - t / s. The log-sum-exp is kept as its two parts m and
log s (never summed: m + log s would round to ulp(|lse|), ~1e-5 for logits near 100). Only m, log s and the
entropy (O(N)) are saved; the backward re-reads the logits:
    d logprob / dz = onehot(y) - p,   d entropy / dz = -p (log p + entropy).
"""

from __future__ import annotations

import torch

from .. import (
    _registry,  # noqa: F401  (defines the ops torch.ops.rlhf_kernels.*)
    reference,
)
from .._backend import resolve_backend
from .._utils import (
    FP_FUSION,
    check_float_tensor,
    check_label_range,
    check_labels,
    check_temperature,
    interpreter_rounds_bf16,
    row_inputs,
    row_launch_config,
    rows_3d,
    tl,
    to_output_dtype,
    triton,
)

# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, lp_ptr, ent_ptr, max_ptr, lognorm_ptr,
    T, V, stride_b, stride_t, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:  # an ignored row is not read; all four outputs are 0 (the op table's convention)
        tl.store(lp_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(lognorm_ptr + row, 0.0)
    else:
        b = row // T
        base = logits_ptr + b * stride_b + (row - b * T) * stride_t  # 64-bit row offset
        m = float("-inf")  # running max of z
        s = 0.0  # sum exp(z - m)
        t = 0.0  # sum exp(z - m) * (z - m)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inside = offs < V
            z = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # Before the first block s == 0 and m == -inf: use shift 0 there so that 0 * inf never appears.
            shift = tl.where(s > 0.0, m - m_new, 0.0)
            scale = tl.exp(shift)
            d = z - m_new
            e = tl.exp(d)  # 0 in the padding lanes past V
            # A NaN or +-inf logit makes e * d NaN (0 * -inf, inf - inf), which marks the row as non-finite.
            t = scale * (t + shift * s) + tl.sum(e * tl.where(inside, d, 0.0), axis=0)
            s = s * scale + tl.sum(e, axis=0)
            m = m_new

        log_s = tl.log(s)
        valid = (label >= 0) & (label < V)
        z_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32) * inv_temp
        finite = t == t
        tl.store(lp_ptr + row, tl.where(valid & finite, (z_label - m) - log_s, float("nan")))
        tl.store(ent_ptr + row, tl.where(finite, log_s - t / s, float("nan")))
        tl.store(max_ptr + row, m)
        tl.store(lognorm_ptr + row, log_s)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, grad_lp_ptr, grad_ent_ptr, max_ptr, lognorm_ptr, ent_ptr, grad_ptr,
    T, V, stride_b, stride_t, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    # grid = (rows, cdiv(V, BLOCK_V)): every program owns one block of one row; no reduction is needed.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = offs < V
    b = row // T
    base = logits_ptr + b * stride_b + (row - b * T) * stride_t
    out = grad_ptr + row * V + offs
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(out, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=inside)
    else:
        g_lp = tl.load(grad_lp_ptr + row)
        g_ent = tl.load(grad_ent_ptr + row)
        m = tl.load(max_ptr + row)
        log_s = tl.load(lognorm_ptr + row)
        ent = tl.load(ent_ptr + row)
        z = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32) * inv_temp
        logp = (z - m) - log_s
        p = tl.exp(logp)
        gz = tl.where(offs == label, g_lp, 0.0) - p * (g_lp + g_ent * (logp + ent))
        tl.store(out, to_output_dtype(gz * inv_temp, grad_ptr.dtype.element_ty, ROUND_BF16), mask=inside)


# ---------------------------------------------------------------------------------------------------------
# 2. Launchers: logits (B, T, V) with stride(2) == 1, labels (B, T) int64, per-row inputs (B, T) fp32.
# ---------------------------------------------------------------------------------------------------------


def _checked_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Checks the layout of the logits and labels; returns the labels contiguous."""
    if logits.dim() != 3 or (logits.stride(2) != 1 and logits.shape[2] > 1):
        raise ValueError(
            f"logits must be a (B, T, V) tensor whose last dimension is contiguous, got shape "
            f"{tuple(logits.shape)} strides {logits.stride()}; call rlhf_kernels.logprobs, which copies if needed"
        )
    if labels.shape != logits.shape[:2] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape {tuple(logits.shape[:2])}, got {labels.dtype} {labels.shape}")
    return labels.contiguous()


def logprobs_fwd_triton(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int):
    labels = _checked_labels(logits, labels)
    B, T, V = logits.shape
    out = [torch.empty((B, T), dtype=torch.float32, device=logits.device) for _ in range(4)]
    if B * T > 0:
        block, warps = row_launch_config(V, logits.element_size())
        _logprobs_fwd_kernel[(B * T,)](
            logits, labels, *out, T, V, logits.stride(0), logits.stride(1), inv_temperature, ignore_index,
            BLOCK_V=block, num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return tuple(out)


def logprobs_bwd_triton(logits, labels, grad_lp, grad_ent, row_max, log_norm, ent, inv_temperature, ignore_index):
    labels = _checked_labels(logits, labels)
    grad_lp, grad_ent, row_max, log_norm, ent = row_inputs(
        "logprobs_bwd", logits.shape[:2], grad_logprobs=grad_lp, grad_entropy=grad_ent, row_max=row_max,
        log_norm=log_norm, entropy=ent,
    )  # fmt: skip
    B, T, V = logits.shape
    grad = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    if B * T > 0:
        block, warps = row_launch_config(V, logits.element_size())
        grid = (B * T, triton.cdiv(V, block))
        _logprobs_bwd_kernel[grid](
            logits, labels, grad_lp, grad_ent, row_max, log_norm, ent, grad,
            T, V, logits.stride(0), logits.stride(1), inv_temperature, ignore_index,
            BLOCK_V=block, ROUND_BF16=interpreter_rounds_bf16(logits.dtype), num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return grad


# ---------------------------------------------------------------------------------------------------------
# 3. torch.library ops: torch.ops.rlhf_kernels.logprobs_fwd / logprobs_bwd (this launcher, the compiled ops or
#    the reference, by their trailing `backend` argument) are defined from the op table, rlhf_kernels/_registry.py,
#    which also holds their contract and fake implementations.
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# 4. Autograd
# ---------------------------------------------------------------------------------------------------------


class LogprobsFunction(torch.autograd.Function):
    """(B, T, V) logits, (B, T) int64 labels -> fp32 (logprobs, entropy), both differentiable."""

    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, ignore_index, backend):
        lp, ent, row_max, log_norm = torch.ops.rlhf_kernels.logprobs_fwd(
            logits, labels, inv_temperature, ignore_index, backend
        )
        ctx.save_for_backward(logits, labels, row_max, log_norm, ent)  # logits are the caller's; the rest O(N)
        ctx.args = (inv_temperature, ignore_index, backend)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, labels, row_max, log_norm, ent = ctx.saved_tensors
        grad_lp = torch.zeros_like(ent) if grad_lp is None else grad_lp.float().contiguous()
        grad_ent = torch.zeros_like(ent) if grad_ent is None else grad_ent.float().contiguous()
        grad = torch.ops.rlhf_kernels.logprobs_bwd(logits, labels, grad_lp, grad_ent, row_max, log_norm, ent, *ctx.args)
        return (
            grad,  # logits
            None,  # labels
            None,  # inv_temperature
            None,  # ignore_index
            None,  # backend
        )


# ---------------------------------------------------------------------------------------------------------
# 5. Public API
# ---------------------------------------------------------------------------------------------------------


def _logprobs_and_entropy(logits, labels, temperature, ignore_index, backend, check):
    check_float_tensor("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:-1], logits.device)
    temperature = check_temperature(temperature)
    name = resolve_backend(backend, logits.device)
    if check and not torch.compiler.is_compiling():
        check_label_range(labels, logits.shape[-1], ignore_index)
    if name == "reference":
        lp, ent = reference.logprobs(logits, labels, temperature, ignore_index)
        return lp.float(), ent.float()
    x = rows_3d(logits)  # (B, T, V) view, no copy for the usual layouts
    y = labels.reshape(x.shape[:2]).to(torch.int64).contiguous()  # (B, T)
    lp, ent = LogprobsFunction.apply(x, y, 1.0 / temperature, int(ignore_index), name)
    return lp.view(labels.shape), ent.view(labels.shape)


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
    check: bool = True,
):
    """Per-token log-probabilities of ``labels`` (and optionally the entropy), fused and memory-light.

    Args:
        logits: ``(..., V)`` float32, bfloat16 or float16. Only the last dimension needs unit stride; other
            strides (e.g. ``logits[:, :-1]``) are read in place.
        labels: ``(...)`` int64 or int32, in ``[0, V)`` or equal to ``ignore_index``.
        temperature: logits are divided by it (> 0).
        return_entropy: also return the entropy of softmax(logits / temperature).
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; default from ``$RLHF_KERNELS_BACKEND``
            or the best available for the device (see ``rlhf_kernels.available_backends``).
        check: verify the label range (one reduction and, on GPU, one host sync). With ``check=False`` an
            out-of-range label gives a NaN log-prob for its row, never an out-of-bounds read.

    Returns:
        ``logprobs`` (fp32, shape ``(...)``) = log_softmax(logits / temperature)[label], or
        ``(logprobs, entropy)`` with ``entropy = -sum_v p_v log p_v``. Both are exactly 0.0 where
        ``labels == ignore_index`` (and get zero gradient there). A row holding NaN or +-inf logits gives NaN for
        both outputs, and no other row is affected. Both outputs are differentiable with respect to ``logits``;
        the gradient has the dtype of ``logits``.

    For one backend and device, a row's outputs are bitwise identical whatever else is in the batch.
    Forward: one pass over the vocabulary with an online max and sum of exponentials (fp32), saving only
    O(N) statistics; backward recomputes the softmax from the logits. No fp32 (N, V) tensor is allocated.

    Example::

        lp, ent = rlhf_kernels.logprobs(logits[:, :-1], input_ids[:, 1:], return_entropy=True)
    """
    lp, ent = _logprobs_and_entropy(logits, labels, temperature, ignore_index, backend, check)
    return (lp, ent) if return_entropy else lp


def entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dimension: ``(..., V)`` -> fp32 ``(...)``.

    Same kernels, memory behaviour and NaN rule as :func:`logprobs`; differentiable with respect to ``logits``.
    """
    if isinstance(logits, torch.Tensor) and logits.dim() > 0:
        labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    else:
        labels = logits  # let the shared checks report the problem
    return _logprobs_and_entropy(logits, labels, temperature, -100, backend, check=False)[1]
