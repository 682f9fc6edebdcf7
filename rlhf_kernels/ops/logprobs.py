"""Fused per-token log-probabilities and entropy: kernels, launchers, torch.library ops, autograd.

For each row x (V logits) and label y, with z = x / temperature:
    logprob = log softmax(z)[y],  entropy = -sum_v p_v log p_v,  p = softmax(z)
The forward reads each row once, keeping an online max m, s = sum exp(z - m) and t = sum exp(z - m) (z - m);
then log p_v = (z_v - m) - log s and entropy = log s - t / s. The log-sum-exp is kept as its two parts m and
log s (never summed: m + log s would round to ulp(|lse|), ~1e-5 for logits near 100). The Triton forward keeps
these per lane group and works in base 2 (exp2 of x * inv_temperature / ln 2 minus a reference, one fma per
element), see the comment above its kernel. Only m, log s and the entropy (O(N)) are saved; the backward re-reads
the logits:
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


# The forward kernels of logprobs and kl (kl.py imports these helpers) read a row block by block. A block is a
# (J, G, VEC) tile of positions: lane group g (one per thread) holds J runs of VEC consecutive elements, one
# 16-byte load each, run j starting at j * G * VEC + g * VEC, so that a warp's loads are contiguous. Each group
# keeps its own online state across the blocks (max, s = sum of exponentials, t = sum of exponentials times
# exponents), rescaled once per group and block; the row's groups are merged once, at the end, so the main loop
# has no shuffles, shared memory or barriers. Full blocks run unmasked; one masked block ends the row.
#
# Batch invariance: a row's bits never depend on how the compiler spreads the tile over threads, which changes
# with the alignment of a launch's pointers and strides (16-byte aligned rows get vector loads). Sums inside a
# block run in a fixed pairwise order (_lane_sum), the sum over the groups is exact (_exact_sum), maxima are
# exact in any order, and everything else is elementwise. The tile and num_warps come from V and the dtype only
# (row_tile).
#
# Small batches: a row is a fixed sequence of segments of SEG blocks (SEG from V and the dtype only, seg_blocks).
# Each segment starts from fresh group states, and the row's group states are the segments' merged in segment
# order, elementwise per group (_lp_merge: two exponentials per group and segment). With fewer rows than twice
# the SM count the launcher runs one program per (row, segment) writing its group states (mx, r, s, t: 4 G floats)
# to a workspace, and a second kernel merges them per row in the same order with the same function and ends the
# row as the one-program kernel does (_lp_finish): the same operations on the same values, so a row's results
# do not depend on which path, hence on the batch. Price: the merge per segment on the one-program path (~12
# instructions per thread and segment of >= 2 blocks, < 3%), 4 G floats written and read per segment (3% of a
# 2-block bf16 segment) and a second launch on the split path.


@triton.jit
def _tile_offsets(J: tl.constexpr, N: tl.constexpr):
    """Positions within a block as a (J, N) tile, N = G * VEC: the block's J runs of N elements. Loaded as 2-D
    (the compiler then keeps the J runs of a thread in registers) and reshaped to (J, G, VEC)."""
    return tl.arange(0, J)[:, None] * N + tl.arange(0, N)[None, :]


@triton.jit
def _load_full_block(row_ptr, start, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr, PACKED: tl.constexpr):
    """The full block of a row at ``start``: input dtype, or with PACKED (bf16 rows starting 4-byte aligned)
    loaded as 32-bit words, each split into its two bf16 values widened to fp32 (one instruction per element).
    Values and positions are the same either way, so the row's results are too."""
    if PACKED and VEC > 1:  # (the launchers pass PACKED only with an even VEC)
        words = tl.load(row_ptr.to(tl.pointer_type(tl.uint32)) + start // 2 + _tile_offsets(J, G * VEC // 2))
        lo = (words << 16).to(tl.float32, bitcast=True)
        hi = (words & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), (J, G, VEC))
    else:
        return tl.reshape(tl.load(row_ptr + start + _tile_offsets(J, G * VEC)), (J, G, VEC))


@triton.jit
def _halve(x):
    """(A, B, 2n) -> (A, B, n): x[..., 2i] + x[..., 2i + 1]."""
    a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    return a + b


