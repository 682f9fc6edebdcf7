"""Exact per-token KL between the policy and the reference over the whole vocabulary: kernels, ops, autograd.

For each row, z = logits / temperature, w = ref_logits / temperature, p = softmax(z), q = softmax(w):
    reverse:  KL(p || q) = sum_v p_v (log p_v - log q_v)       forward:  KL(q || p) = sum_v q_v (log q_v - log p_v)
Writing a for the weighting distribution's scaled logits and b for the other one (a = z, b = w for reverse), the
forward reads both rows once, keeping online maxima m_a, m_b, the sums s_a = sum e^(a - m_a), s_b likewise, and
    t = sum_v e^(a_v - m_a) ((a_v - m_a) - (b_v - m_b)),    KL = t / s_a + (log s_b - log s_a).
When the maxima move by da = m_a - m_a' and db = m_b - m_b', s_a and t rescale by e^da and t gains (da - db) s_a.
For identical inputs every term is exactly 0, so the KL is exactly 0. Rounding can make a KL near 0 slightly
negative; it is clamped to 0. Only O(N) statistics are saved; the backward re-reads both rows:
    d KL(p || q) / dz_v = p_v (log p_v - log q_v - KL),      d KL(q || p) / dz_v = p_v - q_v.
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
    bool_mask,
    check_float_tensor,
    check_temperature,
    interpreter_rounds_bf16,
    row_inputs,
    row_launch_config,
    rows_3d,
    tl,
    to_output_dtype,
    triton,
)
from .logprobs import (
    _exact_sum,
    _lane_sum,
    _load_full_block,
    _row_base,
    _tile_offsets,
    _to_fp32,
    packed_rows,
    row_tile,
    seg_blocks,
    split_rows,
)

KL_DIRECTIONS = ("reverse", "forward")

# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _kl_block(a, b, ma, sa, mb, sb, t, inv_temp, inside, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    """Adds one (J, G, VEC) block of both rows (input dtypes; -inf where not `inside`) to the group states (G,)."""
    # max z = round(max x * inv_temp): rounding is monotonic, so the max of the raw logits gives max z exactly.
    ma_new = tl.maximum(ma, tl.max(tl.max(a, axis=2), axis=0).to(tl.float32) * inv_temp)
    mb_new = tl.maximum(mb, tl.max(tl.max(b, axis=2), axis=0).to(tl.float32) * inv_temp)
    # Before a group's first element s == 0 and m == -inf: shift by 0 there, never 0 * inf.
    sha = tl.where(sa > 0.0, ma - ma_new, 0.0)
    shb = tl.where(sb > 0.0, mb - mb_new, 0.0)
    da = _to_fp32(a) * inv_temp - ma_new[None, :, None]
    db = _to_fp32(b) * inv_temp - mb_new[None, :, None]
    if MASKED:
        da = tl.where(inside, da, float("-inf"))  # exp -> 0 past V (also where m_new is still -inf)
        db = tl.where(inside, db, float("-inf"))
    ea = tl.exp2(da * 1.4426950408889634)  # exp(da)
    diff = da - db  # NaN or +-inf wherever either row holds a NaN or +-inf logit
    if MASKED:
        diff = tl.where(inside, diff, 0.0)
    sca = tl.exp2(sha * 1.4426950408889634)
    t = sca * (t + (sha - shb) * sa) + _lane_sum(ea * diff, J, G, VEC)
    sa = sa * sca + _lane_sum(ea, J, G, VEC)
    sb = sb * tl.exp2(shb * 1.4426950408889634) + _lane_sum(tl.exp2(db * 1.4426950408889634), J, G, VEC)
    return ma_new, sa, mb_new, sb, t


@triton.jit
def _to_row_nat(m, s):
    """The row's max and each group's shift and scale e^shift to it (shift 0 for groups that saw no element)."""
    row_max = tl.max(m, axis=0)
    shift = tl.where(s > 0.0, m - row_max, 0.0)
    return row_max, shift, tl.exp2(shift * 1.4426950408889634)


# Small batches: as in the logprobs forward (see the comment above _tile_offsets in logprobs.py, which also holds
# the rule: seg_blocks, split_rows), a row is a fixed sequence of segments of SEG blocks, each from fresh group
# states (_kl_segment), merged into the row's group states elementwise in segment order (_kl_merge: four
# exponentials per group and segment). The one-program kernel loops over the segments, merging each after its
# blocks; with fewer rows than twice the SM count the launcher runs one program per (row, segment) writing its
# group states (ma, sa, mb, sb, t: 5 G floats) to a workspace and a second kernel merges them per row in the same
# order and ends the row with the same function (_kl_finish), so both paths give the same bits. A row of one
# block is one segment and never splits (its groups start from the row's maxima, _kl_tail).


@triton.jit
def _kl_empty(G: tl.constexpr):
    """Fresh group states (ma, sa, mb, sb, t), each (G,): no element seen."""
    m = tl.full((G,), float("-inf"), tl.float32)
    zero = tl.zeros((G,), tl.float32)
    return m, zero, m, zero, zero


@triton.jit
def _kl_tail(a_row, b_row, V, n_full, ma, sa, mb, sb, t, inv_temp, J: tl.constexpr, G: tl.constexpr,
             VEC: tl.constexpr):  # fmt: skip
    """Adds the row's masked last block, positions [n_full BLOCK, V), to the group states."""
    offs = n_full * (J * G * VEC) + _tile_offsets(J, G * VEC)
    a = tl.reshape(tl.load(a_row + offs, mask=offs < V, other=float("-inf")), (J, G, VEC))
    b = tl.reshape(tl.load(b_row + offs, mask=offs < V, other=float("-inf")), (J, G, VEC))
    inside = tl.reshape(offs < V, (J, G, VEC))
    if n_full == 0:  # the row is this one block: every group starts from the row's maxima (no rescaling)
        ma = tl.zeros((G,), tl.float32) + tl.max(a).to(tl.float32) * inv_temp
        mb = tl.zeros((G,), tl.float32) + tl.max(b).to(tl.float32) * inv_temp
    return _kl_block(a, b, ma, sa, mb, sb, t, inv_temp, inside, J, G, VEC, True)


