"""rlhf_kernels.fused_linear_kl against the unfused path (kl_from_logits on full logits) and the fp64 reference."""

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, assert_within_torch_error

import rlhf_kernels
from rlhf_kernels import reference

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}


def _run(fn, leaves, weight):
    for t in leaves:
        t.grad = None
    kl = fn(*leaves)
    (kl.float() * weight).sum().backward()
    return [kl.detach()] + [t.grad.detach().clone() for t in leaves]


def _models(dtype, ref_dtype, H, H_ref, V, with_bias, lead=(2, 9)):
    hidden = (torch.randn(*lead, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    bias = torch.randn(V, device=DEVICE).to(dtype).requires_grad_() if with_bias else None
    ref_hidden = (torch.randn(*lead, H_ref, device=DEVICE) / 2).to(ref_dtype)
    ref_weight = (torch.randn(V, H_ref, device=DEVICE) / 2).to(ref_dtype)
    ref_bias = torch.randn(V, device=DEVICE).to(ref_dtype) if with_bias else None
    return hidden, weight, bias, ref_hidden, ref_weight, ref_bias


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_matches_unfused_and_reference(backend, dtype, with_bias, chunk_size, direction):
    V = 503
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = _models(dtype, torch.float32, 32, 24, V, with_bias)
    mask = torch.rand(2, 9, device=DEVICE) > 0.25
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    w_kl = torch.randn(2, 9, device=DEVICE)
    kw = dict(temperature=0.9, mask=mask, direction=direction)

    def fused(h, w, b=None):
        return rlhf_kernels.fused_linear_kl(
            h, w, ref_hidden, ref_weight, bias=b, ref_bias=ref_bias, chunk_size=chunk_size, backend=backend, **kw
        )

    def unfused(h, w, b=None):  # our own kernel on full logits
        ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias)
        return rlhf_kernels.kl_from_logits(torch.nn.functional.linear(h, w, b), ref_logits, backend=backend, **kw)

    def plain(h, w, b=None):  # plain PyTorch in the input dtypes
        logp = torch.log_softmax(torch.nn.functional.linear(h, w, b) / 0.9, -1)
        logq = torch.log_softmax(torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias) / 0.9, -1)
        if direction == "forward":
            logp, logq = logq, logp
        return (logp.exp() * (logp - logq)).sum(-1) * mask

    ours = _run(fused, leaves, w_kl)
    base = _run(plain, leaves, w_kl)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref64 = [t if t is None else t.double() for t in (ref_hidden, ref_weight, ref_bias)]
    ref = _run(
        lambda h, w, b=None: reference.fused_linear_kl(h, w, ref64[0], ref64[1], b, ref64[2], **kw), leaves64, w_kl
    )
    names = ["kl", "grad_hidden", "grad_weight", "grad_bias"]
    for name, o, p, r in zip(names, ours, base, ref):
        assert_within_torch_error(o, p, r, ATOL[dtype], f"{backend} {dtype} {name}")
    for g, t in zip(ours[1:], leaves):
        assert g.dtype == t.dtype
    assert (ours[0][~mask] == 0).all() and (ours[1][~mask] == 0).all()
    if backend == "reference":  # (it computes the logits from upcast inputs, so bf16 differs by design)
        return
    unf = _run(unfused, leaves, w_kl)  # the same kernel on full logits: equal up to the GEMMs' rounding
    for o, u in zip(ours, unf):
        assert torch.allclose(o.float(), u.float(), rtol=1e-4, atol=ATOL[dtype])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_reference_model_is_frozen(backend):
    hidden, weight, _, ref_hidden, ref_weight, _ = _models(torch.float32, torch.float32, 16, 16, 70, False, (4,))
    ref_hidden.requires_grad_()
    ref_weight.requires_grad_()
    weight.requires_grad_(False)
    kl = rlhf_kernels.fused_linear_kl(hidden, weight, ref_hidden, ref_weight, backend=backend)
    kl.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    assert ref_hidden.grad is None and ref_weight.grad is None
    h64 = hidden.detach().double().requires_grad_()
    ref = reference.fused_linear_kl(h64, weight.double(), ref_hidden.double(), ref_weight.double())
    ref.sum().backward()
    assert torch.allclose(kl.double(), ref, atol=1e-5)
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_same_model_gives_zero(backend):
    hidden, weight, bias, *_ = _models(torch.float32, torch.float32, 16, 16, 333, True, (3, 5))
    kl = rlhf_kernels.fused_linear_kl(
        hidden, weight, hidden.detach(), weight.detach(), bias=bias, ref_bias=bias.detach(), backend=backend
    )
    assert torch.equal(kl, torch.zeros(3, 5, device=DEVICE))


def test_bad_inputs():
    h, w = torch.randn(3, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    with pytest.raises(ValueError, match="same vocabulary size"):
        rlhf_kernels.fused_linear_kl(h, w, h, torch.randn(21, 8, device=DEVICE))
    with pytest.raises(ValueError, match="same leading shape"):
        rlhf_kernels.fused_linear_kl(h, w, torch.randn(4, 8, device=DEVICE), w)
    with pytest.raises(ValueError, match="ref_weight"):
        rlhf_kernels.fused_linear_kl(h, w, h, torch.randn(20, 7, device=DEVICE))
    with pytest.raises(TypeError, match="share one dtype"):
        rlhf_kernels.fused_linear_kl(h, w, h, w.bfloat16())
    with pytest.raises(TypeError, match="ref_hidden must be float32, bfloat16 or float16"):
        rlhf_kernels.fused_linear_kl(h, w, h.long(), w)
    with pytest.raises(ValueError, match="temperature"):
        rlhf_kernels.fused_linear_kl(h, w, h, w, temperature=-1.0)
    with pytest.raises(ValueError, match="unknown KL direction"):
        rlhf_kernels.fused_linear_kl(h, w, h, w, direction="sideways")
    with pytest.raises(ValueError, match="chunk_size"):
        rlhf_kernels.fused_linear_kl(h, w, h, w, chunk_size=0)
    with pytest.raises(ValueError, match="ref_bias"):
        rlhf_kernels.fused_linear_kl(h, w, h, w, ref_bias=torch.zeros(19, device=DEVICE))