@triton.jit
def _lane_sum(x, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr):
    """(J, G, VEC) -> (G,): each group's sum, added pairwise in a fixed order (runs of VEC, then across the J runs),
    so that the rounding is the same whatever the layout (VEC <= 8, J <= 32)."""
    if VEC >= 2:
        x = _halve(x)
    if VEC >= 4:
        x = _halve(x)
    if VEC >= 8:
        x = _halve(x)
    x = tl.permute(x, (2, 1, 0))  # (1, G, J)
    if J >= 2:
        x = _halve(x)
    if J >= 4:
        x = _halve(x)
    if J >= 8:
        x = _halve(x)
    if J >= 16:
        x = _halve(x)
    if J >= 32:
        x = _halve(x)
    return tl.reshape(x, (G,))


@triton.jit
def _exact_sum(x):
    """Sum of a 1-D fp32 tensor, independent of the order of the additions: every term is truncated to a multiple
    of 2^(k - 52), with 2^k above the largest magnitude, and the terms are added exactly as int64 (at most 1024
    terms below 2^52), then rounded once to fp32. The truncation costs at most (terms) * 2^-51 of the largest
    term. Non-finite terms count as 0 (the callers flag them)."""
    x = tl.where(tl.abs(x) < float("inf"), x, 0.0)
    biased = (tl.max(tl.abs(x), axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF  # max |x| < 2^(biased - 126)
    k = tl.maximum(biased - 126, -60)
    up = ((179 - k) << 23).to(tl.float32, bitcast=True)  # 2^(52 - k), exact
    down = ((k + 75) << 23).to(tl.float32, bitcast=True)  # 2^(k - 52)
    total = tl.sum((x * up).to(tl.int64), axis=0)
    return total.to(tl.float32) * down


@triton.jit
def _to_fp32(x):
    """Widens logits to fp32; bf16 by moving the 16 bits up (one instruction per element, where the compiler's
    conversion spends two on every second element of a 32-bit register)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _group_max(x, mx, scale2):
    """Folds a block's (J, G, VEC) logits (input dtype) into each group's max logit ``mx`` (fp32, (G,)); returns it
    and the group's new reference r = mx * scale2 (rounded once)."""
    mx_new = tl.maximum(mx, tl.max(tl.max(x, axis=2), axis=0).to(tl.float32))
    return mx_new, mx_new * scale2


@triton.jit
def _lp_block(x, mx, r, s, t, scale2, inside, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    """Adds one (J, G, VEC) block of logits (input dtype; -inf where not `inside`) to the group states (G,)."""
    mx, r_new = _group_max(x, mx, scale2)
    shift = tl.where(s > 0.0, r - r_new, 0.0)
    scale = tl.exp2(shift)
    d = tl.fma(_to_fp32(x), scale2, -r_new[None, :, None])  # x * scale2 - r, rounded once
    if MASKED:
        d = tl.where(inside, d, float("-inf"))  # 2^d -> 0 past V (also where r_new is still -inf)
    e = tl.exp2(d)  # a NaN or +-inf logit makes e * d NaN (inf - inf, 0 * -inf)
    if MASKED:
        d = tl.where(inside, d, 0.0)
    t = scale * (t + shift * s) + _lane_sum(e * d, J, G, VEC)
    s = s * scale + _lane_sum(e, J, G, VEC)
    return mx, r_new, s, t


@triton.jit
def _to_row(r, s):
    """The row's reference (the largest group reference) and each group's shift and scale 2^shift to it; groups
    that saw no element (s == 0) get shift 0 and add nothing."""
    ref = tl.max(r, axis=0)
    shift = tl.where(s > 0.0, r - ref, 0.0)
    return ref, shift, tl.exp2(shift)


@triton.jit
def _lp_empty(G: tl.constexpr):
    """Empty group states (mx, r, s, t): max logit and reference -inf, sums 0."""
    return (
        tl.full((G,), float("-inf"), tl.float32),
        tl.full((G,), float("-inf"), tl.float32),
        tl.zeros((G,), tl.float32),
        tl.zeros((G,), tl.float32),
    )


@triton.jit
def _lp_segment(base, V, k, scale2, LAST: tl.constexpr, SEG: tl.constexpr, J: tl.constexpr, G: tl.constexpr,
                VEC: tl.constexpr, PACKED: tl.constexpr):  # fmt: skip
    """Group states (mx, r, s, t), each (G,), of segment k of the row at ``base``: its blocks [k SEG, (k + 1) SEG)
    from fresh states. Only the LAST segment (k = n_seg - 1) may end with the row's masked block; the others are
    full blocks only (a separate instance without the masked code keeps the loop over segments lean)."""
    BLOCK: tl.constexpr = J * G * VEC
    mx = tl.full((G,), float("-inf"), tl.float32)  # per group: max logit
    r = tl.full((G,), float("-inf"), tl.float32)  # reference mx * scale2
    s = tl.zeros((G,), tl.float32)  # sum 2^(z2 - r)
    t = tl.zeros((G,), tl.float32)  # sum 2^(z2 - r) (z2 - r)
    n_full = V // BLOCK
    first = k * SEG
    if LAST:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        end = n_full
    else:
        end = first + SEG
    for i in range(first, end):
        x = _load_full_block(base, i * BLOCK, J, G, VEC, PACKED)
        mx, r, s, t = _lp_block(x, mx, r, s, t, scale2, None, J, G, VEC, False)
    if LAST:  # noqa: SIM102  (constexpr, then a runtime condition)
        if n_full * BLOCK < V:
            offs = n_full * BLOCK + _tile_offsets(J, G * VEC)
            x = tl.reshape(tl.load(base + offs, mask=offs < V, other=float("-inf")), (J, G, VEC))
            inside = tl.reshape(offs < V, (J, G, VEC))
            mx, r, s, t = _lp_block(x, mx, r, s, t, scale2, inside, J, G, VEC, True)
    return mx, r, s, t


@triton.jit
def _lp_merge(mx_a, r_a, s_a, t_a, mx_b, r_b, s_b, t_b):
    """Group states a and b merged elementwise (b after a), to the larger reference; every product-sum is an
    explicit fma so that both paths round alike. Merging into empty states (r = -inf, s = t = 0) is exact."""
    r = tl.maximum(r_a, r_b)
    sh_a = tl.where(s_a > 0.0, r_a - r, 0.0)
    sh_b = tl.where(s_b > 0.0, r_b - r, 0.0)
    c_a = tl.exp2(sh_a)
    c_b = tl.exp2(sh_b)
    s = tl.fma(s_a, c_a, s_b * c_b)
    t = tl.fma(c_a, tl.fma(sh_a, s_a, t_a), c_b * tl.fma(sh_b, s_b, t_b))
    return tl.maximum(mx_a, mx_b), r, s, t


@triton.jit
def _lp_finish(base, row, label, V, inv_temp, scale2, mx, r, s, t, lp_ptr, ent_ptr, max_ptr, lognorm_ptr):
    """Ends a used row from its merged group states: the four outputs."""
    finite = tl.max(tl.where(t == t, 0, 1), axis=0) == 0  # NaN in a group <=> a NaN or +-inf logit
    x_max = tl.max(mx, axis=0)
    ref, shift, scale = _to_row(r, s)
    t = _exact_sum(scale * (t + shift * s))
    s = _exact_sum(s * scale)
    s = tl.where(finite, s, float("nan"))  # (unspecified statistics for a non-finite row)

    m = x_max * inv_temp  # max z exactly (rounding is monotonic)
    log_s = tl.log(s)
    # log sum exp(z - m) = ln 2 log2 sum 2^(z2 - z2_max) = log s - ln 2 (z2_max - ref), z2_max - ref rounded once
    log_norm = log_s - 0.6931471805599453 * tl.fma(x_max, scale2, -ref)
    # A one-element row is certain: its log-prob, entropy and log_norm are exactly 0 (the rounding of
    # x_max * scale2 would otherwise leave ~1e-8 in each).
    one = V == 1
    log_norm = tl.where(one, 0.0, log_norm)
    valid = (label >= 0) & (label < V)
    z_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32) * inv_temp
    tl.store(lp_ptr + row, tl.where(valid & finite, (z_label - m) - log_norm, float("nan")))
    # entropy = log s - sum e (z - ref) / s for any reference; here z - ref = ln 2 (z2 - ref)
    ent = tl.where(one, 0.0, log_s - 0.6931471805599453 * (t / s))
    tl.store(ent_ptr + row, tl.where(finite, ent, float("nan")))
    tl.store(max_ptr + row, m)
    tl.store(lognorm_ptr + row, log_norm)


@triton.jit
def _lp_ignored(row, lp_ptr, ent_ptr, max_ptr, lognorm_ptr):
    """An ignored row is not read; all four outputs are 0 (the op table's convention)."""
    tl.store(lp_ptr + row, 0.0)
    tl.store(ent_ptr + row, 0.0)
    tl.store(max_ptr + row, 0.0)
    tl.store(lognorm_ptr + row, 0.0)


@triton.jit
def _row_base(logits_ptr, row, T, stride_b, stride_t):
    b = row // T
    return logits_ptr + b * stride_b + (row - b * T) * stride_t  # 64-bit row offset


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, lp_ptr, ent_ptr, max_ptr, lognorm_ptr,
    T, V, stride_b, stride_t, inv_temp, ignore_index,
    SEG: tl.constexpr, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    # One program per row: its segments in order, each merged into the row's group states.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        _lp_ignored(row, lp_ptr, ent_ptr, max_ptr, lognorm_ptr)
    else:
        base = _row_base(logits_ptr, row, T, stride_b, stride_t)
        scale2 = inv_temp * 1.4426950408889634  # z2 = x * scale2 = z / ln 2: exponentials in base 2
        mx, r, s, t = _lp_empty(G)
        # the segments' blocks in one loop: the segment's states are merged and reset after its last block (the
        # same operations as _lp_segment then _lp_merge per segment, as the split path runs them)
        BLOCK: tl.constexpr = J * G * VEC
        mx_k, r_k, s_k, t_k = _lp_empty(G)
        n_full = V // BLOCK
        for i in range(0, n_full):
            x = _load_full_block(base, i * BLOCK, J, G, VEC, PACKED)
            mx_k, r_k, s_k, t_k = _lp_block(x, mx_k, r_k, s_k, t_k, scale2, None, J, G, VEC, False)
            if ((i + 1) & (SEG - 1)) == 0:  # SEG is a power of two
                mx, r, s, t = _lp_merge(mx, r, s, t, mx_k, r_k, s_k, t_k)
                mx_k, r_k, s_k, t_k = _lp_empty(G)
        has_tail = n_full * BLOCK < V
        if has_tail:
            offs = n_full * BLOCK + _tile_offsets(J, G * VEC)
            x = tl.reshape(tl.load(base + offs, mask=offs < V, other=float("-inf")), (J, G, VEC))
            inside = tl.reshape(offs < V, (J, G, VEC))
            mx_k, r_k, s_k, t_k = _lp_block(x, mx_k, r_k, s_k, t_k, scale2, inside, J, G, VEC, True)
        if has_tail | ((n_full & (SEG - 1)) != 0):  # the last segment, not merged in the loop
            mx, r, s, t = _lp_merge(mx, r, s, t, mx_k, r_k, s_k, t_k)
        _lp_finish(base, row, label, V, inv_temp, scale2, mx, r, s, t, lp_ptr, ent_ptr, max_ptr, lognorm_ptr)


@triton.jit
def _logprobs_fwd_split_kernel(
    logits_ptr, labels_ptr, ws_ptr, T, V, stride_b, stride_t, inv_temp, ignore_index,
    SEG: tl.constexpr, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    # Split path, stage 1: program (row, k) writes segment k's group states to ws[row, k] = (mx, r, s, t) x G.
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        base = _row_base(logits_ptr, row, T, stride_b, stride_t)
        scale2 = inv_temp * 1.4426950408889634
        if k < tl.num_programs(1) - 1:
            mx, r, s, t = _lp_segment(base, V, k, scale2, False, SEG, J, G, VEC, PACKED)
        else:
            mx, r, s, t = _lp_segment(base, V, k, scale2, True, SEG, J, G, VEC, PACKED)
        out = ws_ptr + (row * tl.num_programs(1) + k) * (4 * G) + tl.arange(0, G)
        tl.store(out, mx)
        tl.store(out + G, r)
        tl.store(out + 2 * G, s)
        tl.store(out + 3 * G, t)


@triton.jit
def _logprobs_fwd_merge_kernel(
    logits_ptr, labels_ptr, ws_ptr, lp_ptr, ent_ptr, max_ptr, lognorm_ptr,
    T, V, stride_b, stride_t, inv_temp, ignore_index, n_seg,
    G: tl.constexpr,
):  # fmt: skip
    # Split path, stage 2: one program per row merges ws[row, 0..n_seg) in order and ends the row.
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        _lp_ignored(row, lp_ptr, ent_ptr, max_ptr, lognorm_ptr)
    else:
        base = _row_base(logits_ptr, row, T, stride_b, stride_t)
        scale2 = inv_temp * 1.4426950408889634
        mx, r, s, t = _lp_empty(G)
        for k in range(0, n_seg):
            src = ws_ptr + (row * n_seg + k) * (4 * G) + tl.arange(0, G)
            mx_k = tl.load(src)
            r_k = tl.load(src + G)
            s_k = tl.load(src + 2 * G)
            t_k = tl.load(src + 3 * G)
            mx, r, s, t = _lp_merge(mx, r, s, t, mx_k, r_k, s_k, t_k)
        _lp_finish(base, row, label, V, inv_temp, scale2, mx, r, s, t, lp_ptr, ent_ptr, max_ptr, lognorm_ptr)


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


def row_tile(V: int, elem_size: int) -> tuple[dict[str, int], int]:
    """The forward kernels' (J, G, VEC) tile and num_warps, from :func:`row_launch_config` (V and dtype only, so
    a row's reduction order never depends on the batch): VEC elements per 16-byte load, one lane group per
    thread (G <= 32 * num_warps), J loads per thread and block."""
    block, warps = row_launch_config(V, elem_size)
    # Rows of 16-byte multiples are usually 16-byte aligned: VEC elements per 16-byte load. Other rows are read
    # element by element, and then VEC = 1 keeps each group's elements in one thread's registers whatever the
    # alignment (a group of VEC > 1 elements would be spread over lanes and regrouped through shared memory).
    vec = min(16 // elem_size, block) if V * elem_size % 16 == 0 else 1
    groups = min(32 * warps, block // vec)
    return {"J": block // (groups * vec), "G": groups, "VEC": vec}, warps


def packed_rows(x: torch.Tensor, vec: int) -> bool:
    """Whether the kernels may read the (B, T, V) rows of ``x`` as 32-bit words (_load_full_block): bf16, an even
    VEC and every row starting 4-byte aligned. It changes the instructions only, never a result."""
    return (
        x.dtype == torch.bfloat16
        and vec % 2 == 0
        and x.data_ptr() % 4 == 0
        and all(stride % 2 == 0 or size == 1 for size, stride in zip(x.shape[:2], x.stride()[:2]))
    )


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


def seg_blocks(V: int, elem_size: int) -> int:
    """Blocks per segment of a forward row (V and the dtype only): a power of two, at least 2 (the merge per
    segment then costs < 3% on the one-program path), more for long rows so that a row has at most 16 segments."""
    block, _ = row_launch_config(V, elem_size)
    n_blocks = (V + block - 1) // block
    return 1 << (max(2, (n_blocks + 15) // 16) - 1).bit_length()


# Split rows over segments when there are fewer rows than SPLIT_ROWS_PER_SM x the SM count (CUDA); None: auto, True
# / False: always / never (tests; on CPU tensors under the interpreter auto means never).
SPLIT_ROWS_PER_SM = 2
FORCE_SPLIT: bool | None = None


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_rows(n_rows: int, n_seg: int, device: torch.device) -> bool:
    """Whether the forward splits each row over its segments (see the comment above _lp_segment)."""
    if n_seg < 2:
        return False
    if FORCE_SPLIT is not None:
        return FORCE_SPLIT
    return device.type == "cuda" and n_rows < SPLIT_ROWS_PER_SM * _sm_count(device)


def logprobs_fwd_triton(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float, ignore_index: int):
    labels = _checked_labels(logits, labels)
    B, T, V = logits.shape
    out = [torch.empty((B, T), dtype=torch.float32, device=logits.device) for _ in range(4)]
    if B * T > 0:
        tile, warps = row_tile(V, logits.element_size())
        seg = seg_blocks(V, logits.element_size())
        block = tile["J"] * tile["G"] * tile["VEC"]
        n_seg = ((V + block - 1) // block + seg - 1) // seg
        args = (T, V, logits.stride(0), logits.stride(1), inv_temperature, ignore_index)
        packed = packed_rows(logits, tile["VEC"])
        if split_rows(B * T, n_seg, logits.device):
            ws = torch.empty((B * T, n_seg, 4, tile["G"]), dtype=torch.float32, device=logits.device)
            _logprobs_fwd_split_kernel[(B * T, n_seg)](
                logits, labels, ws, *args, SEG=seg, **tile, PACKED=packed, num_warps=warps,
                enable_fp_fusion=FP_FUSION,
            )  # fmt: skip
            _logprobs_fwd_merge_kernel[(B * T,)](
                logits, labels, ws, *out, *args, n_seg, G=tile["G"], num_warps=warps, enable_fp_fusion=FP_FUSION,
            )  # fmt: skip
        else:
            _logprobs_fwd_kernel[(B * T,)](
                logits, labels, *out, *args, SEG=seg, **tile, PACKED=packed, num_warps=warps,
                enable_fp_fusion=FP_FUSION,
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
    name = resolve_backend(backend, logits.device, "logprobs")
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

    For one kernel backend and device, a row's outputs are bitwise identical whatever else is in the batch
    (the ``reference`` backend is plain PyTorch: invariant on CPU, not on CUDA).
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
