"""The compiled PPO loss ops torch.ops.rlhf_kernels_C.ppo_policy_fwd / ppo_value_fwd against an fp64 rendition of
the formulas of their schemas (csrc/module.cpp): hand-computed tokens, random inputs over several blocks, tokens
that do not count, determinism, and argument errors."""

import math

import pytest
import torch

from rlhf_kernels._backend import load_ext

load_ext()  # imports rlhf_kernels._C when it is built, which registers the ops

U = 2.0**-24  # fp32 unit roundoff
# Relative error bound of r = exp(d) in ulps on each backend: exp_f32 (csrc/cpu/vec_math.h) is below 1 ulp, CUDA's
# expf below 2. One ulp is at most 2 u relative.
EXP_ULPS = {"cpu": 1, "cuda": 2}


def _registered(op, key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_kernels_C::{op}", key)
    except RuntimeError:  # the schema itself is missing
        return False


DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (_registered("ppo_policy_fwd", "CPU") and _registered("ppo_value_fwd", "CPU")),
            reason="rlhf_kernels._C lacks the CPU PPO loss ops",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and _registered("ppo_policy_fwd", "CUDA")),
            reason="needs CUDA and the CUDA PPO loss ops",
        ),
    ),
]


def term_rtol(device):
    """Relative error of one token's fp32 terms against fp64: r from exp (2 * EXP_ULPS u), the product with -A and
    the one with the weight (u each), and u for 1 - clip_low or dual_clip rounded to fp32 (at most one of r, the
    bound enters a term)."""
    return (2 * EXP_ULPS[device] + 3) * U


def sum_rtol(device):
    """Bound on |sums - fp64 sum| / sum |terms|: every term's own error, plus one rounding of each per-block
    partial to fp32 (the backends add a block's terms in fp64, whose error is negligible at these lengths)."""
    return term_rtol(device) + U


def policy_op(lp, olp, adv, w, clip_low, clip_high, dual_clip, loss_type=0, ratio_level=0, offsets=None,
              tau_pos=1.0, tau_neg=1.05):  # fmt: skip
    """The compiled op; by default loss_type clip at ratio_level token (no offsets: an empty table, never read)."""
    if offsets is None:
        offsets = torch.empty(0, dtype=torch.int64, device=lp.device)
    args = (clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos, tau_neg)
    return torch.ops.rlhf_kernels_C.ppo_policy_fwd(lp, olp, adv, w, offsets, *args)


def value_op(v, old, ret, w, clip):
    return torch.ops.rlhf_kernels_C.ppo_value_fwd(v, old, ret, w, clip)


def ref_policy(lp, olp, adv, w, clip_low, clip_high, dual_clip):
    """Schema formulas of loss_type clip at ratio_level token in fp64, on CPU. Returns grad (N,) and the per-token
    terms (5, N) whose sums are the op's sums. d is formed in fp32 like the op does (exp turns its rounding into up to
    20 u); the rest is fp64."""
    lp, olp, adv, w = (x.cpu() for x in (lp, olp, adv, w))
    d = (lp - olp).double()
    A, W = adv.double(), w.double()
    r = d.clamp(-20, 20).exp()
    l1 = -A * r
    l2 = -A * r.clamp(1 - clip_low, 1 + clip_high)
    clipped = l2 > l1
    loss = torch.where(clipped, l2, l1)
    lower = (A < 0) & (loss > -A * dual_clip) if dual_clip > 0 else torch.zeros_like(clipped)
    loss = torch.where(lower, -A * dual_clip, loss)
    dl = torch.where(clipped | lower | (d.abs() > 20), 0.0, -A * r)
    counts = w != 0
    low, high = (clipped & (A < 0)).double(), (clipped & (A > 0)).double()
    terms = torch.stack([W * loss, low, high, olp.double() - lp.double(), lower.double()])
    return torch.where(counts, W * dl, 0.0), torch.where(counts, terms, 0.0)


