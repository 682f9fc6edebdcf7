"""Shared pieces of the fused-linear ops, which run an LM head over chunks of tokens: argument checks, the chunk
size, the rows worth computing, and :func:`run_chunks`, the one chunk loop (logits GEMM, the op's step function,
the gradient GEMMs) that every fused-linear op drives with its own per-chunk step and output assembly."""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .._utils import check_float_tensor


def linear_operands(h_name: str, hidden: object, w_name: str, weight: object, b_name: str, bias: object) -> tuple:
    """``(hidden, weight, bias)`` as the fused-linear op computes with them: the one dtype rule of these ops.

    Checks: hidden (..., H), weight (V, H) with V >= 1, bias (V,) or None, all float tensors on one device.

    The rule, the same for the forward GEMM, the backward's recomputed logits and the gradient GEMMs:

    * autocast enabled for the inputs' device type: all three are cast to the autocast dtype, as ``nn.Linear``
      would cast them (e.g. fp32 weights and fp32 or bf16 hidden states under bf16 autocast all run in bf16);
      the casts are ordinary autograd ops outside the op, so fp32 parameters receive fp32 gradients;
    * autocast off: they must already share one dtype (``TypeError`` otherwise, as ``F.linear`` raises).

    The op itself then runs with autocast disabled (:func:`run_chunks`): the logits the backward recomputes are
    bitwise those of the forward (same operands, same GEMM), whatever autocast state the backward runs under, and
    every GEMM of the chunk loop sees operands of one dtype (the fp32-output GEMM of the weight gradient on CUDA
    takes only equal operand dtypes).
    """
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
    if weight.device != hidden.device or (bias is not None and bias.device != hidden.device):
        raise ValueError(f"{h_name}, {w_name} and {b_name} must be on the same device")
    dtype = autocast_dtype(hidden.device)
    if dtype is not None:
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        dtypes = f"{hidden.dtype}, {weight.dtype}" + ("" if bias is None else f", {bias.dtype}")
        raise TypeError(
            f"{h_name}, {w_name} and {b_name} must share one dtype outside autocast, got {dtypes} "
            "(cast them, or run under torch.autocast to compute in its dtype)"
        )
    return hidden, weight, bias


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``'s type when autocast is enabled there, else None."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def capturing_cuda_graph(device: torch.device) -> bool:
    """Whether the current stream of ``device`` (a CUDA device) is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def autocast_off(device: torch.device):
    """A context with autocast disabled for ``device``'s type (a no-op where autocast does not exist)."""
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


# Fewest rows per chunk. Each chunk's weight gradient is added into the fp32 (V, H) accumulator, which that GEMM
# reads and writes whole: 8 V H bytes against 2 C V H flops, so C / 4 flops per byte. A GPU is compute-bound at
# ~200 flops per byte (H100/H200: ~1e15 bf16 flops/s over 3.4-4.8 TB/s), hence C >= ~800. With 128-row chunks the
# first H200 run measured the log-prob, KL and PPO heads at 2-3.4x the time of the unfused path at H = 4096,
# V = 128k, while the DPO head, whose chunks are whole pairs (2048 rows there), was faster than unfused. A CPU
# core is compute-bound at ~5-10 flops per byte (~50-100 GFLOP/s over ~10-20 GB/s), so 128 rows suffice there,
# and the chunk's fp32 logits and their gradient (8 C V bytes: 262 MB at C = 1024, V = 32k) stay small.
MIN_CHUNK_ROWS = 1024
MIN_CHUNK_ROWS_CPU = 128


