"""Generalised advantage estimation as a parallel scan, with the masking rules of LLM RL.

The recursion runs backwards in time over the state x = (next_value, acc). A position t with mask 1 applies
    next_value' = V_t,    acc' = gamma * next_value + gamma * lam * acc + (r_t - V_t)
and a position with mask 0 leaves x unchanged. Both are affine maps of x whose linear part has the form
[[p, 0], [c, d]] (masked: p = 0, c = gamma, d = gamma lam; skipped: the identity), a form closed under
composition. So the state after step t, F_t(0) with F_t = f_t o f_{t+1} o ... o f_{T-1}, is a reverse
associative scan over 5-tuples (p, c, d, b0, b1); advantages[t] is the acc component. The kernel scans blocks of
BLOCK_T steps from the end of the row and carries the state from one block into the next, so T is unbounded. Each
block is loaded in reverse time order (lane 0 holds the block's latest step) and scanned forward: the same
compositions in the same order as a reverse scan, without ``tl.associative_scan(reverse=True)``, which has an
open upstream report of miscompiling.
Its epilogue also returns each row's (count, mean, M2) of the advantages over masked positions (Chan's merge
across blocks), which is all that whitening over the batch needs.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _registry, reference
from .._backend import resolve_backend
from .._utils import FLOAT_DTYPES, FP_FUSION, bool_mask, tl, triton
from .masked_stats import combine_row_stats, masked_whiten, whiten_with

# ---------------------------------------------------------------------------------------------------------
# 1. Triton kernel
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _compose(p1, c1, d1, x1, y1, p2, c2, d2, x2, y2):
    # Map 1 applied first, then map 2 (scanning backwards in time, map 1 is the later time step).
    return p1 * p2, c2 * p1 + d2 * c1, d1 * d2, p2 * x1 + x2, c2 * x1 + d2 * y1 + y2


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, stats_ptr, T, gamma, gamma_lam,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    lane = tl.arange(0, BLOCK_T)
    nv_carry = 0.0  # the state (next_value, acc) after all later blocks
    acc_carry = 0.0
    n = 0.0  # count, mean and M2 of the advantages at masked positions seen so far
    mean = 0.0
    m2 = 0.0
    for k in range(0, tl.cdiv(T, BLOCK_T)):
        offs = T - 1 - k * BLOCK_T - lane  # lane 0: the block's latest step
        inside = offs >= 0
        r = tl.load(r_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        keep = tl.load(m_ptr + base + offs, mask=inside, other=0) != 0
        p = tl.where(keep, 0.0, 1.0)
        c = tl.where(keep, gamma, 0.0)
        d = tl.where(keep, gamma_lam, 1.0)
        x = tl.where(keep, v, 0.0)
        y = tl.where(keep, r - v, 0.0)
        p, c, d, x, y = tl.associative_scan((p, c, d, x, y), 0, _compose)  # forward over reversed time
        nv = p * nv_carry + x
        acc = c * nv_carry + d * acc_carry + y
        tl.store(adv_ptr + base + offs, acc, mask=inside)
        tl.store(ret_ptr + base + offs, acc + v, mask=inside)
        first = lane == BLOCK_T - 1  # the block's earliest step carries into the next block
        nv_carry = tl.sum(tl.where(first, nv, 0.0), axis=0)
        acc_carry = tl.sum(tl.where(first, acc, 0.0), axis=0)
        w = tl.where(keep, 1.0, 0.0)
        n_b = tl.sum(w, axis=0)
        mean_b = tl.sum(w * acc, axis=0) / tl.maximum(n_b, 1.0)
        m2_b = tl.sum(w * (acc - mean_b) * (acc - mean_b), axis=0)
        n_new = n + n_b
        delta = mean_b - mean
        frac = n_b / tl.maximum(n_new, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * n * frac
        n = n_new
    tl.store(stats_ptr + row * 3, n)
    tl.store(stats_ptr + row * 3 + 1, mean)
    tl.store(stats_ptr + row * 3 + 2, m2)


# ---------------------------------------------------------------------------------------------------------
# 2. Launcher: rewards, values (B, T) contiguous, one float dtype; mask (B, T) bool contiguous. The op
#    torch.ops.rlhf_kernels.gae_fwd (contract and fake in rlhf_kernels/_registry.py) runs it for backend='triton'.
# ---------------------------------------------------------------------------------------------------------


def _check_launch_args(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    """The layout every backend of gae_fwd requires (the compiled ops check the same)."""
    x = (rewards, values, mask)
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"gae_fwd: rewards, values and mask must be (B, T) of one shape, got {[t.shape for t in x]}")
    if rewards.dtype not in FLOAT_DTYPES or values.dtype != rewards.dtype or mask.dtype != torch.bool:
        raise ValueError(f"gae_fwd: rewards and values need one float dtype, mask bool; got {[t.dtype for t in x]}")
    if not all(t.is_contiguous() for t in x):
        raise ValueError("gae_fwd: rewards, values and mask must be contiguous (call .contiguous())")


def gae_triton(rewards, values, mask, gamma: float, lam: float):
    _check_launch_args(rewards, values, mask)
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    stats = torch.empty((B, 3), dtype=torch.float32, device=rewards.device)
    if B > 0 and T > 0:
        block = min(1024, max(16, triton.next_power_of_2(T)))
        warps = 4 if block <= 512 else 8
        _gae_kernel[(B,)](
            rewards,
            values,
            mask,
            adv,
            ret,
            stats,
            T,
            gamma,
            gamma * lam,
            BLOCK_T=block,
            num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )
    else:
        stats.zero_()
    return adv, ret, stats


# ---------------------------------------------------------------------------------------------------------
# 3. Public API
# ---------------------------------------------------------------------------------------------------------


def _check_gae_args(rewards, values, mask, gamma, lam) -> torch.Tensor:
    """Validates the arguments; returns the mask as bool."""
    for name, x in (("rewards", rewards), ("values", values)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values shape {tuple(values.shape)} does not match rewards {tuple(rewards.shape)}")
    if values.device != rewards.device:
        raise ValueError(f"values are on {values.device} but rewards are on {rewards.device}")
    for name, val in (("gamma", gamma), ("lam", lam)):
        if not (0.0 <= float(val) <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {val}")
    return bool_mask(mask, rewards.shape, rewards.device)


def _kernel_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous ``dtype`` tensor outside autograd; x itself when it is one already (saves ~1.5 us)."""
    if x.dtype == dtype and not x.requires_grad and x.is_contiguous():
        return x
    return x.detach().to(dtype).contiguous()


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (https://arxiv.org/abs/1506.02438) over response tokens, as one scan.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. from :func:`rlhf_kernels.token_rewards`), any float dtype.
        values: ``(B, T)`` value estimates V_t, any float dtype.
        mask: ``(B, T)`` bool or 0/1: the positions that are actions (response tokens). Others are skipped.
        gamma, lam: discount and GAE lambda, in [0, 1].
        whiten: whiten the advantages over the masked positions of the whole batch
            (:func:`rlhf_kernels.masked_whiten`); ``returns`` are computed before whitening.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"`` (the per-time-step loop).

    Returns:
        ``(advantages, returns)``, fp32 ``(B, T)``. Going from t = T-1 down to 0 with next_value = acc = 0, a
        masked position computes delta_t = r_t + gamma next_value - V_t, acc = delta_t + gamma lam acc and sets
        next_value = V_t; a skipped position carries both. advantages[t] is acc after step t: 0 in right padding,
        and between the turns of a multi-turn response the next valid token's advantage. returns = advantages +
        values. Not differentiable (advantages are constants of the PPO update).
    """
    m = _check_gae_args(rewards, values, mask, gamma, lam)
    gamma, lam = float(gamma), float(lam)
    name = resolve_backend(backend, rewards.device, "gae")
    if name == "reference":
        adv, ret = reference.gae(rewards, values, m, gamma, lam)
        adv, ret = adv.float(), ret.float()
        return (masked_whiten(adv, m) if whiten else adv), ret
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if dtype not in FLOAT_DTYPES:  # fp64: the kernels read fp32, bf16 or fp16
        dtype = torch.float32
    r, v = _kernel_input(rewards, dtype), _kernel_input(values, dtype)
    args = (r, v, m.contiguous(), gamma, lam)
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        adv, ret, stats = torch.ops.rlhf_kernels.gae_fwd(*args, name)
    else:  # eager: the same kernels without the custom-op layer, which costs ~20 us per call on CPU
        adv, ret, stats = _registry.call("gae_fwd", name, *args)
    if whiten:  # from the kernel's per-row statistics: no extra pass over the advantages for mean and variance
        adv = whiten_with(adv, *combine_row_stats(stats), shift_mean=True)
    return adv, ret