def ref_value(v, old, ret, w, clip):
    """Same for the value loss: terms (2, N). The clip range old -+ clip is formed in fp32 like the op does (b is a
    difference from it, so its rounding would otherwise be amplified by cancellation)."""
    v, old, ret, w = (x.cpu() for x in (v, old, ret, w))
    lo, hi = (old - clip).double(), (old + clip).double()
    V, R, W = v.double(), ret.double(), w.double()
    a = V - R
    b = torch.minimum(torch.maximum(V, lo), hi) - R
    clipped = b * b > a * a
    loss = 0.5 * torch.where(clipped, b * b, a * a)
    counts = w != 0
    terms = torch.stack([W * loss, clipped.double()])
    return torch.where(counts & ~clipped, W * a, 0.0), torch.where(counts, terms, 0.0)


COUNT_COLS = {5: (1, 2, 4), 2: (1,)}  # the count columns of the policy sums (5) and the value sums (2)


def check_against_ref(device, grad, sums, ref_grad, ref_terms):
    assert grad.dtype == torch.float32 and grad.shape == ref_grad.shape
    assert sums.dtype == torch.float32 and sums.shape == (ref_terms.size(0),)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=term_rtol(device), atol=0)
    sums = sums.cpu().double()
    count_cols = COUNT_COLS[ref_terms.size(0)]
    for col in range(ref_terms.size(0)):
        expect = ref_terms[col].sum().item()
        if col in count_cols:  # counts are exact
            assert sums[col].item() == expect, (col, sums[col].item(), expect)
        else:
            bound = sum_rtol(device) * ref_terms[col].abs().sum().item()
            assert abs(sums[col].item() - expect) <= bound, (col, sums[col].item(), expect, bound)


def tensors(device, *cols):
    return [torch.tensor(c, dtype=torch.float32, device=device) for c in cols]


