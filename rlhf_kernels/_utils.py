"""Helpers shared by the ops: input checks, the (B, T, V) row view, launch settings, optional Triton."""

from __future__ import annotations

import math
import os

import torch

from ._backend import triton_interpreted

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every Triton launch states whether a * b + c may become one fused multiply-add (one rounding instead of two),
# rather than taking the compiler's default: the kernels' numerics then do not change with the Triton version.
# True: the faster and (per operation) more accurate choice, and what nvcc does by default for the CUDA backend.
FP_FUSION = True
LABEL_DTYPES = (torch.int64, torch.int32)

try:  # Triton is optional: CPU-only installs use the C++ or reference backends.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent

    class _Absent:
        """Stand-in so that kernel definitions import; launching one raises."""

        constexpr = int

        def jit(self, fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError("triton is not installed; use backend='cpu', 'cuda' or 'reference'")

    triton = tl = _Absent()


def check_float_tensor(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def bool_mask(mask: object, shape: torch.Size | tuple, device: torch.device, name: str = "mask") -> torch.Tensor:
    """``mask`` (bool, or integer / float 0-1 values) of exactly ``shape`` on ``device``, as a bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real 0/1 values, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match {tuple(shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the data is on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return t


def check_labels(labels: object, lead_shape: torch.Size, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the leading dimensions of logits {tuple(lead_shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but logits are on {device}")


# Input checks on data (label ranges, masks) run on the device without a host sync: on CUDA a failed check is a
# device-side assert (torch._assert_async) that names the condition, so check=True costs no sync and the ops can be
# captured in CUDA graphs. RLHF_KERNELS_SYNC_CHECKS=1 makes them synchronous everywhere, with the offending value
# in the error (one host sync per check); CPU tensors always get the synchronous error (a sync costs nothing there).
SYNC_CHECKS_ENV = "RLHF_KERNELS_SYNC_CHECKS"


def sync_checks(device: torch.device) -> bool:
    """Whether data checks on ``device`` raise a ``ValueError`` on the host (with details) rather than asserting
    on the device."""
    return device.type == "cpu" or os.environ.get(SYNC_CHECKS_ENV, "0").lower() in ("1", "true", "yes", "on")


def require_none(bad: torch.Tensor, message: str, detail=None) -> None:
    """Fail when any element of ``bad`` (bool) is True: a ``ValueError(message + detail())`` after a host sync
    where :func:`sync_checks`, else a device-side assert with ``message`` and no sync."""
    if sync_checks(bad.device):
        if bool(bad.any()):
            raise ValueError(message + ("" if detail is None else detail()))
    else:
        torch._assert_async(~bad.any(), message)


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is ``ignore_index`` or in [0, vocab): one reduction, no host sync on CUDA (:func:`require_none`)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    require_none(
        bad,
        f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}. Pass check=False to skip this "
        f"check (bad rows then give NaN).",
        lambda: f" Found {labels[bad][0].item()} ({int(bad.sum())} bad labels).",
    )


def row_inputs(op: str, shape: tuple[int, ...], **tensors: torch.Tensor) -> list[torch.Tensor]:
    """The per-row inputs of a low-level op (gradients, saved statistics): float32 of ``shape`` with any strides,
    returned contiguous (an O(rows) copy only when they are not), as every backend takes them (op table)."""
    out = []
    for name, t in tensors.items():
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must be float32 of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
        out.append(t.contiguous())
    return out


def rows_3d(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` of shape (..., V) as (B, T, V) without copying, so that kernels get two leading strides.

    Leading dimensions are grouped so that each group is one strided run (e.g. ``logits[:, :-1, :]`` of a
    contiguous (B, T, V) tensor is (B, T-1) with strides (T*V, V): two groups). Layouts that need more than
    two groups, and a last dimension that is not unit-stride, are copied (documented cost, rare in practice).
    """
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    V = x.shape[-1]
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    groups: list[list[int]] = []  # each [size, stride] of a run of mergeable dimensions
    for size, stride in dims:
        if groups and groups[-1][1] == size * stride:
            groups[-1][0] *= size
            groups[-1][1] = stride
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        x = x.contiguous()
        groups = [[math.prod(x.shape[:-1]), V]]
    while len(groups) < 2:
        groups.insert(0, [1, 0])
    (B, _), (T, _) = groups
    return x.view(B, T, V)  # succeeds: each group is one strided run


def row_launch_config(V: int, elem_size: int) -> tuple[int, int]:
    """The one launch rule of row-wise Triton kernels: (BLOCK_V, num_warps) from V and the element size only.

    A block holds up to 16 KiB of input (4096 fp32 or 8192 bf16 elements), so a row of 32k-256k vocab takes 4-64
    iterations. Blocks of more than 8 KiB get 8 warps, smaller ones 4: a thread of a full block reads 64 bytes
    (four 16-byte loads). Measured on the forwards compiled for sm_90 (logprobs, kl), whose threads each keep an
    online state across the blocks: 64 bytes per thread halves the per-block costs (state rescaling, loop) of
    16 warps x 32 bytes, e.g. bf16 logprobs 7.5 -> 7.1 instructions per element in the main loop, without
    spills (48 registers; kl with two inputs: 128). Depending only on V and the dtype keeps the reduction order
    of a row independent of the batch (batch invariance).
    """
    block = min(1 << max(V - 1, 0).bit_length(), 16384 // elem_size)
    num_warps = 8 if block * elem_size > 8192 else 4
    return block, num_warps


def interpreter_rounds_bf16(dtype: torch.dtype) -> bool:
    """The Triton interpreter converts fp32 to bf16 by truncation (GPUs round to nearest even), which makes
    interpreted bf16 outputs up to one ulp off; kernels then round in :func:`to_output_dtype` themselves."""
    return dtype == torch.bfloat16 and triton_interpreted()


@triton.jit
def to_output_dtype(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 ``x`` converted to ``dtype``; with ROUND_BF16 (interpreter only) rounded to nearest even first, so
    that the truncating conversion is exact (inf and NaN keep their class: the carry stays in the low bits)."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)