def default_chunk_size(n_tokens: int, vocab: int, hidden: int, device_type: str = "cuda") -> int:
    """Tokens per chunk: the chunk's logits hold about as many elements as the hidden states (N x H), as a
    power of two, at least MIN_CHUNK_ROWS rows (MIN_CHUNK_ROWS_CPU on the CPU; the weight-gradient GEMMs stay
    compute-bound), and at most N."""
    target = max(1, (n_tokens * hidden) // max(vocab, 1))
    floor = MIN_CHUNK_ROWS_CPU if device_type == "cpu" else MIN_CHUNK_ROWS
    chunk = max(floor, 1 << (target - 1).bit_length())
    return max(1, min(chunk, n_tokens))


def fp32_out_gemm_available(device: torch.device) -> bool:
    """Whether ``device`` has a half-precision GEMM with an fp32 output (``torch.addmm(..., out_dtype=float32)``):
    CUDA does; the CPU has no kernel for it."""
    return device.type == "cuda"


def _fp32_out_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b by one GEMM reading bf16/fp16 ``a`` and ``b`` (one dtype) and writing fp32."""
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for ``a`` and ``b`` of one float dtype (:func:`linear_operands` guarantees it),
    accumulating the product in fp32."""
    if a.dtype != b.dtype:  # an internal error: the dtype rule casts every operand to one dtype
        raise TypeError(f"fused-linear GEMM operands of two dtypes ({a.dtype}, {b.dtype}): linear_operands missed")
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif fp32_out_gemm_available(acc.device):
        _fp32_out_addmm(acc, a, b)  # bf16/fp16 GEMM with an fp32 output
    else:
        acc.addmm_(a.float(), b.float())  # CPU: chunk-sized upcasts only


def detach_without_grad(*tensors):
    """The tensors detached when grad mode is off, so an autograd Function's ``ctx.needs_input_grad`` is False and
    heads that compute gradients in their forward skip that work under ``torch.no_grad()``."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


class Chunk(NamedTuple):
    """A chunk of rows of ``hidden`` (N, H) for :func:`run_chunks`."""

    rows: slice | torch.Tensor  # a range of rows, or their indices (int64, sorted, distinct)
    info: Any = None  # whatever the op's step function needs to know about the chunk (DPO: its pairs)


def token_chunks(n_rows: int, chunk: int) -> list[Chunk]:
    """Consecutive ranges of ``chunk`` rows covering [0, n_rows)."""
    return [Chunk(slice(s, min(s + chunk, n_rows))) for s in range(0, n_rows, chunk)]


def group_ranges(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges [g0, g1) of groups (sequences, pairs) whose ``sizes`` add up to at most ``budget``,
    except that a group larger than the budget forms a range of its own (empty groups join the range before)."""
    ranges, start, total = [], 0, 0
    for g, n in enumerate(sizes):
        if g > start and n > 0 and total + n > budget:
            ranges.append((start, g))
            start, total = g, 0
        total += n
    if sizes:
        ranges.append((start, len(sizes)))
    return ranges


def sequence_chunks(lengths: list[int], budget: int, device: torch.device) -> list[Chunk]:
    """Chunks of whole sequences over rows laid out sequence by sequence (``lengths`` rows each): each chunk's
    rows are a range, its info the (S_c + 1,) int64 offsets of its sequences within it, on ``device``. No chunk
    is empty (no chunk at all when there is no row)."""
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    chunks = []
    for s0, s1 in group_ranges(lengths, budget):
        if starts[s1] == starts[s0]:
            continue
        local = torch.tensor([starts[s] - starts[s0] for s in range(s0, s1 + 1)], dtype=torch.int64)
        chunks.append(Chunk(slice(starts[s0], starts[s1]), local.to(device)))
    return chunks


def chunk_rows(chunk_size: int | None, n_rows: int, weight: torch.Tensor) -> int:
    """Rows per chunk: ``chunk_size`` (checked by :func:`check_chunk_size`), else :func:`default_chunk_size`."""
    V, H = weight.shape
    default = default_chunk_size(n_rows, V, H, weight.device.type) if chunk_size is None else int(chunk_size)
    return max(default, 1)


def _take(x: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    if x is None:
        return None
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def run_chunks(hidden, weight, bias, chunks, step, inputs=(), needs=(False, False, False)):
    """The chunk loop of every fused-linear op: logits = hidden @ weight.T + bias, one chunk of rows at a time.

    For each :class:`Chunk` in order: the chunk's logits (C, V) (GEMM 1) and its rows of each per-row tensor of
    ``inputs`` (N, ...) (None stays None) go to ``step(chunk, logits, *rows) -> (grad_logits, out)``;
    ``grad_logits`` (C, V) in the logits' dtype, or None, is the gradient of the op's output with respect to the
    chunk's logits, applied at once: grad_hidden = grad_logits @ weight (GEMM 2), grad_weight += grad_logits.T @
    hidden and grad_bias += its column sums (GEMM 3, fp32 accumulators). Only one chunk of logits and logit
    gradients is alive at a time: peak extra memory O(C x V).

    ``needs``: which of (grad_hidden, grad_weight, grad_bias) to compute (``ctx.needs_input_grad[:3]``); rows in
    no chunk get a zero grad_hidden. The two ways the ops use it:

    * gradients in the forward (PPO, DPO: the loss is a weighted sum whose per-token weights are known up front):
      ``forward`` runs the loop with ``needs`` and :func:`save_linear_grads`; ``backward`` is
      :func:`scaled_linear_grads`;
    * recompute in the backward (log-probs, KL: the incoming gradient is per token): ``forward`` runs the loop
      without gradients, keeping O(N) statistics; ``backward`` runs it again over the same chunks with ``needs``.

    Returns ``(outs, (grad_hidden, grad_weight, grad_bias))``: the list of each chunk's ``out`` in chunk order and
    the gradients (None where not needed) in the dtypes of hidden, weight and bias.
    """
    need_h, need_w, need_b = needs
    covered = all(isinstance(c.rows, slice) for c in chunks)  # token ranges cover every row
    grad_h = (torch.empty_like(hidden) if covered else torch.zeros_like(hidden)) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    outs = []
    with autocast_off(hidden.device):  # the dtype rule (linear_operands): the operands' dtype, forward and backward
        for chunk in chunks:
            h = _take(hidden, chunk.rows)
            logits = F.linear(h, weight, bias)  # (C, V)
            grad_logits, out = step(chunk, logits, *(_take(x, chunk.rows) for x in inputs))
            del logits
            outs.append(out)
            if grad_logits is None:
                continue
            if need_h:
                if isinstance(chunk.rows, slice):
                    torch.mm(grad_logits, weight, out=grad_h[chunk.rows])
                else:
                    grad_h.index_copy_(0, chunk.rows, grad_logits @ weight)
            if need_w:
                _addmm_fp32(grad_w, grad_logits.t(), h)
            if need_b:
                grad_b += grad_logits.sum(0, dtype=torch.float32)
            del grad_logits
    grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return outs, (grad_h, grad_w, grad_b)


def cat_rows(outs: list[tuple], count: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-row outputs of :func:`run_chunks` (each chunk's ``out``: ``count`` tensors (C,)) joined in chunk
    order into ``count`` tensors (N,); fp32 empty tensors on ``like``'s device when there is no chunk."""
    if not outs:
        return tuple(like.new_empty(0, dtype=torch.float32) for _ in range(count))
    return tuple(torch.cat(column) for column in zip(*outs))


def kept_rows(keep: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows that need computing (``keep``: (N,) bool), or None when that is every row.

    The fused-linear ops run their GEMMs on these rows only: prompt and padding tokens (often half of a batch)
    then cost nothing. Finding them is one host sync; under torch.compile (no data-dependent shapes) every row
    is computed instead, the skipped ones giving zeros as usual; so too while a CUDA graph is being captured (no
    host sync allowed)."""
    if torch.compiler.is_compiling() or capturing_cuda_graph(keep.device):
        return None
    idx = keep.nonzero().squeeze(1)
    return None if idx.numel() == keep.numel() else idx


def select_rows(keep: torch.Tensor, *rows: torch.Tensor | None) -> tuple:
    """``(idx, *rows)``: :func:`kept_rows` of ``keep`` and each (N, ...) tensor of ``rows`` (None stays None)
    reduced to those rows (differentiable: autograd scatters gradients back), or unchanged when idx is None."""
    idx = kept_rows(keep)
    if idx is None:
        return (None, *rows)
    return (idx, *(_take(x, idx) for x in rows))


def save_linear_grads(ctx, grads: tuple) -> None:
    """Save (grad_hidden, grad_weight, grad_bias), any of them None, computed in a forward pass."""
    ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))


def scaled_linear_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """The saved (grad_hidden, grad_weight, grad_bias) scaled by the incoming gradient of a scalar loss."""
    return tuple(
        g * grad_loss.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3])
    )