@triton.jit
def _kl_segment(a_row, b_row, V, k, inv_temp, LAST: tl.constexpr, SEG: tl.constexpr, J: tl.constexpr,
                G: tl.constexpr, VEC: tl.constexpr, PACKED_A: tl.constexpr, PACKED_B: tl.constexpr):  # fmt: skip
    """Group states of segment k of a row pair: its blocks [k SEG, (k + 1) SEG) from fresh states. Only the LAST
    segment may end with the row's masked block (a split row has >= 2 full blocks, so never the one-block case)."""
    BLOCK: tl.constexpr = J * G * VEC
    ma, sa, mb, sb, t = _kl_empty(G)
    n_full = V // BLOCK
    first = k * SEG
    if LAST:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        count = n_full - first
    else:
        count = SEG  # a constant trip count: with first + SEG as the bound the one-program kernel took more registers
    for j in range(0, count):
        a = _load_full_block(a_row, (first + j) * BLOCK, J, G, VEC, PACKED_A)
        b = _load_full_block(b_row, (first + j) * BLOCK, J, G, VEC, PACKED_B)
        ma, sa, mb, sb, t = _kl_block(a, b, ma, sa, mb, sb, t, inv_temp, None, J, G, VEC, False)
    if LAST:  # noqa: SIM102  (constexpr, then a runtime condition)
        if n_full * BLOCK < V:
            ma, sa, mb, sb, t = _kl_tail(a_row, b_row, V, n_full, ma, sa, mb, sb, t, inv_temp, J, G, VEC)
    return ma, sa, mb, sb, t


