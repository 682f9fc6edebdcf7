"""rlhf_kernels.dpo_loss: every loss type at a hand-computed point, against plainly written formulas (values and
autograd gradients in fp64), gradcheck, the batch statistics and the argument checks."""

import math

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels
from rlhf_kernels import reference

LOSS_TYPES = rlhf_kernels.DPO_LOSS_TYPES


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def logsig(x):
    return -torch.log1p(torch.exp(-x))  # log sigmoid(x), fine for the moderate x used here


def plain_dpo(pc, pr, rc, rr, beta, loss_type, eps=0.0, gamma=0.0):
    """Per-pair losses, one formula per loss type as in the papers (rc = rr = 0 for no reference)."""
    chosen, rejected = pc - rc, pr - rr
    x = beta * (chosen - rejected)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(x) - eps * logsig(-x)
    if loss_type == "robust":
        return ((1 - eps) * -logsig(x) - eps * -logsig(-x)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - x, min=0)
    if loss_type == "ipo":
        return (chosen - rejected - 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    if loss_type == "simpo":
        return -(1 - eps) * logsig(beta * (pc - pr) - gamma) - eps * logsig(-(beta * (pc - pr) - gamma))
    raise AssertionError(loss_type)


# pi_c = -10, pi_r = -14, ref_c = -11, ref_r = -13: chosen log-ratio 1, rejected -1, h = 2.
# (loss_type, options, loss, dloss/dpi_c) with B = 1. dloss/dpi_r = -dloss/dpi_c: every type depends on
# pi_c - pi_r only, except apo_zero, where it holds because sigmoid' is even and the log-ratios are +1 and -1.
HAND_CASES = {
    # beta h = 1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617; d/dpi_c = -beta sigmoid(-1) = -0.5 * 0.2689414
    "sigmoid": ("sigmoid", {}, 0.31326168751822286, -0.13447071068499755),
    # eps = 0.1: 0.9 * 0.3132617 + 0.1 * -log sigmoid(-1) (= 1.3132617) = 0.2819355 + 0.1313262 = 0.4132617;
    # d/dpi_c = beta (-0.9 sigmoid(-1) + 0.1 sigmoid(1)) = 0.5 (-0.2420473 + 0.0731059) = -0.0844707
    "sigmoid eps": ("sigmoid", {"label_smoothing": 0.1}, 0.4132616875182229, -0.08447071068499756),
    # robust eps = 0.1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1506094 / 0.8 = 0.1882617;
    # d/dpi_c = beta (-0.9 sigmoid(-1) - 0.1 sigmoid(1)) / 0.8 = 0.5 * -0.3151532 / 0.8 = -0.1969707
    "robust eps": ("robust", {"label_smoothing": 0.1}, 0.1882616875182229, -0.19697071068499752),
    # beta = 0.25: relu(1 - 0.25 * 2) = 0.5; d/dpi_c = -beta = -0.25
    "hinge": ("hinge", {"beta": 0.25}, 0.5, -0.25),
    # beta = 0.5: beta h = 1, relu(0) = 0 at the hinge, gradient 0
    "hinge at margin": ("hinge", {}, 0.0, 0.0),
    # (h - 1 / (2 beta))^2 = (2 - 1)^2 = 1; d/dpi_c = 2 (h - 1) = 2
    "ipo": ("ipo", {}, 1.0, 2.0),
    # 1 - sigmoid(0.5 * 1) + sigmoid(0.5 * -1) = 1 - 0.6224593 + 0.3775407 = 0.7550813;
    # d/dpi_c = -beta sigmoid(0.5) sigmoid(-0.5) = -0.5 * 0.6224593 * 0.3775407 = -0.1175019
    "apo_zero": ("apo_zero", {}, 0.7550813375962908, -0.11750185610079725),
    # no reference: x = beta (pi_c - pi_r) - gamma = 0.5 * 4 - 0.5 = 1.5; -log sigmoid(1.5) = 0.2014133;
    # d/dpi_c = -beta sigmoid(-1.5) = -0.5 * 0.1824255 = -0.0912128
    "simpo": ("simpo", {"gamma": 0.5}, 0.2014132779827524, -0.09121276190317817),
    # eps = 0.2: 0.8 * 0.2014133 + 0.2 * -log sigmoid(-1.5) (= 1.7014133) = 0.5014133;
    # d/dpi_c = beta (-0.8 sigmoid(-1.5) + 0.2 sigmoid(1.5)) = 0.5 (-0.1459404 + 0.1635149) = 0.0087872
    "simpo eps": ("simpo", {"gamma": 0.5, "label_smoothing": 0.2}, 0.5014132779827525, 0.008787238096821831),
    # reference_free: h = pi_c - pi_r = 4, beta h = 2: -log sigmoid(2) = 0.1269280; d/dpi_c = -0.5 sigmoid(-2)
    "reference_free": ("sigmoid", {"reference_free": True}, 0.1269280110429725, -0.05960146101105877),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(HAND_CASES))
def test_hand_computed(case, dtype):
    loss_type, kw, expect, grad_c = HAND_CASES[case]
    kw = {"beta": 0.5, **kw}
    pc, pr = t([-10.0], dtype).requires_grad_(), t([-14.0], dtype).requires_grad_()
    no_ref = loss_type == "simpo" or kw.get("reference_free")
    rc, rr = (None, None) if no_ref else (t([-11.0], dtype), t([-13.0], dtype))
    loss, _ = rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, **kw)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert loss.item() == pytest.approx(expect, rel=tol, abs=tol)
    assert pc.grad.item() == pytest.approx(grad_c, rel=tol, abs=tol)
    assert pr.grad.item() == pytest.approx(-grad_c, rel=tol, abs=tol)


