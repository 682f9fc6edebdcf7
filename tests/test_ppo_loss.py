"""rlhf_kernels.ppo_policy_loss / ppo_value_loss / aggregate_loss: hand-computed tokens, a plain loop over the
sequences as the aggregation oracle, and every kernel backend against the fp64 reference."""

import math

import pytest
import torch
from conftest import DEVICE, assert_within_torch_error, op_backends

import rlhf_kernels
from rlhf_kernels import reference

POLICY_BACKENDS = op_backends("ppo_policy_fwd")
VALUE_BACKENDS = op_backends("ppo_value_fwd")
AGGS = rlhf_kernels.AGG_MODES


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def surrogate(lp, old, adv, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """The clipped surrogate per token, written out in the inputs' dtype."""
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def value_terms(v, old, ret, clip):
    if clip is None:
        return 0.5 * (v - ret) ** 2
    return 0.5 * torch.maximum((v - ret) ** 2, (torch.clamp(v, old - clip, old + clip) - ret) ** 2)


def loop_aggregate(per_token, mask, agg):
    """Each mode as a loop over the sequences (all leading dimensions), the fully masked ones skipped."""
    T = per_token.shape[-1]
    rows, masks = per_token.reshape(-1, T), mask.reshape(-1, T)
    total, n_tokens, seq_terms = 0.0, 0, []
    for row, m in zip(rows, masks):
        kept = row[m]
        total, n_tokens = total + kept.sum(), n_tokens + len(kept)
        if len(kept) == 0:
            continue
        seq_terms.append(
            {"seq-mean-token-sum": kept.sum(), "seq-mean-token-mean": kept.mean()}.get(agg, kept.sum() / T)
        )
    if agg == "token-mean":
        return total / n_tokens if n_tokens else per_token.new_zeros(())
    return sum(seq_terms) / len(seq_terms) if seq_terms else per_token.new_zeros(())


def policy(lp, old, adv, mask, backend, **kw):
    lp = lp.detach().clone().requires_grad_()
    loss, stats = rlhf_kernels.ppo_policy_loss(lp, old, adv, mask, backend=backend, **kw)
    loss.backward()
    return loss.detach(), lp.grad, stats


def value(v, old, ret, mask, backend, **kw):
    v = v.detach().clone().requires_grad_()
    loss, stats = rlhf_kernels.ppo_value_loss(v, old, ret, mask, backend=backend, **kw)
    loss.backward()
    return loss.detach(), v.grad, stats


# ---------------------------------------------------------------------------------------------------------
# Hand-computed single tokens: (A, r, options) -> (loss, dloss/dlogprob, clipped, capped by the dual clip)
# ---------------------------------------------------------------------------------------------------------

POLICY_CASES = {
    # A = 1, r = 1.5 > 1.2: -A r = -1.5 < -A 1.2 = -1.2, the clipped term wins: loss -1.2, gradient 0
    "A>0 above": (1.0, 1.5, {}, -1.2, 0.0, 1, 0),
    # A = 1, r = 0.5 < 0.8: -0.5 > -0.8, the unclipped term wins: loss -0.5, gradient -A r = -0.5
    "A>0 below": (1.0, 0.5, {}, -0.5, -0.5, 0, 0),
    # A = -1, r = 1.5: 1.5 > 1.2, unclipped: loss 1.5, gradient -A r = 1.5
    "A<0 above": (-1.0, 1.5, {}, 1.5, 1.5, 0, 0),
    # A = -1, r = 0.5: 0.5 < 0.8, clipped: loss 0.8, gradient 0
    "A<0 below": (-1.0, 0.5, {}, 0.8, 0.0, 1, 0),
    # A = 2, r = 1.1 inside [0.8, 1.2]: both terms are -2.2: loss -2.2, gradient -2.2
    "inside": (2.0, 1.1, {}, -2.2, -2.2, 0, 0),
    # dual clip c = 3, A = -1, r = 4: unclipped 4 > 1.2 wins, then capped at -A c = 3: loss 3, gradient 0
    "dual active": (-1.0, 4.0, {"dual_clip": 3.0}, 3.0, 0.0, 0, 1),
    # c = 3, A = -1, r = 2: unclipped 2 < 3, no cap: loss 2, gradient 2
    "dual inactive": (-1.0, 2.0, {"dual_clip": 3.0}, 2.0, 2.0, 0, 0),
    # c = 3 applies only to A < 0: A = 0.5, r = 4: max(-2, -0.6) = -0.6 clipped, gradient 0
    "dual A>0": (0.5, 4.0, {"dual_clip": 3.0}, -0.6, 0.0, 1, 0),
    # clip_low 0.1, clip_high 0.3: A = 1, r = 1.25 < 1.3 stays unclipped (clipped at 1.2 when symmetric): -1.25
    "asym high inside": (1.0, 1.25, {"clip_low": 0.1, "clip_high": 0.3}, -1.25, -1.25, 0, 0),
    # A = 1, r = 1.4 > 1.3: clipped at -1.3, gradient 0
    "asym high clipped": (1.0, 1.4, {"clip_low": 0.1, "clip_high": 0.3}, -1.3, 0.0, 1, 0),
    # A = -1, r = 0.85 < 0.9: max(0.85, 0.9) = 0.9 clipped, gradient 0 (0.85 > 0.8 would be unclipped if symmetric)
    "asym low clipped": (-1.0, 0.85, {"clip_low": 0.1, "clip_high": 0.3}, 0.9, 0.0, 1, 0),
    # A = -1, r = 0.95 > 0.9: unclipped 0.95, gradient 0.95
    "asym low inside": (-1.0, 0.95, {"clip_low": 0.1, "clip_high": 0.3}, 0.95, 0.95, 0, 0),
}


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_hand_computed(backend, case):
    adv, r, kw, expect_loss, expect_grad, clipped, lower = POLICY_CASES[case]
    lp, old = t([math.log(r) - 0.7]), t([-0.7])
    loss, grad, stats = policy(lp, old, t([adv]), t([True], torch.bool), backend, **kw)
    assert loss.item() == pytest.approx(expect_loss, rel=1e-6)
    assert grad.item() == pytest.approx(expect_grad, rel=1e-6, abs=1e-7)
    assert stats["policy/clipfrac"].item() == clipped
    assert stats["policy/clipfrac_lower"].item() == lower
    assert stats["policy/approxkl"].item() == pytest.approx(-math.log(r), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
def test_policy_log_ratio_clamped(backend):
    # d = +25, A = -1: r = exp(20) = 485165195.4, unclipped loss -A r = 485165195.4; clamp active -> gradient 0
    # d = -25, A = +1: r = exp(-20) = 2.0611536e-9: max(-2.06e-9, -0.8) = -2.06e-9 unclipped; gradient 0
    # d = +19, A = -1: not clamped: loss = gradient = exp(19) = 178482301.0 (the clamp does not cut it)
    lp, old, adv = t([25.0, -25.0, 19.0]), t([0.0, 0.0, 0.0]), t([-1.0, 1.0, -1.0])
    for i, (loss_i, grad_i) in enumerate(((485165195.4, 0.0), (-2.0611536e-9, 0.0), (178482301.0, 178482301.0))):
        mask = torch.arange(3, device=DEVICE) == i
        loss, grad, _ = policy(lp, old, adv, mask, backend)
        assert loss.item() == pytest.approx(loss_i, rel=1e-6)
        assert grad[i].item() == pytest.approx(grad_i, rel=1e-6)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
def test_policy_stats_hand_counts(backend):
    # one row of 6 tokens (clip 0.2, dual clip 3), plus 2 padding tokens that must not count:
    #   A=1 r=1.5 clipped | A=-1 r=0.5 clipped | A=-1 r=4 capped (lower) | A=-1 r=5 capped | A=1 r=1 | A=1 r=0.9
    # clipfrac = 2/6, clipfrac_lower = 2/6, approxkl = -mean(log r) = -(ln1.5 + ln0.5 + ln4 + ln5 + 0 + ln0.9) / 6
    r = [1.5, 0.5, 4.0, 5.0, 1.0, 0.9, 1.5, 4.0]
    lp, old = t([math.log(x) for x in r]), t([0.0] * 8)
    adv = t([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0])
    mask = t([1, 1, 1, 1, 1, 1, 0, 0], torch.bool)
    loss, grad, stats = policy(lp, old, adv, mask, backend, dual_clip=3.0, agg="seq-mean-token-sum")
    # loss = -1.2 + 0.8 + 3 + 3 - 1 - 0.9 = 3.7; gradients: 0, 0, 0, 0, -1, -0.9, then 0 on the padding
    assert loss.item() == pytest.approx(3.7, rel=1e-6)
    assert grad.tolist() == pytest.approx([0, 0, 0, 0, -1.0, -0.9, 0, 0], abs=1e-6)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 6)
    assert stats["policy/clipfrac_lower"].item() == pytest.approx(2 / 6)
    kl = -sum(math.log(x) for x in r[:6]) / 6
    assert stats["policy/approxkl"].item() == pytest.approx(kl, rel=1e-5)


VALUE_CASES = {
    # v = 1, old = 0.5, R = 0, c = 0.2: clip(v) = 0.7; (v-R)^2 = 1 > 0.49: unclipped, loss 0.5, gradient v-R = 1
    "unclipped wins": (1.0, 0.5, 0.0, 0.2, 0.5, 1.0, 0),
    # v = 1, old = 0.5, R = 2: (1-2)^2 = 1 < (0.7-2)^2 = 1.69: clipped, loss 0.845, gradient 0
    "clipped wins": (1.0, 0.5, 2.0, 0.2, 0.845, 0.0, 1),
    # v = 0.6 inside [0.3, 0.7], R = 0: both 0.36: loss 0.18, gradient 0.6, not clipped
    "inside": (0.6, 0.5, 0.0, 0.2, 0.18, 0.6, 0),
    # clip None: plain 0.5 (v-R)^2 = 0.5 (1-2)^2 = 0.5, gradient -1
    "no clip": (1.0, 0.5, 2.0, None, 0.5, -1.0, 0),
}


@pytest.mark.parametrize("backend", VALUE_BACKENDS + ["reference"])
@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_value_hand_computed(backend, case):
    v, old, ret, clip, expect_loss, expect_grad, clipped = VALUE_CASES[case]
    loss, grad, stats = value(t([v]), t([old]), t([ret]), t([True], torch.bool), backend, clip=clip)
    assert loss.item() == pytest.approx(expect_loss, rel=1e-6)
    assert grad.item() == pytest.approx(expect_grad, rel=1e-6)
    assert stats["val/clipfrac"].item() == clipped


# ---------------------------------------------------------------------------------------------------------
# Aggregation, masking, padding
# ---------------------------------------------------------------------------------------------------------


def ragged_batch(shape=(5, 37)):
    """Rows of different lengths (one left-padded, one with holes), and a fully masked row (row 2)."""
    lp = torch.randn(shape, device=DEVICE) * 0.5 - 1.0
    old = lp + torch.randn(shape, device=DEVICE) * 0.3
    adv = torch.randn(shape, device=DEVICE)
    T = shape[-1]
    mask = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    mask[0, :] = True
    mask[1, :10] = True
    mask[3, 30:] = True
    mask[4] = torch.rand(T, device=DEVICE) > 0.5
    return lp, old, adv, mask


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_matches_loop(backend, agg):
    lp, old, adv, mask = ragged_batch()
    loss, grad, _ = policy(lp, old, adv, mask, backend, agg=agg, dual_clip=3.0)
    lp64 = lp.double().requires_grad_()
    expect = loop_aggregate(surrogate(lp64, old.double(), adv.double(), dual_clip=3.0), mask, agg)
    expect.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(grad.double(), lp64.grad, rtol=1e-5, atol=1e-8)
    assert (grad[2] == 0).all() and (grad[~mask] == 0).all()
    # the public aggregate_loss (fp32 weights, see aggregation_weights) and the reference's follow the same loop
    per_token = surrogate(lp.double(), old.double(), adv.double(), dual_clip=3.0)
    expect = loop_aggregate(per_token, mask, agg).item()
    assert rlhf_kernels.aggregate_loss(per_token, mask, agg).item() == pytest.approx(expect, rel=1e-6)
    assert reference.aggregate_loss(per_token, mask, agg).item() == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("backend", VALUE_BACKENDS + ["reference"])
@pytest.mark.parametrize("agg", AGGS)
def test_value_aggregation_matches_loop(backend, agg):
    v, old, ret, mask = ragged_batch()
    loss, grad, stats = value(v, old, ret, mask, backend, agg=agg, clip=0.1)
    v64 = v.double().requires_grad_()
    terms = value_terms(v64, old.double(), ret.double(), 0.1)
    loop_aggregate(terms, mask, agg).backward()
    assert loss.item() == pytest.approx(loop_aggregate(terms, mask, agg).item(), rel=1e-5)
    assert torch.allclose(grad.double(), v64.grad, rtol=1e-5, atol=1e-8)
    vc = torch.clamp(v, old - 0.1, old + 0.1)
    assert stats["val/clipfrac"].item() == pytest.approx(((vc - ret) ** 2 > (v - ret) ** 2)[mask].float().mean().item())


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
@pytest.mark.parametrize("agg", AGGS)
def test_fully_masked_batch(backend, agg):
    lp, old, adv = torch.randn(3, 3, 20, device=DEVICE)
    mask = torch.zeros(3, 20, dtype=torch.bool, device=DEVICE)
    loss, grad, stats = policy(lp, old, adv, mask, backend, agg=agg, dual_clip=2.0)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(s.item() == 0.0 for s in stats.values())
    if backend in VALUE_BACKENDS + ["reference"]:
        loss, grad, stats = value(lp, old, adv, mask, backend, agg=agg)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
        assert stats["val/clipfrac"].item() == 0.0
    nan = torch.full((3, 20), float("nan"), device=DEVICE, requires_grad=True)
    out = rlhf_kernels.aggregate_loss(nan, mask, agg)
    out.backward()
    assert out.item() == 0.0 and torch.equal(nan.grad, torch.zeros_like(lp))


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_padding_never_read(backend, bad):
    lp, old, adv, mask = ragged_batch()
    pad = ~mask
    dirty = [x.masked_fill(pad, bad) for x in (lp, old, adv)]
    clean = policy(lp, old, adv, mask, backend, agg="seq-mean-token-mean", dual_clip=3.0)
    out = policy(*dirty, mask, backend, agg="seq-mean-token-mean", dual_clip=3.0)
    assert torch.isfinite(out[0]) and torch.isfinite(out[1]).all() and (out[1][pad] == 0).all()
    assert torch.allclose(out[0], clean[0], rtol=1e-6) and torch.allclose(out[1], clean[1], rtol=1e-6)
    for k in clean[2]:
        assert torch.isfinite(out[2][k]) and torch.allclose(out[2][k], clean[2][k], rtol=1e-6), k
    if backend in VALUE_BACKENDS + ["reference"]:
        clean = value(lp, old, adv, mask, backend, clip=0.1)
        out = value(*dirty, mask, backend, clip=0.1)
        assert torch.isfinite(out[0]) and (out[1][pad] == 0).all()
        assert torch.allclose(out[0], clean[0], rtol=1e-6) and torch.allclose(out[1], clean[1], rtol=1e-6)
        assert out[2]["val/clipfrac"].item() == clean[2]["val/clipfrac"].item()


# ---------------------------------------------------------------------------------------------------------
# Kernel backends against the fp64 reference
# ---------------------------------------------------------------------------------------------------------

SHAPES = {  # name: (shape, per-sequence advantages, agg, dual clip)
    "B,T>1024": ((3, 700), False, "token-mean", None),  # N = 2100: three Triton programs, T not a multiple of 1024
    "T 1-D": ((1500,), False, "seq-mean-token-mean", 3.0),
    "3-D": ((2, 3, 50), False, "seq-mean-token-sum-norm", 3.0),
    "GRPO (B,)": ((5, 300), True, "seq-mean-token-sum", None),
}


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(SHAPES))
def test_policy_matches_reference(backend, dtype, case):
    shape, per_seq, agg, dual = SHAPES[case]
    lp = (torch.randn(shape, device=DEVICE) * 0.5 - 2.0).to(dtype)
    old = (lp.float() + torch.randn(shape, device=DEVICE) * (0.6 if dual else 0.2)).to(dtype)
    adv = torch.randn(shape[:-1] if per_seq else shape, device=DEVICE).to(dtype)
    mask = torch.rand(shape, device=DEVICE) > 0.2
    mask.view(-1, shape[-1])[0, : shape[-1] // 3] = False
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual, agg=agg)

    ours = policy(lp, old, adv, mask, backend, **kw)
    adv_t = adv.unsqueeze(-1).expand(shape) if per_seq else adv
    plain_lp = lp.detach().clone().requires_grad_()  # plain PyTorch in the input dtype
    plain = loop_aggregate(surrogate(plain_lp, old, adv_t, 0.2, 0.28, dual), mask, agg)
    plain.backward()
    ref_lp = lp.double().requires_grad_()
    ref, ref_stats = reference.ppo_policy_loss(ref_lp, old.double(), adv_t.double(), mask, 0.2, 0.28, dual, agg)
    ref.backward()
    assert ours[1].dtype == dtype and ours[0].dtype == torch.float32
    assert_within_torch_error(ours[0], plain.detach(), ref, 1e-6, f"{backend} {dtype} loss")
    scale = ref_lp.grad.abs().max().item()
    assert_within_torch_error(ours[1], plain_lp.grad, ref_lp.grad, 1e-6 * scale, f"{backend} {dtype} grad")
    for k, v in ref_stats.items():  # counts over the same rounded inputs: equal up to fp32 vs fp64 rounding
        assert ours[2][k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    assert ours[2]["policy/clipfrac"] > 0.05  # the test does exercise both branches
    if dual:
        assert ours[2]["policy/clipfrac_lower"] > 0


@pytest.mark.parametrize("backend", VALUE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(SHAPES))
def test_value_matches_reference(backend, dtype, case):
    shape, per_seq, agg, _ = SHAPES[case]
    v = torch.randn(shape, device=DEVICE).to(dtype)
    old = (v.float() + torch.randn(shape, device=DEVICE) * 0.3).to(dtype)
    ret = torch.randn(shape[:-1] if per_seq else shape, device=DEVICE).to(dtype)  # one return per sequence
    mask = torch.rand(shape, device=DEVICE) > 0.2
    ours = value(v, old, ret, mask, backend, clip=0.2, agg=agg)
    ret_t = ret.unsqueeze(-1).expand(shape) if per_seq else ret
    plain_v = v.detach().clone().requires_grad_()
    plain = loop_aggregate(value_terms(plain_v, old, ret_t, 0.2), mask, agg)
    plain.backward()
    ref_v = v.double().requires_grad_()
    ref, ref_stats = reference.ppo_value_loss(ref_v, old.double(), ret_t.double(), mask, 0.2, agg)
    ref.backward()
    assert ours[1].dtype == dtype
    assert_within_torch_error(ours[0], plain.detach(), ref, 1e-6, f"{backend} {dtype} loss")
    scale = ref_v.grad.abs().max().item()
    assert_within_torch_error(ours[1], plain_v.grad, ref_v.grad, 1e-6 * scale, f"{backend} {dtype} grad")
    assert ours[2]["val/clipfrac"].item() == pytest.approx(ref_stats["val/clipfrac"].item(), abs=1e-6)


def test_reference_gradcheck():
    # log ratios at least 0.05 away from the kinks ln 0.8 = -0.223, ln 1.2 = 0.182, ln 3 = 1.099
    d = t([-0.5, -0.1, 0.05, 0.4, 1.5, -0.6, 0.3], torch.float64)
    adv = t([1.0, -0.5, 2.0, -1.0, -1.0, 0.7, 1.3], torch.float64)
    old = t([-1.0, -2.0, -0.5, -3.0, -1.0, -0.2, -1.5], torch.float64)
    mask = t([1, 1, 1, 1, 1, 0, 1], torch.bool)
    lp = (old + d).requires_grad_()

    def pol(x):
        return rlhf_kernels.ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, agg="token-mean", backend="reference")[0]

    assert torch.autograd.gradcheck(pol, (lp,))
    v = t([0.0, 0.5, 1.0, -1.0, 2.0, 0.0, 0.3], torch.float64).requires_grad_()
    # |v - old_v| is 0.5 (clipped side), 0.1 (inside) or far from 0.2 everywhere
    old_v, ret = v.detach() + t([0.5, 0.1, -0.5, 0.0, 0.4, 0, -0.05], torch.float64), adv

    def val(x):
        return rlhf_kernels.ppo_value_loss(
            x, old_v, ret, mask, clip=0.2, agg="seq-mean-token-sum", backend="reference"
        )[0]

    assert torch.autograd.gradcheck(val, (v,))


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
def test_upstream_gradient_scales(backend):
    lp, old, adv, mask = ragged_batch()
    grads = []
    for scale in (1.0, 3.7):
        x = lp.clone().requires_grad_()
        loss, _ = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", backend=backend)
        (loss * scale).backward()
        grads.append(x.grad)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[1], 3.7 * grads[0], rtol=1e-6, atol=0)
    if backend in VALUE_BACKENDS + ["reference"]:
        x = lp.clone().requires_grad_()
        loss, _ = rlhf_kernels.ppo_value_loss(x, old, adv, mask, backend=backend)
        (loss * -2.5).backward()
        assert torch.allclose(x.grad, -2.5 * value(lp, old, adv, mask, backend)[1], rtol=1e-6)


