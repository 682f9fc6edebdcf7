"""rlhf_kernels.kto_loss: a hand-computed point (values, gradients, weights), the reference point z (clamped at 0,
detached, given or from mismatched pairs), a plain implementation, gradcheck, the normalizer, the statistics and
the argument checks."""

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def flags(x):
    return torch.tensor(x, dtype=torch.bool, device=DEVICE)


# pi = (-10, -14), ref = (-11, -13): r = (1, -1); example 0 desirable, example 1 undesirable; beta = 0.5.
# Mismatched pairs: policy (-12, -9), ref (-12.5, -9.5): z = max(0, mean(0.5, 0.5)) = 0.5.
# desirable: 1 - sigmoid(0.5 (1 - 0.5)) = 1 - sigmoid(0.25) = 0.4378235
# undesirable: 1 - sigmoid(0.5 (0.5 + 1)) = 1 - sigmoid(0.75) = 0.3208213; mean 0.3793224
# d/dpi_0 = -beta sigmoid'(0.25) / 2 = -0.5 * 0.5621765 * 0.4378235 / 2 = -0.0615335
# d/dpi_1 = +beta sigmoid'(0.75) / 2 = 0.5 * 0.6791787 * 0.3208213 / 2 = 0.0544737
def test_hand_computed_point():
    pi = t([-10.0, -14.0]).requires_grad_()
    kl_pi = t([-12.0, -9.0]).requires_grad_()
    loss, stats = rlhf_kernels.kto_loss(
        pi, t([-11.0, -13.0]), flags([True, False]), policy_kl_logps=kl_pi, ref_kl_logps=t([-12.5, -9.5]), beta=0.5
    )
    assert loss.item() == pytest.approx(0.3793223999694045, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(pi.grad, t([-0.06153352068439959, 0.05447374844045351]), atol=1e-12, rtol=0)
    assert kl_pi.grad is None or kl_pi.grad.abs().sum() == 0  # z is detached
    assert stats["kl"].item() == pytest.approx(0.5)
    assert stats["rewards/chosen"].item() == pytest.approx(0.5) and stats["rewards/rejected"].item() == pytest.approx(
        -0.5
    )
    assert stats["logps/chosen"].item() == -10.0 and stats["logps/rejected"].item() == -14.0
    assert int(stats["num_desirable"]) == 1 and int(stats["num_undesirable"]) == 1


def test_weights_scale_each_side():
    # desirable_weight = 2: (2 * 0.4378235 + 0.3208213) / 2 = 0.5982341; d/dpi_0 doubles to -0.1230670
    pi = t([-10.0, -14.0]).requires_grad_()
    loss, _ = rlhf_kernels.kto_loss(pi, t([-11.0, -13.0]), flags([True, False]), kl=0.5, beta=0.5, desirable_weight=2.0)
    assert loss.item() == pytest.approx(0.5982341495265054, abs=1e-12)
    loss.backward()
    assert pi.grad[0].item() == pytest.approx(-0.12306704136879917, abs=1e-12)


def test_reference_point_is_clamped_at_zero_and_defaults_to_zero():
    pi, ref, d = t([-10.0, -14.0]), t([-11.0, -13.0]), flags([True, False])
    negative, stats = rlhf_kernels.kto_loss(pi, ref, d, policy_kl_logps=t([-3.0]), ref_kl_logps=t([-1.0]))
    none, _ = rlhf_kernels.kto_loss(pi, ref, d)
    zero, _ = rlhf_kernels.kto_loss(pi, ref, d, kl=-5.0)
    assert stats["kl"].item() == 0.0
    assert negative.item() == none.item() == zero.item()
    shifted, _ = rlhf_kernels.kto_loss(pi, ref, d, kl=2.0)
    assert shifted.item() != none.item()


def plain_kto(pi, ref, desirable, z, beta, wd, wu):
    r = pi - ref
    out = []
    for i in range(len(r)):
        if desirable[i]:
            out.append(wd * (1 - 1 / (1 + torch.exp(-beta * (r[i] - z)))))
        else:
            out.append(wu * (1 - 1 / (1 + torch.exp(-beta * (z - r[i])))))
    return torch.stack(out).mean()


@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 1.0), (2.0, 1.0, 0.7)])
def test_matches_a_plain_implementation(beta, wd, wu):
    g = torch.Generator().manual_seed(3)
    pi = (torch.randn(12, generator=g, dtype=torch.float64) * 3 - 20).to(DEVICE)
    ref = pi.detach() + torch.randn(12, generator=g, dtype=torch.float64).to(DEVICE)
    desirable = (torch.rand(12, generator=g) < 0.5).to(DEVICE)
    kl_pi = (torch.randn(12, generator=g, dtype=torch.float64) - 20).to(DEVICE)
    kl_ref = kl_pi - 0.3 + torch.randn(12, generator=g, dtype=torch.float64).to(DEVICE) * 0.1
    x = pi.clone().requires_grad_()
    loss, _ = rlhf_kernels.kto_loss(
        x, ref, desirable, policy_kl_logps=kl_pi, ref_kl_logps=kl_ref, beta=beta, desirable_weight=wd,
        undesirable_weight=wu,
    )  # fmt: skip
    y = pi.clone().requires_grad_()
    expected = plain_kto(y, ref, desirable, max((kl_pi - kl_ref).mean().item(), 0.0), beta, wd, wu)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-12)