def test_robust_is_unbiased():
    # If the preference label is flipped with probability eps, the expected robust loss equals the clean DPO
    # loss: (1 - eps) L(h) + eps L(-h) = -log sigmoid(beta h) (https://arxiv.org/abs/2403.00409, eq. 9).
    pc, pr, rc, rr = torch.randn(4, 64, dtype=torch.float64, device=DEVICE) * 3
    for eps in (0.0, 0.1, 0.3, 0.45):
        kw = dict(beta=0.3, loss_type="robust", label_smoothing=eps)
        direct = rlhf_kernels.dpo_loss(pc, pr, rc, rr, **kw)[0]
        flipped = rlhf_kernels.dpo_loss(pr, pc, rr, rc, **kw)[0]
        clean = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.3)[0]
        assert ((1 - eps) * direct + eps * flipped).item() == pytest.approx(clean.item(), rel=1e-12)
        if eps > 0:  # whereas conservative DPO (sigmoid with smoothing) is not unbiased
            s = dict(beta=0.3, label_smoothing=eps)
            mix = (1 - eps) * rlhf_kernels.dpo_loss(pc, pr, rc, rr, **s)[0] + eps * rlhf_kernels.dpo_loss(
                pr, pc, rr, rc, **s
            )[0]
            assert abs(mix.item() - clean.item()) > 1e-3


OPTION_CASES = [(lt, {}) for lt in LOSS_TYPES] + [
    ("sigmoid", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.2}),
    ("simpo", {"gamma": 1.2, "label_smoothing": 0.1}),
    ("sigmoid", {"reference_free": True}),
    ("ipo", {"reference_free": True}),
]