@pytest.mark.parametrize("backend", [b for b in POLICY_BACKENDS if b in VALUE_BACKENDS])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(lp, old, adv, v, ret, mask):
        pl, ps = rlhf_kernels.ppo_policy_loss(
            lp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean", backend=backend
        )
        vl, vs = rlhf_kernels.ppo_value_loss(v, old, ret, mask, clip=0.2, backend=backend)
        return pl * 2 + 0.5 * vl, ps["policy/clipfrac"], vs["val/clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    lp, old, adv, mask = ragged_batch((5, 50))
    results = []
    for fn in (compiled, step):
        x, v = lp.clone().requires_grad_(), (old + adv).requires_grad_()
        out = fn(x, old, adv.sum(-1), v, adv, mask)
        out[0].backward()
        results.append([o.detach() for o in out] + [x.grad, v.grad])
    for a, b in zip(*results):
        assert torch.allclose(a, b)


def test_bad_inputs():
    x = torch.randn(2, 5, device=DEVICE)
    m = x > 0
    with pytest.raises(ValueError, match="valid modes are token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, agg="sum")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        rlhf_kernels.ppo_value_loss(x, x, x, m, agg="mean")
    with pytest.raises(ValueError, match="unknown agg"):
        rlhf_kernels.aggregate_loss(x, m, agg="token-sum")
    with pytest.raises(ValueError, match="old_logprobs shape"):
        rlhf_kernels.ppo_policy_loss(x, x[:, :4], x, m)
    with pytest.raises(ValueError, match="advantages shape"):
        rlhf_kernels.ppo_policy_loss(x, x, x[:1], m)
    with pytest.raises(ValueError, match="returns shape"):
        rlhf_kernels.ppo_value_loss(x, x, x.T, m)
    with pytest.raises(ValueError, match="mask shape"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m[:, :3])
    for dual in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match="dual_clip"):
            rlhf_kernels.ppo_policy_loss(x, x, x, m, dual_clip=dual)
    for low in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="clip_low"):
            rlhf_kernels.ppo_policy_loss(x, x, x, m, clip_low=low)
    with pytest.raises(ValueError, match="clip_high"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, clip_high=-0.2)
    with pytest.raises(ValueError, match="clip must be None or a finite number >= 0"):
        rlhf_kernels.ppo_value_loss(x, x, x, m, clip=-0.2)
    with pytest.raises(TypeError, match="logprobs must be a floating-point tensor"):
        rlhf_kernels.ppo_policy_loss(x.long(), x, x, m)
    with pytest.raises(TypeError, match="advantages must be a floating-point tensor"):
        rlhf_kernels.ppo_policy_loss(x, x, x.int(), m)
    with pytest.raises(TypeError, match="old_values must be a floating-point tensor"):
        rlhf_kernels.ppo_value_loss(x, x.long(), x, m)
    with pytest.raises(ValueError, match="scalar"):
        rlhf_kernels.ppo_policy_loss(x[0, 0], x[0, 0], x[0, 0], m[0, 0])