@triton.jit
def _kl_merge(ma_x, sa_x, mb_x, sb_x, t_x, ma_y, sa_y, mb_y, sb_y, t_y):
    """Group states x and y merged elementwise (y after x) to the larger maxima. Each state moves to them as
    _kl_block moves a running state: s_a and t scale by e^sha, t first gains (sha - shb) s_a, s_b scales by e^shb
    (shift 0 where a state saw no element). Every product-sum is an explicit fma so that both paths round alike;
    merging into empty states (m = -inf, s = t = 0) is exact."""
    ma = tl.maximum(ma_x, ma_y)
    mb = tl.maximum(mb_x, mb_y)
    sha_x = tl.where(sa_x > 0.0, ma_x - ma, 0.0)
    sha_y = tl.where(sa_y > 0.0, ma_y - ma, 0.0)
    shb_x = tl.where(sb_x > 0.0, mb_x - mb, 0.0)
    shb_y = tl.where(sb_y > 0.0, mb_y - mb, 0.0)
    ca_x = tl.exp2(sha_x * 1.4426950408889634)
    ca_y = tl.exp2(sha_y * 1.4426950408889634)
    sa = tl.fma(sa_x, ca_x, sa_y * ca_y)
    sb = tl.fma(sb_x, tl.exp2(shb_x * 1.4426950408889634), sb_y * tl.exp2(shb_y * 1.4426950408889634))
    t = tl.fma(ca_x, tl.fma(sha_x - shb_x, sa_x, t_x), ca_y * tl.fma(sha_y - shb_y, sa_y, t_y))
    return ma, sa, mb, sb, t


@triton.jit
def _kl_finish(row, ma, sa, mb, sb, t, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr):
    """Ends a kept row from its merged group states: the KL and the four statistics."""
    finite = tl.max(tl.where(t * 0.0 == 0.0, 0, 1), axis=0) == 0  # t is NaN or +-inf <=> a NaN / +-inf logit
    m_a, sha, sca = _to_row_nat(ma, sa)
    m_b, shb, scb = _to_row_nat(mb, sb)
    t = _exact_sum(sca * (t + (sha - shb) * sa))
    sa = tl.where(finite, _exact_sum(sa * sca), float("nan"))  # (unspecified statistics for a non-finite row)
    log_s_a = tl.log(sa)
    log_s_b = tl.log(tl.where(finite, _exact_sum(sb * scb), float("nan")))
    kl = t / sa + (log_s_b - log_s_a)
    kl = tl.where(kl < 0.0, 0.0, kl)  # rounding only; NaN stays NaN
    kl = tl.where(finite, kl, float("nan"))
    tl.store(kl_ptr + row, kl)
    tl.store(max_a_ptr + row, m_a)
    tl.store(lognorm_a_ptr + row, log_s_a)
    tl.store(max_b_ptr + row, m_b)
    tl.store(lognorm_b_ptr + row, log_s_b)


@triton.jit
def _kl_masked(row, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr):
    """A masked row is not read; all five outputs are 0 (the op table's convention)."""
    tl.store(kl_ptr + row, 0.0)
    tl.store(max_a_ptr + row, 0.0)
    tl.store(lognorm_a_ptr + row, 0.0)
    tl.store(max_b_ptr + row, 0.0)
    tl.store(lognorm_b_ptr + row, 0.0)