@pytest.mark.parametrize("loss_type,kw", OPTION_CASES, ids=[f"{lt}-{sorted(kw)}" for lt, kw in OPTION_CASES])
def test_matches_plain_formula(loss_type, kw):
    B, beta = 16, 0.3
    pc, pr = ((torch.randn(B, dtype=torch.float64, device=DEVICE) * 4 - 20).requires_grad_() for _ in range(2))
    rc, rr = torch.randn(2, B, dtype=torch.float64, device=DEVICE) * 4 - 20
    loss, _ = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, **kw)
    grads = torch.autograd.grad(loss, (pc, pr))
    zero = torch.zeros_like(rc)
    no_ref = loss_type == "simpo" or kw.get("reference_free")
    args = (zero, zero) if no_ref else (rc, rr)
    plain = plain_dpo(pc, pr, *args, beta, loss_type, kw.get("label_smoothing", 0.0), kw.get("gamma", 0.0)).mean()
    plain_grads = torch.autograd.grad(plain, (pc, pr))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-12)
    for g, p in zip(grads, plain_grads):
        assert torch.allclose(g, p, rtol=1e-10, atol=1e-14)
    ref = reference.dpo_loss(pc, pr, rc, rr, beta, loss_type, kw.get("label_smoothing", 0.0), kw.get("gamma", 0.0),
                             bool(kw.get("reference_free")))  # fmt: skip
    assert ref.mean().item() == pytest.approx(plain.item(), rel=1e-12)
    # only ipo, hinge (beta h up to ~10 here) and apo_zero are flat or unbounded somewhere; all get non-zero grads
    assert all(g.abs().sum() > 0 for g in grads)

    def f(a, b):
        return rlhf_kernels.dpo_loss(a, b, rc, rr, beta=beta, loss_type=loss_type, **kw)[0]

    if loss_type != "hinge":  # hinge has kinks wherever beta h = 1; the rest are smooth
        assert torch.autograd.gradcheck(f, (pc, pr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_extreme_margins(dtype):
    # |beta h| = 500: -log sigmoid(-500) = 500 exactly (no overflow to inf), -log sigmoid(500) = 0
    pc = t([0.0, -1000.0], dtype).requires_grad_()
    pr = t([-1000.0, 0.0], dtype).requires_grad_()
    zero = t([0.0, 0.0], dtype)
    loss, _ = rlhf_kernels.dpo_loss(pc, pr, zero, zero, beta=0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and pc.grad.dtype == dtype
    assert loss.item() == pytest.approx(250.0)  # (0 + 500) / 2
    # d/dpi_c = -beta sigmoid(-beta h) / B: 0 for the first pair, -0.5 / 2 for the second
    assert pc.grad.float().tolist() == pytest.approx([0.0, -0.25])
    assert pr.grad.float().tolist() == pytest.approx([0.0, 0.25])


def test_stats():
    # beta = 0.5; pairs (pi_c, pi_r, ref_c, ref_r):
    #   (-10, -14, -11, -13): rewards chosen 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5: correct
    #   (-20, -12, -18, -13): chosen 0.5 * -2 = -1, rejected 0.5 * 1 = 0.5: wrong
    #   (-5, -6, -5, -6): both 0: a tie counts as wrong (chosen > rejected is false)
    # means: chosen (0.5 - 1 + 0) / 3 = -1/6, rejected (-0.5 + 0.5 + 0) / 3 = 0, margins -1/6, accuracies 1/3,
    # logps/chosen (-10 - 20 - 5) / 3 = -35/3, logps/rejected (-14 - 12 - 6) / 3 = -32/3
    pc, pr = t([-10.0, -20.0, -5.0], torch.float32).requires_grad_(), t([-14.0, -12.0, -6.0], torch.float32)
    rc, rr = t([-11.0, -18.0, -5.0], torch.float32), t([-13.0, -13.0, -6.0], torch.float32)
    for loss_type in ("sigmoid", "ipo", "apo_zero"):
        _, stats = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type)
        expect = {
            "rewards/chosen": -1 / 6,
            "rewards/rejected": 0.0,
            "rewards/margins": -1 / 6,
            "rewards/accuracies": 1 / 3,
            "logps/chosen": -35 / 3,
            "logps/rejected": -32 / 3,
        }
        assert set(stats) == set(expect)
        for k, v in expect.items():
            assert not stats[k].requires_grad
            assert stats[k].item() == pytest.approx(v, abs=1e-6), k
    # without a reference the rewards are beta * pi: chosen 0.5 * -35/3, rejected 0.5 * -32/3; pairs 1 and 3 are
    # correct (-10 > -14, -5 > -6), pair 2 not (-20 < -12): accuracies 2/3
    _, stats = rlhf_kernels.dpo_loss(pc, pr, beta=0.5, loss_type="simpo")
    assert stats["rewards/chosen"].item() == pytest.approx(-35 / 6)
    assert stats["rewards/rejected"].item() == pytest.approx(-32 / 6)
    assert stats["rewards/margins"].item() == pytest.approx(-0.5)
    assert stats["rewards/accuracies"].item() == pytest.approx(2 / 3)


def test_reference_gets_no_gradient():
    pc, pr, rc, rr = (torch.randn(5, device=DEVICE).requires_grad_() for _ in range(4))
    rlhf_kernels.dpo_loss(pc, pr, rc, rr)[0].backward()
    assert pc.grad is not None and rc.grad is None and rr.grad is None
    assert math.isfinite(pr.grad.sum().item())


def test_bad_inputs():
    x = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="valid loss types are sigmoid, robust, hinge, ipo, apo_zero, simpo"):
        rlhf_kernels.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        rlhf_kernels.dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        rlhf_kernels.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\) for the robust loss"):
        rlhf_kernels.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        rlhf_kernels.dpo_loss(x, x, x, x, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="gamma .* simpo loss only"):
        rlhf_kernels.dpo_loss(x, x, x, x, loss_type="sigmoid", gamma=0.5)
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        rlhf_kernels.dpo_loss(x, x)
    with pytest.raises(ValueError, match="ref_rejected_logps is required"):
        rlhf_kernels.dpo_loss(x, x, x, None, loss_type="ipo")
    with pytest.raises(ValueError, match="must be \\(B,\\) of one shape"):
        rlhf_kernels.dpo_loss(x, x[:3], x, x)
    with pytest.raises(ValueError, match="must be \\(B,\\) of one shape"):
        rlhf_kernels.dpo_loss(x[None], x[None], x, x)
    with pytest.raises(ValueError, match="ref_rejected_logps shape"):
        rlhf_kernels.dpo_loss(x, x, x, x[:2])
    with pytest.raises(ValueError, match="beta"):
        rlhf_kernels.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(TypeError, match="floating-point"):
        rlhf_kernels.dpo_loss(x.long(), x, x, x)