# (lp, olp, A, w, clip_low, clip_high, dual_clip) -> (grad, weight * l, clip-low, clip-high, old - lp, lower), one
# token each, loss_type clip at ratio_level token.
# Unless noted clip_low = clip_high = 0.25, so r is clamped to [0.75, 1.25]; l1 = -A r, l2 = -A clamp(r).
E = math.exp
POLICY_HAND = {
    # r = 1: l1 = l2 = -2 (a tie is not clipped), grad -A r = -2
    "inside": ((0.0, 0.0, 2.0, 1.0, 0.25, 0.25, 3.0), (-2.0, -2.0, 0, 0, 0.0, 0)),
    # r = e^0.5 = 1.649 > 1.25: l2 = -2.5 > l1 = -3.297: clipped (clip-high: A > 0), no gradient
    "A>0 above": ((0.5, 0.0, 2.0, 1.0, 0.25, 0.25, 3.0), (0.0, -2.5, 0, 1, -0.5, 0)),
    # r = e^-0.5 = 0.607 < 0.75: l2 = -1.5 < l1 = -1.213: not clipped (the min keeps the unclipped term)
    "A>0 below": ((-0.5, 0.0, 2.0, 1.0, 0.25, 0.25, 3.0), (-2 * E(-0.5), -2 * E(-0.5), 0, 0, 0.5, 0)),
    # A = -2, r = 0.607: l1 = 1.213 < l2 = 2 * 0.75 = 1.5: clipped (clip-low: A < 0)
    "A<0 below": ((-0.5, 0.0, -2.0, 1.0, 0.25, 0.25, 3.0), (0.0, 1.5, 1, 0, 0.5, 0)),
    # A = -2, r = 1.649: l1 = 3.297 > l2 = 2.5: not clipped; 3.297 < -A dual_clip = 6: no dual clip
    "A<0 above": ((0.5, 0.0, -2.0, 1.0, 0.25, 0.25, 3.0), (2 * E(0.5), 2 * E(0.5), 0, 0, -0.5, 0)),
    # A = -1, r = e^1.5 = 4.482 > 3 = -A dual_clip: l = 3, lower, no gradient
    "dual clip": ((1.5, 0.0, -1.0, 1.0, 0.25, 0.25, 3.0), (0.0, 3.0, 0, 0, -1.5, 1)),
    # the same token with dual clipping off: l = 4.482, gradient 4.482
    "dual off": ((1.5, 0.0, -1.0, 1.0, 0.25, 0.25, 0.0), (E(1.5), E(1.5), 0, 0, -1.5, 0)),
    # clip range [1, 1] and r = 1: l1 = l2 = -1, a tie: not clipped, gradient -1
    "clip tie": ((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 3.0), (-1.0, -1.0, 0, 0, 0.0, 0)),
    # A = 0: l1 = l2 = 0, not clipped, gradient 0
    "A=0": ((0.5, 0.0, 0.0, 1.0, 0.25, 0.25, 3.0), (0.0, 0.0, 0, 0, -0.5, 0)),
    # d = 24 - (-1) = 25 > 20: r = e^20, A = -2^-10: l = l1 = 2^-10 e^20 (dual off), no gradient (flat clamp)
    "d>20": ((24.0, -1.0, -(2**-10), 1.0, 0.25, 0.25, 0.0), (0.0, 2**-10 * E(20), 0, 0, -25.0, 0)),
    # d = 18.5 - (-1.5) = 20 exactly: same l, and the gradient 2^-10 e^20 flows
    "d=20": ((18.5, -1.5, -(2**-10), 1.0, 0.25, 0.25, 0.0), (2**-10 * E(20), 2**-10 * E(20), 0, 0, -20.0, 0)),
    # d = -20.5: r = e^-20 < 0.75, A = 1: l1 = -e^-20 > l2 = -0.75: not clipped, l = -e^-20, no gradient
    "d<-20": ((-21.0, -0.5, 1.0, 1.0, 0.25, 0.25, 3.0), (0.0, -E(-20), 0, 0, 20.5, 0)),
    # d = -20.25 - (-0.25) = -20 exactly: gradient -e^-20
    "d=-20": ((-20.25, -0.25, 1.0, 1.0, 0.25, 0.25, 3.0), (-E(-20), -E(-20), 0, 0, 20.0, 0)),
    # weight 0.5 on "inside": grad 0.5 * -2, term 0.5 * -2 (the log-ratio term is not weighted)
    "weight": ((0.0, 0.0, 2.0, 0.5, 0.25, 0.25, 3.0), (-1.0, -1.0, 0, 0, 0.0, 0)),
    # weight 0: nothing counts, whatever the other inputs hold
    "weight 0, NaN": ((math.nan, math.inf, math.nan, 0.0, 0.25, 0.25, 3.0), (0.0, 0.0, 0, 0, 0.0, 0)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(POLICY_HAND))
def test_policy_hand_computed(device, case):
    (lp, olp, adv, w, cl, ch, dual), (g, loss, low, high, kl, lower) = POLICY_HAND[case]
    inputs = tensors(device, [lp], [olp], [adv], [w])
    grad, sums = policy_op(*inputs, cl, ch, dual)
    assert sums.shape == (5,)
    rtol = term_rtol(device)
    assert grad.item() == pytest.approx(g, rel=rtol, abs=0)
    assert sums[0].item() == pytest.approx(loss, rel=rtol, abs=0)
    assert sums[3].item() == pytest.approx(kl, rel=U, abs=0)
    assert (sums[1].item(), sums[2].item(), sums[4].item()) == (low, high, lower)
    check_against_ref(device, grad, sums, *ref_policy(*inputs, cl, ch, dual))


# (v, old, R, w, clip) -> (grad, weight * l, clipped), one token each.
# a = v - R, vc = clamp(v, old - clip, old + clip), b = vc - R.
VALUE_HAND = {
    # vc = v = 1: a = b = 1, l = 0.5, gradient a = 1
    "inside": ((1.0, 1.0, 0.0, 1.0, 0.5), (1.0, 0.5, 0)),
    # vc = 1.5: a = 2, b = 1.5, b^2 = 2.25 < 4: not clipped, l = 2, gradient 2
    "clip helps": ((2.0, 1.0, 0.0, 1.0, 0.5), (2.0, 2.0, 0)),
    # R = 3: a = -1, b = 1.5 - 3 = -1.5, 2.25 > 1: clipped, l = 1.125, no gradient
    "clipped": ((2.0, 1.0, 3.0, 1.0, 0.5), (0.0, 1.125, 1)),
    # old = -2.5: vc = -2, b = -2, b^2 = a^2 = 4: a tie is not clipped, l = 2, gradient 2
    "tie": ((2.0, -2.5, 0.0, 1.0, 0.5), (2.0, 2.0, 0)),
    # clip = inf: no clipping, a = 5, l = 12.5
    "clip=inf": ((5.0, 0.0, 0.0, 1.0, math.inf), (5.0, 12.5, 0)),
    # clip = 0: vc = old = 0, a = -1, b = -2: clipped, l = 2
    "clip=0": ((1.0, 0.0, 2.0, 1.0, 0.0), (0.0, 2.0, 1)),
    # weight 2 on "inside": grad 2, term 1
    "weight": ((1.0, 1.0, 0.0, 2.0, 0.5), (2.0, 1.0, 0)),
    "weight 0, NaN": ((math.nan, -math.inf, math.inf, 0.0, 0.5), (0.0, 0.0, 0)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(VALUE_HAND))
def test_value_hand_computed(device, case):
    (v, old, ret, w, clip), (g, loss, clipped) = VALUE_HAND[case]
    inputs = tensors(device, [v], [old], [ret], [w])
    grad, sums = value_op(*inputs, clip)
    assert sums.shape == (2,)
    # every value here is exact in fp32: exact results
    assert (grad.item(), sums[0].item(), sums[1].item()) == (g, loss, clipped)
    check_against_ref(device, grad, sums, *ref_value(*inputs, clip))


def policy_inputs(n, device, clip_low, clip_high, dual_clip):
    """Random tokens: ratios around the clip range, about 10% not counting (NaN inputs among them), fractional
    weights, and saturated log-ratios (|d| > 20 and |d| = 20 exactly). Tokens whose clip or dual-clip decision lies
    within 1e-5 (relative) of its threshold are made not to count: fp32 rounding may decide them either way."""
    olp = -5 * torch.rand(n)
    lp = olp + 0.3 * torch.randn(n)
    adv = torch.randn(n)
    w = torch.where(torch.rand(n) < 0.5, 1.0, torch.rand(n))
    idx = torch.randperm(n)
    sat = idx[: max(1, n // 50)]
    lp[sat] = olp[sat] + torch.where(torch.rand(sat.numel()) < 0.5, 25.0, -25.0)
    edge = idx[n // 50 : n // 50 + max(1, n // 100)]
    olp[edge], lp[edge] = -1.5, 18.5  # d = 20 exactly
    off = idx[n - n // 10 :]
    w[off] = 0.0
    lp[off[::2]], adv[off[1::2]] = math.nan, math.inf
    r = (lp - olp).double().clamp(-20, 20).exp()
    A = adv.double()
    near = ((r - (1 - clip_low)).abs() < 1e-5) | ((r - (1 + clip_high)).abs() < 1e-5 * r)
    if dual_clip > 0:
        near |= (A < 0) & ((r.clamp(1 - clip_low, None) - dual_clip).abs() < 1e-5 * dual_clip)
    w[near] = 0.0
    return [x.to(device) for x in (lp, olp, adv, w)]


def value_inputs(n, device, clip):
    v, old, ret = torch.randn(n), torch.randn(n), torch.randn(n)
    w = torch.where(torch.rand(n) < 0.5, 1.0, torch.rand(n))
    off = torch.randperm(n)[: n // 10]
    w[off] = 0.0
    v[off[::2]], old[off[1::2]] = math.nan, -math.inf
    lo, hi = (old - clip).double(), (old + clip).double()
    a = v.double() - ret.double()
    b = torch.minimum(torch.maximum(v.double(), lo), hi) - ret.double()
    near = (b != a) & ((b * b - a * a).abs() < 1e-5 * (a * a + b * b))  # see policy_inputs
    w[near] = 0.0
    return [x.to(device) for x in (v, old, ret, w)]


SIZES = [1, 31, 32, 33, 2048, 2049, 3 * 2048 + 5, 20000]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("clips", [(0.2, 0.2, 0.0), (0.2, 0.28, 3.0), (0.0, 0.0, 1.5)])
def test_policy_matches_reference(device, n, clips):
    inputs = policy_inputs(n, device, *clips)
    grad, sums = policy_op(*inputs, *clips)
    check_against_ref(device, grad, sums, *ref_policy(*inputs, *clips))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("clip", [0.2, 0.0, 10.0, math.inf])
def test_value_matches_reference(device, n, clip):
    inputs = value_inputs(n, device, clip)
    grad, sums = value_op(*inputs, clip)
    check_against_ref(device, grad, sums, *ref_value(*inputs, clip))


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_tokens_are_never_read(device):
    """Tokens of weight 0 (which do not count) give the same outputs, bit for bit, whether they hold zeros or NaN
    or inf."""
    n = 2 * 2048 + 100
    clips = (0.2, 0.28, 3.0)
    clean = policy_inputs(n, device, *clips)
    clean = [torch.nan_to_num(x, nan=0.0, posinf=0.0) for x in clean]
    off = clean[3] == 0
    for k in range(3):
        dirty = [x.clone() for x in clean]
        dirty[k][off] = (math.nan, math.inf, -math.inf)[k]
        for a, b in zip(policy_op(*clean, *clips), policy_op(*dirty, *clips)):
            assert torch.equal(a, b)
        assert (policy_op(*dirty, *clips)[0][off] == 0).all()
    v_clean = [torch.where(off, 0.0, torch.randn(n, device=device)) for _ in range(3)] + [clean[3]]
    v_dirty = [torch.where(off, math.nan, x) for x in v_clean[:3]] + [clean[3]]
    for a, b in zip(value_op(*v_clean, 0.2), value_op(*v_dirty, 0.2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    x = torch.empty(0, device=device)
    grad, sums = policy_op(x, x, x, x, 0.2, 0.2, 3.0)
    assert grad.shape == (0,) and sums.shape == (5,) and not sums.any()
    for level, offsets in ((1, [0]), (2, [0, 0, 0])):  # no sequence, or empty ones
        for loss_type in range(3):
            o = torch.tensor(offsets, device=device)
            grad, sums = policy_op(x, x, x, x, 0.2, 0.2, 0.0, loss_type, level, o)
            assert grad.shape == (0,) and sums.shape == (5,) and not sums.any()
    grad, sums = value_op(x, x, x, x, 0.2)
    assert grad.shape == (0,) and sums.shape == (2,) and not sums.any()


@pytest.mark.parametrize("n", [2048, 5 * 2048 + 77, 100_000, 300_001])
def test_cpu_deterministic_across_threads(n):
    if not _registered("ppo_policy_fwd", "CPU"):
        pytest.skip("rlhf_kernels._C lacks the CPU PPO loss ops")
    clips = (0.2, 0.28, 3.0)
    p_in, v_in = policy_inputs(n, "cpu", *clips), value_inputs(n, "cpu", 0.2)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append((*policy_op(*p_in, *clips), *value_op(*v_in, 0.2)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_repeat(device):
    clips = (0.2, 0.28, 3.0)
    inputs = policy_inputs(50_000, device, *clips)
    for a, b in zip(policy_op(*inputs, *clips), policy_op(*inputs, *clips)):
        assert torch.equal(a, b)


def _bad_policy_calls(device):
    x = torch.zeros(8, device=device)
    ok = (x, x, x, x)
    o = torch.tensor([0, 3, 8], device=device)  # a valid table for N = 8
    seq = (0.2, 0.2, 0.0, 0, 1)  # clips, loss_type clip, ratio_level sequence: the offsets are read
    return {
        "dtype": ((x, x, x.double(), x, 0.2, 0.2, 0.0), "advantages must be float32"),
        "bf16": ((x.bfloat16(), x, x, x, 0.2, 0.2, 0.0), "logprobs must be float32"),
        "length": ((x, x[:7], x, x, 0.2, 0.2, 0.0), "old_logprobs must have the length of logprobs"),
        "2-D": ((x.view(2, 4), x.view(2, 4), x.view(2, 4), x.view(2, 4), 0.2, 0.2, 0.0), "must be 1-D"),
        "non-contiguous": ((x, x, x, torch.zeros(16, device=device)[::2], 0.2, 0.2, 0.0), "weight must be contig"),
        "dual 0.5": ((*ok, 0.2, 0.2, 0.5), "dual_clip must be 0"),
        "dual 1": ((*ok, 0.2, 0.2, 1.0), "dual_clip must be 0"),
        "dual < 0": ((*ok, 0.2, 0.2, -3.0), "dual_clip must be 0"),
        "clip_low < 0": ((*ok, -0.1, 0.2, 0.0), "clip_low must be finite and >= 0"),
        "clip_low inf": ((*ok, math.inf, 0.2, 0.0), "clip_low must be finite and >= 0"),
        "clip_high nan": ((*ok, 0.2, math.nan, 0.0), "clip_high must be finite and >= 0"),
        "loss_type 3": ((*ok, 0.2, 0.2, 0.0, 3), r"loss_type must be 0 \(clip\), 1 \(cispo\) or 2 \(sapo\), got 3"),
        "loss_type -1": ((*ok, 0.2, 0.2, 0.0, -1), r"loss_type must be 0 \(clip\), 1 \(cispo\) or 2 \(sapo\)"),
        "ratio_level 3": (
            (*ok, 0.2, 0.2, 0.0, 0, 3, o),
            r"ratio_level must be 0 \(token\), 1 \(sequence\) or 2 \(sequence_token\), got 3",
        ),
        "dual with cispo": (
            (*ok, 0.2, 0.2, 3.0, 1),
            r"dual_clip applies only to loss_type 0 \(clip\); pass dual_clip = 0 with loss_type 1 \(cispo\)",
        ),
        "dual with sapo": ((*ok, 0.2, 0.2, 3.0, 2, 1, o), r"dual_clip = 0 with loss_type 2 \(sapo\), got dual_clip 3"),
        "tau_pos 0": ((*ok, 0.2, 0.2, 0.0, 2, 0, None, 0.0), "tau_pos must be finite and > 0"),
        "tau_pos inf": ((*ok, 0.2, 0.2, 0.0, 2, 0, None, math.inf), "tau_pos must be finite and > 0"),
        "tau_neg nan": ((*ok, 0.2, 0.2, 0.0, 2, 0, None, 1.0, math.nan), "tau_neg must be finite and > 0"),
        "tau_neg < 0": ((*ok, 0.2, 0.2, 0.0, 0, 0, None, 1.0, -1.0), "tau_neg must be finite and > 0"),
        "offsets int32": ((*ok, *seq, o.int()), r"seq_offsets must be int64, got Int \(convert with .long\(\)\)"),
        "offsets int32, token level": ((*ok, 0.2, 0.2, 0.0, 0, 0, o.int()), "seq_offsets must be int64"),
        "offsets 2-D": ((*ok, *seq, o.view(1, 3)), r"seq_offsets must be 1-D \(S \+ 1,\)"),
        "offsets strided": ((*ok, *seq, o.repeat_interleave(2)[::2]), "seq_offsets must be contiguous"),
        "offsets empty": (
            (*ok, *seq, o[:0]),
            "seq_offsets must have at least one entry when ratio_level != 0",
        ),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_bad_policy_calls("cpu")))
def test_policy_bad_inputs(device, case):
    args, msg = _bad_policy_calls(device)[case]
    with pytest.raises(RuntimeError, match=msg):
        policy_op(*args)


@pytest.mark.parametrize(
    "offsets,msg",
    [
        ([1, 3, 8], r"seq_offsets\[0\] must be 0 \(the first sequence starts at token 0\), got 1"),
        ([0, 3, 7], r"seq_offsets\[-1\] must be N = 8 \(the number of tokens"),
        ([0, 3, 9], r"seq_offsets\[-1\] must be N = 8"),
        ([0, 5, 3, 8], r"seq_offsets must be non-decreasing, got seq_offsets\[2\] = 3 < seq_offsets\[1\] = 5"),
        ([0], r"seq_offsets\[-1\] must be N = 8"),
    ],
)
def test_cpu_rejects_bad_offset_values(offsets, msg):
    """The CPU backend checks the table's values when it reads it (ratio_level != 0), and ignores them otherwise."""
    if not _registered("ppo_policy_fwd", "CPU"):
        pytest.skip("rlhf_kernels._C lacks the CPU PPO loss ops")
    x = torch.zeros(8)
    bad = torch.tensor(offsets)
    for level in (1, 2):
        with pytest.raises(RuntimeError, match=msg):
            policy_op(x, x, x, x, 0.2, 0.2, 0.0, 0, level, bad)
    for a, b in zip(policy_op(x, x, x, x, 0.2, 0.2, 0.0, 0, 0, bad), policy_op(x, x, x, x, 0.2, 0.2, 0.0)):
        assert torch.equal(a, b)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _registered("ppo_policy_fwd", "CUDA")), reason="needs the CUDA PPO loss ops"
)
def test_cuda_offsets_device_and_clamping():
    """CUDA: the table must be on the tokens' device; its values are not checked (no host sync) but clamped into
    [0, N], so an out-of-range first or last offset acts as 0 or N."""
    x = torch.zeros(8, device="cuda")
    with pytest.raises(RuntimeError, match=r"seq_offsets must be on the device of logprobs \(cuda:0\), got cpu"):
        policy_op(x, x, x, x, 0.2, 0.2, 0.0, 0, 1, torch.tensor([0, 8]))
    lp, olp, adv, w = (torch.randn(8, device="cuda") for _ in range(4))
    for level in (1, 2):
        good = policy_op(lp, olp, adv, w, 0.2, 0.2, 0.0, 0, level, torch.tensor([0, 3, 3, 8], device="cuda"))
        clamped = policy_op(lp, olp, adv, w, 0.2, 0.2, 0.0, 0, level, torch.tensor([-5, 3, 3, 100], device="cuda"))
        for a, b in zip(good, clamped):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_value_bad_inputs(device):
    x = torch.zeros(8, device=device)
    with pytest.raises(RuntimeError, match="clip must be >= 0"):
        value_op(x, x, x, x, -0.5)
    with pytest.raises(RuntimeError, match="clip must be >= 0"):
        value_op(x, x, x, x, math.nan)
    with pytest.raises(RuntimeError, match="returns must be float32"):
        value_op(x, x, x.half(), x, 0.2)
    with pytest.raises(RuntimeError, match="weight must have the length of values"):
        value_op(x, x, x, x[:3], 0.2)