def test_gradcheck_and_fp32():
    g = torch.Generator().manual_seed(0)
    pi = torch.randn(6, generator=g, dtype=torch.float64).to(DEVICE)
    ref = torch.randn(6, generator=g, dtype=torch.float64).to(DEVICE)
    d = flags([True, False, True, True, False, False])
    torch.autograd.gradcheck(lambda p: rlhf_kernels.kto_loss(p, ref, d, kl=0.2, beta=0.7)[0], (pi.requires_grad_(),))
    loss32, _ = rlhf_kernels.kto_loss(pi.float(), ref.float(), d, kl=0.2)
    assert loss32.dtype == torch.float32


def test_normalizer_splits_a_step():
    g = torch.Generator().manual_seed(1)
    pi, ref = torch.randn(2, 10, generator=g, dtype=torch.float64).to(DEVICE)
    d = (torch.rand(10, generator=g) < 0.5).to(DEVICE)
    full, _ = rlhf_kernels.kto_loss(pi, ref, d, kl=0.1)
    parts = [rlhf_kernels.kto_loss(pi[s], ref[s], d[s], kl=0.1, normalizer=10)[0] for s in (slice(0, 4), slice(4, 10))]
    torch.testing.assert_close(sum(parts), full, atol=1e-12, rtol=0)


def test_one_sided_batches_report_zero_for_the_missing_side():
    _, stats = rlhf_kernels.kto_loss(t([-1.0, -2.0]), t([-1.5, -2.5]), flags([True, True]))
    assert stats["rewards/rejected"].item() == 0.0 and int(stats["num_undesirable"]) == 0
    assert stats["rewards/chosen"].item() == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"beta": 0.0}, ValueError, "beta must be"),
        ({"desirable_weight": -1.0}, ValueError, "desirable_weight must be"),
        ({"desirable": [1, 0]}, TypeError, "desirable must be a bool tensor"),
        ({"desirable": [True]}, ValueError, "desirable shape"),
        ({"ref_logps": [1.0]}, ValueError, r"must be \(B,\) of one shape"),
        ({"kl": 0.1, "policy_kl_logps": [1.0], "ref_kl_logps": [1.0]}, ValueError, "either kl or"),
        ({"policy_kl_logps": [1.0]}, ValueError, "go together"),
        ({"kl": float("nan")}, ValueError, "kl must be a finite"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"policy_logps": [-1.0, -2.0], "ref_logps": [-1.5, -2.5], "desirable": [True, False]}
    args.update(kwargs)
    d = args.pop("desirable")
    d = flags(d) if isinstance(d[0], bool) else torch.tensor(d, device=DEVICE)
    tensors = {k: t(v) for k, v in args.items() if isinstance(v, list)}
    others = {k: v for k, v in args.items() if not isinstance(v, list)}
    pi, ref = tensors.pop("policy_logps"), tensors.pop("ref_logps")
    with pytest.raises(error, match=match):
        rlhf_kernels.kto_loss(pi, ref, d, **tensors, **others)