@triton.jit
def _kl_fwd_kernel(
    a_ptr, b_ptr, mask_ptr, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr,
    V, T_a, stride_ab, stride_at, T_b, stride_bb, stride_bt, inv_temp,
    HAS_MASK: tl.constexpr, SEG: tl.constexpr, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
    PACKED_A: tl.constexpr, PACKED_B: tl.constexpr,
):  # fmt: skip
    # KL(softmax(a) || softmax(b)) of one row; the launcher passes (logits, ref) or (ref, logits). The row is read
    # as in the logprobs forward (rlhf_kernels/ops/logprobs.py): lane groups with their own online states, merged
    # once at the end. Unlike there, exponents stay in natural units (z - m, then one multiplication by log2 e):
    # the backward's p (log p - log q - kl) cancels terms of the size of the KL, and agrees with this forward
    # to the last bit only when both compute z - m the same way.
    row = tl.program_id(0).to(tl.int64)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        BLOCK: tl.constexpr = J * G * VEC
        a_row = _row_base(a_ptr, row, T_a, stride_ab, stride_at)  # 64-bit row offsets
        b_row = _row_base(b_ptr, row, T_b, stride_bb, stride_bt)
        # The row's segments in order, each from fresh states and merged into the row's group states once done:
        # the split path's operations (_kl_segment, _kl_merge). (One loop over the blocks merging at segment ends,
        # ((i + 1) & (SEG - 1)) == 0 as in the logprobs kernel, took 162 registers for bf16 rows read element by
        # element, V = 50257, halving the occupancy on sm_90; this form takes 125, the main loop is unchanged.)
        ma, sa, mb, sb, t = _kl_empty(G)
        n_full = V // BLOCK
        for k in range(0, n_full // SEG):  # the segments of full blocks only
            ma_k, sa_k, mb_k, sb_k, t_k = _kl_segment(a_row, b_row, V, k, inv_temp, False, SEG, J, G, VEC, PACKED_A,
                                                      PACKED_B)  # fmt: skip
            ma, sa, mb, sb, t = _kl_merge(ma, sa, mb, sb, t, ma_k, sa_k, mb_k, sb_k, t_k)
        # the last segment: its full blocks, then the masked block if any (_kl_segment with LAST, written out)
        ma_k, sa_k, mb_k, sb_k, t_k = _kl_empty(G)
        for i in range(n_full // SEG * SEG, n_full):
            a = _load_full_block(a_row, i * BLOCK, J, G, VEC, PACKED_A)
            b = _load_full_block(b_row, i * BLOCK, J, G, VEC, PACKED_B)
            ma_k, sa_k, mb_k, sb_k, t_k = _kl_block(a, b, ma_k, sa_k, mb_k, sb_k, t_k, inv_temp, None, J, G, VEC, False)
        has_tail = n_full * BLOCK < V
        if has_tail:
            ma_k, sa_k, mb_k, sb_k, t_k = _kl_tail(a_row, b_row, V, n_full, ma_k, sa_k, mb_k, sb_k, t_k, inv_temp, J, G,
                                                   VEC)  # fmt: skip
        if has_tail | ((n_full & (SEG - 1)) != 0):  # (else the last segment was a whole one, merged in the loop)
            ma, sa, mb, sb, t = _kl_merge(ma, sa, mb, sb, t, ma_k, sa_k, mb_k, sb_k, t_k)
        _kl_finish(row, ma, sa, mb, sb, t, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr)
    else:
        _kl_masked(row, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr)


@triton.jit
def _kl_fwd_split_kernel(
    a_ptr, b_ptr, mask_ptr, ws_ptr, V, T_a, stride_ab, stride_at, T_b, stride_bb, stride_bt, inv_temp,
    HAS_MASK: tl.constexpr, SEG: tl.constexpr, J: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
    PACKED_A: tl.constexpr, PACKED_B: tl.constexpr,
):  # fmt: skip
    # Split path, stage 1: program (row, k) writes segment k's group states to ws[row, k] = (ma, sa, mb, sb, t) x G.
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        a_row = _row_base(a_ptr, row, T_a, stride_ab, stride_at)
        b_row = _row_base(b_ptr, row, T_b, stride_bb, stride_bt)
        if k < tl.num_programs(1) - 1:
            ma, sa, mb, sb, t = _kl_segment(a_row, b_row, V, k, inv_temp, False, SEG, J, G, VEC, PACKED_A, PACKED_B)
        else:
            ma, sa, mb, sb, t = _kl_segment(a_row, b_row, V, k, inv_temp, True, SEG, J, G, VEC, PACKED_A, PACKED_B)
        out = ws_ptr + (row * tl.num_programs(1) + k) * (5 * G) + tl.arange(0, G)
        tl.store(out, ma)
        tl.store(out + G, sa)
        tl.store(out + 2 * G, mb)
        tl.store(out + 3 * G, sb)
        tl.store(out + 4 * G, t)


@triton.jit
def _kl_fwd_merge_kernel(
    mask_ptr, ws_ptr, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr, n_seg,
    HAS_MASK: tl.constexpr, G: tl.constexpr,
):  # fmt: skip
    # Split path, stage 2: one program per row merges ws[row, 0..n_seg) in order and ends the row.
    row = tl.program_id(0).to(tl.int64)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        ma, sa, mb, sb, t = _kl_empty(G)
        for k in range(0, n_seg):
            src = ws_ptr + (row * n_seg + k) * (5 * G) + tl.arange(0, G)
            ma_k = tl.load(src)
            sa_k = tl.load(src + G)
            mb_k = tl.load(src + 2 * G)
            sb_k = tl.load(src + 3 * G)
            t_k = tl.load(src + 4 * G)
            ma, sa, mb, sb, t = _kl_merge(ma, sa, mb, sb, t, ma_k, sa_k, mb_k, sb_k, t_k)
        _kl_finish(row, ma, sa, mb, sb, t, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr)
    else:
        _kl_masked(row, kl_ptr, max_a_ptr, lognorm_a_ptr, max_b_ptr, lognorm_b_ptr)


@triton.jit
def _kl_bwd_kernel(
    x_ptr, y_ptr, mask_ptr, grad_kl_ptr, max_x_ptr, lognorm_x_ptr, max_y_ptr, lognorm_y_ptr, kl_ptr, grad_ptr,
    V, T_x, stride_xb, stride_xt, T_y, stride_yb, stride_yt, inv_temp,
    HAS_MASK: tl.constexpr, REVERSE: tl.constexpr, BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    # grid = (rows, cdiv(V, BLOCK_V)); x = logits (gets the gradient), y = ref_logits.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = offs < V
    out = grad_ptr + row * V + offs
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    if keep:
        rx = row // T_x
        ry = row // T_y
        x_row = x_ptr + rx * stride_xb + (row - rx * T_x) * stride_xt
        y_row = y_ptr + ry * stride_yb + (row - ry * T_y) * stride_yt
        g = tl.load(grad_kl_ptr + row)
        z = tl.load(x_row + offs, mask=inside, other=0.0).to(tl.float32) * inv_temp
        w = tl.load(y_row + offs, mask=inside, other=0.0).to(tl.float32) * inv_temp
        lp = (z - tl.load(max_x_ptr + row)) - tl.load(lognorm_x_ptr + row)
        lq = (w - tl.load(max_y_ptr + row)) - tl.load(lognorm_y_ptr + row)
        p = tl.exp(lp)
        if REVERSE:  # noqa: SIM108 (a constexpr branch)
            gz = g * p * ((lp - lq) - tl.load(kl_ptr + row))
        else:
            gz = g * (p - tl.exp(lq))
        tl.store(out, to_output_dtype(gz * inv_temp, grad_ptr.dtype.element_ty, ROUND_BF16), mask=inside)
    else:
        tl.store(out, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------------------------------------------------
# 2. Launchers: logits (B, T, V), ref_logits (B2, T2, V) with B * T == B2 * T2 = N, unit stride along V;
#    mask None or (N,) bool contiguous; per-row inputs (N,) fp32. Outputs are fp32 (N,).
# ---------------------------------------------------------------------------------------------------------


def _check_launch_args(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None) -> None:
    for name, x in (("logits", logits), ("ref_logits", ref_logits)):
        if x.dim() != 3 or (x.stride(2) != 1 and x.shape[2] > 1):
            raise ValueError(
                f"{name} must be a (B, T, V) tensor whose last dimension is contiguous, got shape "
                f"{tuple(x.shape)} strides {x.stride()}; call rlhf_kernels.kl_from_logits, which copies if needed"
            )
    n = logits.shape[0] * logits.shape[1]
    if ref_logits.shape[2] != logits.shape[2] or ref_logits.shape[0] * ref_logits.shape[1] != n:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in rows or V")
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool or not mask.is_contiguous()):
        raise ValueError(f"mask must be a contiguous bool tensor of shape ({n},)")


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.shape[1], x.stride(0), x.stride(1)


def _block_config(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[int, int]:
    return row_launch_config(logits.shape[2], max(logits.element_size(), ref_logits.element_size()))


def kl_fwd_triton(logits, ref_logits, mask, inv_temperature: float, reverse: bool):
    _check_launch_args(logits, ref_logits, mask)
    n = logits.shape[0] * logits.shape[1]
    kl, m_p, ln_p, m_q, ln_q = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(5))
    if n > 0:
        a, b = (logits, ref_logits) if reverse else (ref_logits, logits)
        stats = (m_p, ln_p, m_q, ln_q) if reverse else (m_q, ln_q, m_p, ln_p)
        V = logits.shape[2]
        elem = max(logits.element_size(), ref_logits.element_size())
        tile, warps = row_tile(V, elem)
        seg = seg_blocks(V, elem)
        block = tile["J"] * tile["G"] * tile["VEC"]
        n_seg = ((V + block - 1) // block + seg - 1) // seg
        m = mask if mask is not None else kl
        args = (V, *_strides(a), *_strides(b), inv_temperature)
        flags = dict(HAS_MASK=mask is not None, num_warps=warps, enable_fp_fusion=FP_FUSION)
        packed = dict(PACKED_A=packed_rows(a, tile["VEC"]), PACKED_B=packed_rows(b, tile["VEC"]))
        if split_rows(n, n_seg, logits.device):  # small batch: one program per (row, segment), then a merge
            ws = torch.empty((n, n_seg, 5, tile["G"]), dtype=torch.float32, device=logits.device)
            _kl_fwd_split_kernel[(n, n_seg)](a, b, m, ws, *args, SEG=seg, **tile, **packed, **flags)
            _kl_fwd_merge_kernel[(n,)](m, ws, kl, *stats, n_seg, G=tile["G"], **flags)
        else:
            _kl_fwd_kernel[(n,)](a, b, m, kl, *stats, *args, SEG=seg, **tile, **packed, **flags)
    return kl, m_p, ln_p, m_q, ln_q


def kl_bwd_triton(logits, ref_logits, mask, grad_kl, m_p, ln_p, m_q, ln_q, kl, inv_temperature, reverse):
    _check_launch_args(logits, ref_logits, mask)
    B, T, V = logits.shape
    grad_kl, m_p, ln_p, m_q, ln_q, kl = row_inputs(
        "kl_bwd", (B * T,), grad_kl=grad_kl, row_max=m_p, log_norm=ln_p, ref_row_max=m_q, ref_log_norm=ln_q, kl=kl
    )
    grad = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    if B * T > 0:
        block, warps = _block_config(logits, ref_logits)
        _kl_bwd_kernel[(B * T, triton.cdiv(V, block))](
            logits, ref_logits, mask if mask is not None else kl, grad_kl, m_p, ln_p, m_q, ln_q, kl, grad,
            V, *_strides(logits), *_strides(ref_logits), inv_temperature,
            HAS_MASK=mask is not None, REVERSE=bool(reverse), BLOCK_V=block,
            ROUND_BF16=interpreter_rounds_bf16(logits.dtype), num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return grad


# ---------------------------------------------------------------------------------------------------------
# 3. torch.library ops: torch.ops.rlhf_kernels.kl_fwd / kl_bwd (these launchers, the compiled ops or the
#    reference, by their trailing `backend` argument) are defined from the op table, rlhf_kernels/_registry.py,
#    which also holds their contract and fake implementations.
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# 4. Autograd
# ---------------------------------------------------------------------------------------------------------


class KLFunction(torch.autograd.Function):
    """logits (B, T, V), ref_logits (B2, T2, V), mask (N,) bool | None -> fp32 kl (N,), differentiable in logits."""

    @staticmethod
    def forward(ctx, logits, ref_logits, mask, inv_temperature, reverse, backend):
        kl, *stats = torch.ops.rlhf_kernels.kl_fwd(logits, ref_logits, mask, inv_temperature, reverse, backend)
        ctx.save_for_backward(logits, ref_logits, mask, *stats, kl)  # the inputs are the caller's; the rest O(N)
        ctx.args = (inv_temperature, reverse, backend)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, mask, m_p, ln_p, m_q, ln_q, kl = ctx.saved_tensors
        grad = torch.ops.rlhf_kernels.kl_bwd(
            logits, ref_logits, mask, grad_kl.float().contiguous(), m_p, ln_p, m_q, ln_q, kl, *ctx.args
        )
        return (
            grad,  # logits
            None,  # ref_logits: the reference is frozen
            None,  # mask
            None,  # inv_temperature
            None,  # reverse
            None,  # backend
        )


# ---------------------------------------------------------------------------------------------------------
# 5. Public API
# ---------------------------------------------------------------------------------------------------------


def check_direction(direction: str) -> bool:
    """``True`` for reverse KL(pi || pi_ref), ``False`` for forward KL(pi_ref || pi)."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; valid directions are {', '.join(KL_DIRECTIONS)}")
    return direction == "reverse"


def kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    direction: str = "reverse",
    backend: str | None = None,
) -> torch.Tensor:
    """Exact per-token KL between the policy and the reference over the whole vocabulary, fused.

    Args:
        logits: ``(..., V)`` policy logits, float32, bfloat16 or float16. Only the last dimension needs unit
            stride; other strides (e.g. ``logits[:, :-1]``) are read in place.
        ref_logits: ``(..., V)`` reference logits, same shape, any of the three float dtypes (may differ from
            ``logits``). Frozen: it never gets a gradient.
        temperature: both logits are divided by it (> 0).
        mask: optional ``(...)`` bool (or 0/1) tensor; rows where it is False are not read and give 0.0.
        direction: ``"reverse"``: KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v)), the PPO penalty;
            ``"forward"``: KL(pi_ref || pi).
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``; default as for :func:`rlhf_kernels.logprobs`.

    Returns:
        fp32 tensor of shape ``(...)``, differentiable with respect to ``logits`` (gradient in its dtype). Values
        that rounding makes slightly negative (|KL| ~ 1e-7 for nearly equal rows) are clamped to 0.0, so the
        result is never negative; identical inputs give exactly 0.0. A row holding a NaN or +-inf logit in
        either input gives NaN (mask vocabulary entries with a large finite negative number instead of -inf).

    One pass over both rows (online maxima and sums in fp32, see the module docstring) with O(N) statistics saved;
    the backward re-reads both rows. No fp32 ``(N, V)`` tensor is allocated. For one kernel backend and device, a
    row's result is bitwise identical whatever else is in the batch.

    Example::

        kl = rlhf_kernels.kl_from_logits(logits[:, :-1], ref_logits[:, :-1], mask=response_mask)
    """
    check_float_tensor("logits", logits)
    check_float_tensor("ref_logits", ref_logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if ref_logits.dim() == 0 or ref_logits.shape[-1] != logits.shape[-1]:
        raise ValueError(
            f"logits and ref_logits must have the same vocabulary size, got {tuple(logits.shape)} and "
            f"{tuple(ref_logits.shape)}"
        )
    if ref_logits.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"logits and ref_logits must have the same leading shape, got {tuple(logits.shape)} and "
            f"{tuple(ref_logits.shape)}"
        )
    if ref_logits.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but ref_logits are on {ref_logits.device}")
    temperature = check_temperature(temperature)
    reverse = check_direction(direction)
    lead = logits.shape[:-1]
    mask = None if mask is None else bool_mask(mask, lead, logits.device)
    name = resolve_backend(backend, logits.device, "kl")
    if name == "reference":
        return reference.kl_from_logits(logits, ref_logits, temperature, mask, direction).float()
    x, y = rows_3d(logits), rows_3d(ref_logits.detach())  # (B, T, V) views, no copy for the usual layouts
    m = None if mask is None else mask.reshape(-1).contiguous()
    kl = KLFunction.apply(x, y, m, 1.0 / temperature, reverse, name)
    return kl.view(lead)
