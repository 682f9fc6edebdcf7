"""The variants of rlhf_kernels.ppo_policy_loss: loss_type cispo / sapo, ratio_level sequence (GSPO) /
sequence_token (GSPO-token), per-token importance weights, and the low / high clip fractions: hand-computed cases,
gradcheck of the fp64 reference, and every kernel backend against that reference."""

import math

import pytest
import torch
from conftest import DEVICE, assert_within_torch_error, op_backends

import rlhf_kernels
from rlhf_kernels import reference

BACKENDS = op_backends("ppo_policy_fwd") + ["reference"]
MODES = [(lt, rl) for lt in rlhf_kernels.LOSS_TYPES for rl in rlhf_kernels.RATIO_LEVELS]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def run(lp, old, adv, mask, backend, **kw):
    lp = lp.detach().clone().requires_grad_()
    loss, stats = rlhf_kernels.ppo_policy_loss(lp, old, adv, mask, backend=backend, **kw)
    loss.backward()
    return loss.detach(), lp.grad, stats


# ---------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_by_hand(backend):
    # token 1: r = 1.5 > 1 + 0.28, weight sg(1.28); A = 2, log pi = ln 1.5 = 0.405465:
    #   l = -1.28 * 2 * 0.405465 = -1.037990, dl/dlog pi = -2.56 (the clipped token keeps its gradient)
    # token 2: r = 0.5 < 1 - 0.2, weight 0.8; A = -1, log pi = ln 0.5 = -0.693147:
    #   l = -0.8 * -1 * -0.693147 = -0.554518, dl/dlog pi = 0.8
    # token-mean over 2 tokens: loss -0.796254, gradients halved
    lp = t([[math.log(1.5), math.log(0.5)]])
    old, adv = t([[0.0, 0.0]]), t([[2.0, -1.0]])
    loss, grad, stats = run(lp, old, adv, torch.ones_like(lp, dtype=torch.bool), backend, loss_type="cispo",
                            clip_low=0.2, clip_high=0.28)  # fmt: skip
    assert loss.item() == pytest.approx(-0.796254, abs=2e-6)
    torch.testing.assert_close(grad, t([[-1.28, 0.4]]), rtol=1e-6, atol=1e-7)
    assert stats["policy/clipfrac_high"].item() == 0.5 and stats["policy/clipfrac_low"].item() == 0.5
    assert stats["policy/clipfrac"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sapo_by_hand(backend):
    # r = 1 at both tokens (on-policy). A = 1, tau = tau_pos = 1: l = -sigmoid(0) * 4 / 1 * 1 = -2,
    #   dl/dlog pi = -4 A g (1 - g) r = -4 * 0.25 = -1 (PPO's -A r at r = 1)
    # A = -1, tau = tau_neg = 1.05: l = -0.5 * 4 / 1.05 * -1 = 1.904762, dl/dlog pi = +1
    # r = e^0.5 = 1.648721 at A = 2, tau = 1: g = sigmoid(0.648721) = 0.656722, l = -0.656722 * 4 * 2 = -5.253778,
    #   dl/dlog pi = -4 * 2 * 0.656722 * 0.343278 * 1.648721 = -2.973477; counts as clip-high (r > 1.2, A > 0)
    # seq-mean-token-sum over one sequence: loss = -2 + 1.904762 - 5.253778 = -5.349016
    lp = t([[-1.0, -2.0, -0.5]])
    old, adv = t([[-1.0, -2.0, -1.0]]), t([[1.0, -1.0, 2.0]])
    loss, grad, stats = run(lp, old, adv, torch.ones_like(lp, dtype=torch.bool), backend, loss_type="sapo",
                            agg="seq-mean-token-sum")  # fmt: skip
    assert loss.item() == pytest.approx(-5.349016, abs=4e-6)
    torch.testing.assert_close(grad, t([[-1.0, 1.0, -2.973477]]), rtol=2e-6, atol=1e-6)
    assert stats["policy/clipfrac_high"].item() == pytest.approx(1 / 3) and stats["policy/clipfrac_low"].item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_by_hand(backend, level):
    # sequence 1: log-ratios 0.1, 0.3 -> mean 0.2, s = e^0.2 = 1.221403 > 1.2, A = 1 > 0: clipped, l = -1.2 per
    #   token, no gradient, both tokens count as clip-high
    # sequence 2: log-ratios 0.05, -0.05 -> mean 0, s = 1, A = (1, 3): l = (-1, -3), unclipped
    # token-mean over 4 tokens: loss = (-1.2 - 1.2 - 1 - 3) / 4 = -1.6
    # gradient, w = 1/4: "sequence": each token of sequence 2 moves s by s / 2: (1/2) (1/4) (-1 - 3) = -0.5 each;
    #   "sequence_token": each token through its own log-prob: (1/4) (-1), (1/4) (-3)
    old = t([[-1.0, -1.0], [-2.0, -2.0]])
    lp = old + t([[0.1, 0.3], [0.05, -0.05]])
    adv = t([[1.0, 1.0], [1.0, 3.0]])
    loss, grad, stats = run(lp, old, adv, torch.ones_like(lp, dtype=torch.bool), backend, ratio_level=level)
    assert loss.item() == pytest.approx(-1.6, abs=2e-6)
    want = [[0.0, 0.0], [-0.5, -0.5]] if level == "sequence" else [[0.0, 0.0], [-0.25, -0.75]]
    torch.testing.assert_close(grad, t(want), rtol=2e-6, atol=1e-6)
    assert stats["policy/clipfrac_high"].item() == 0.5 and stats["policy/clipfrac_low"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_mask_and_padding(backend):
    # the sequence mean is over the masked tokens only (a masked-out token with log-ratio 7 and NaN padding are
    # never read): mean of 0.2 and 0.4 = 0.3, s = e^0.3 = 1.349859, unclipped under clip_high 0.5; A = -1:
    # l = s per token; token-mean over 2 tokens: loss = s; gradient per token = (1/2) (1/2) (s + s) = s / 2
    old = t([[0.0, 0.0, 0.0, float("nan")]])
    lp = t([[0.2, 7.0, 0.4, float("nan")]])
    mask = t([[True, False, True, False]], torch.bool)
    loss, grad, _ = run(lp, old, t([-1.0]), mask, backend, ratio_level="sequence", clip_high=0.5)
    s = math.exp(0.3)
    assert loss.item() == pytest.approx(s, rel=2e-6)
    torch.testing.assert_close(grad, t([[s / 2, 0.0, s / 2, 0.0]]), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_weights_by_hand(backend):
    # r = 1 everywhere, A = (1, 2, 3), is_weights (0.5, 0, 2): per-token loss -A r c = (-0.5, 0, -6); token-mean
    # over the 3 masked tokens (the mask's denominator): loss = -6.5 / 3; gradient -A c / 3 = (-1/6, 0, -2)
    lp = t([[-1.0, -1.0, -1.0]])
    c = t([[0.5, 0.0, 2.0]])
    loss, grad, stats = run(lp, lp, t([[1.0, 2.0, 3.0]]), torch.ones_like(lp, dtype=torch.bool), backend,
                            is_weights=c)  # fmt: skip
    assert loss.item() == pytest.approx(-6.5 / 3, rel=1e-6)
    torch.testing.assert_close(grad, t([[-1 / 6, 0.0, -2.0]]), rtol=1e-6, atol=1e-7)
    assert stats["policy/is_weight_mean"].item() == pytest.approx(2.5 / 3)
    assert stats["policy/is_weight_zero_frac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_fractions_split(backend):
    # ratios 0.5 (A < 0: clip-low), 0.5 (A > 0: not clipped), 2 (A > 0: clip-high), 2 (A < 0: not clipped), 1
    lp = torch.log(t([[0.5, 0.5, 2.0, 2.0, 1.0]]))
    _, _, stats = run(lp, torch.zeros_like(lp), t([[-1.0, 1.0, 1.0, -1.0, 1.0]]), torch.ones_like(lp).bool(), backend)
    assert stats["policy/clipfrac_low"].item() == pytest.approx(0.2)
    assert stats["policy/clipfrac_high"].item() == pytest.approx(0.2)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------------------
# The fp64 reference: gradcheck; the kernel backends against it
# ---------------------------------------------------------------------------------------------------------


def _gradcheck_inputs():
    g = torch.Generator().manual_seed(3)
    # log-ratios at least 0.05 from the clip kinks ln 0.8 = -0.223 and ln 1.2 = 0.182 (token and sequence means)
    d = torch.tensor([[-0.5, -0.4, -0.6, 0.5], [0.4, 0.3, 0.5, 0.45], [-0.05, 0.05, 0.0, 0.02]], dtype=torch.float64)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    c = 0.5 + torch.rand(3, 4, generator=g, dtype=torch.float64)
    return old + d, old, adv, mask, c


def _reference(lp, old, adv, mask, c, loss_type, level, agg="seq-mean-token-mean"):
    return reference.ppo_policy_loss(lp, old, adv, mask, 0.2, 0.2, None, agg, None, loss_type, level, 1.0, 1.05, c)


@pytest.mark.parametrize("loss_type", ["clip", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_reference_gradcheck(loss_type, level):
    """The modes whose gradient is that of their value (no stop-gradient inside): gradcheck in fp64."""
    lp, old, adv, mask, c = _gradcheck_inputs()
    assert torch.autograd.gradcheck(
        lambda x: _reference(x, old, adv, mask, c, loss_type, level)[0], (lp.requires_grad_(),)
    )


def test_reference_stop_gradient_modes():
    """CISPO and GSPO-token stop the gradient inside the loss, so their gradient is not the derivative of the
    value: check it against the formulas (token-mean weights w = 1 / masked tokens)."""
    lp, old, adv, mask, c = _gradcheck_inputs()
    w = mask / mask.sum()
    r = (lp - old).exp()
    x = lp.clone().requires_grad_()
    _reference(x, old, adv, mask, c, "cispo", "token", "token-mean")[0].backward()
    torch.testing.assert_close(x.grad, -w * c * r.clamp(0.8, 1.2) * adv)  # -sg(clip(r)) A, times c and w
    seq_mean = ((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    s = seq_mean.exp().expand_as(lp)
    unclipped = ~(((adv > 0) & (s > 1.2)) | ((adv < 0) & (s < 0.8)))
    x = lp.clone().requires_grad_()
    _reference(x, old, adv, mask, c, "clip", "sequence_token", "token-mean")[0].backward()
    torch.testing.assert_close(x.grad, torch.where(unclipped, -w * c * adv * s, 0.0))  # -A s per unclipped token
    assert not unclipped[mask].all() and unclipped[mask].any()


SHAPES = {  # name: (shape, per-sequence advantages, agg)
    "B,T>1024": ((3, 1100), False, "token-mean"),
    "GRPO (B,)": ((6, 300), True, "seq-mean-token-mean"),
    "3-D": ((2, 3, 50), False, "seq-mean-token-sum-norm"),
}


def _inputs(shape, per_seq, dtype, level, seed=0):
    """Random inputs; for the sequence levels, sequences whose mean log-ratio is 0, +4 k or -4 k (in turn) for the
    clip range (k, 1.2 k) of :func:`_clips`, with per-token noise whose mean is well inside it."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(shape, generator=g) * 0.5 - 2.0
    if level == "token":
        old = lp + torch.randn(shape, generator=g) * 0.2
    else:
        k = _clips(level, dtype)[0]
        rows = math.prod(shape[:-1])
        shift = torch.tensor([0.0, 4 * k, -4 * k]).repeat(rows)[:rows].view(*shape[:-1], 1)
        old = lp - shift + torch.randn(shape, generator=g) * k / 2
    adv = torch.randn(shape[:-1] if per_seq else shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.2
    mask.view(-1, shape[-1])[0, : shape[-1] // 3] = False
    c = 0.5 + torch.rand(shape, generator=g)
    c.view(-1)[::7] = 0.0
    return tuple(x.to(dtype).to(DEVICE) for x in (lp, old, adv)) + (mask.to(DEVICE), c.to(DEVICE))


def _clips(level, dtype):
    """(clip_low, clip_high): PPO's range per token; a small one (as GSPO's) for sequence means, wide enough in
    bf16 for the rounding of the log-probs."""
    if level == "token":
        return 0.2, 0.28
    k = 1e-3 if dtype == torch.float32 else 2e-2
    return k, 1.2 * k


@pytest.mark.parametrize("backend", op_backends("ppo_policy_fwd"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type,level", MODES)
@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_reference(backend, dtype, loss_type, level, case):
    shape, per_seq, agg = SHAPES[case]
    lp, old, adv, mask, c = _inputs(shape, per_seq, dtype, level)
    clips = _clips(level, dtype)
    kw = dict(clip_low=clips[0], clip_high=clips[1], loss_type=loss_type, ratio_level=level, agg=agg,
              sapo_tau_pos=1.0, sapo_tau_neg=1.05)  # fmt: skip
    ours = run(lp, old, adv, mask, backend, is_weights=c, **kw)
    adv_t = adv.unsqueeze(-1).expand(shape) if per_seq else adv
    args = (mask, clips[0], clips[1], None, agg, None, loss_type, level, 1.0, 1.05)
    plain_lp = lp.detach().clone().requires_grad_()  # the same formulas in fp32 on the input dtype: the yardstick
    plain, _ = reference.ppo_policy_loss(plain_lp, old.float(), adv_t.float(), *args, c)
    plain.backward()
    ref_lp = lp.double().requires_grad_()
    ref, ref_stats = reference.ppo_policy_loss(ref_lp, old.double(), adv_t.double(), *args, c.double())
    ref.backward()
    assert ours[1].dtype == dtype and ours[0].dtype == torch.float32
    assert_within_torch_error(ours[0], plain.detach(), ref, 1e-6, f"{backend} {loss_type} {level} loss")
    scale = ref_lp.grad.abs().max().item()
    assert_within_torch_error(ours[1], plain_lp.grad, ref_lp.grad, 1e-6 * scale, f"{backend} grad")
    for k, v in ref_stats.items():  # counts over the same rounded inputs: equal up to fp32 vs fp64 rounding
        assert ours[2][k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    clipped = ours[2]["policy/clipfrac"].item()
    assert 0.02 < clipped < 0.98, f"the inputs exercise both sides of the clip ({clipped})"


@pytest.mark.parametrize("backend", op_backends("ppo_policy_fwd"))
def test_sequence_level_is_per_sequence(backend):
    """A sequence's loss and gradients do not depend on the other sequences of the batch (bitwise)."""
    lp, old, adv, mask, _ = _inputs((5, 400), True, torch.float32, "sequence", seed=1)
    kw = dict(ratio_level="sequence", clip_low=1e-3, clip_high=1.2e-3, agg="seq-mean-token-sum", normalizer=1.0)
    whole = run(lp, old, adv, mask, backend, **kw)
    for i in range(5):
        alone = run(lp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], backend, **kw)
        assert torch.equal(alone[1][0], whole[1][i])


def test_bad_variant_arguments():
    x = torch.zeros(2, 3, device=DEVICE)
    m = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, loss_type="ppo")
    with pytest.raises(ValueError, match="unknown ratio_level 'seq'"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, ratio_level="seq")
    with pytest.raises(ValueError, match="dual_clip applies to loss_type='clip' only"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, loss_type="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="sapo_tau_neg must be a finite number > 0"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, loss_type="sapo", sapo_tau_neg=0.0)
    with pytest.raises(ValueError, match="is_weights shape"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, is_weights=x[:, :2])
    with pytest.raises(ValueError, match="is_weights must be finite and >= 0"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, is_weights=x - 1)
    with pytest.raises(TypeError, match="is_weights must be a floating-point tensor"):
        rlhf_kernels.ppo_policy_loss(x, x, x, m, is_weights=m)
