"""rlhf_kernels.fused_linear_logprobs against the unfused path and the fp64 reference."""

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, assert_within_torch_error

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops._linear import default_chunk_size

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}


def _run(fn, leaves, w_lp, w_ent):
    for t in leaves:
        t.grad = None
    lp, ent = fn(*leaves)
    ((lp.float() * w_lp).sum() + (ent.float() * w_ent).sum()).backward()
    return [lp.detach(), ent.detach()] + [t.grad.detach().clone() for t in leaves]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_matches_unfused_and_reference(backend, dtype, with_bias, chunk_size):
    B, T, H, V = 2, 9, 32, 503
    hidden = (torch.randn(B, T, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    bias = torch.randn(V, device=DEVICE).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[1, -3:] = -100
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    w_lp, w_ent = torch.randn(B, T, device=DEVICE), torch.randn(B, T, device=DEVICE)

    def fused(h, w, b=None):
        return rlhf_kernels.fused_linear_logprobs(
            h, w, labels, bias=b, temperature=0.9, return_entropy=True, chunk_size=chunk_size, backend=backend
        )

    def unfused(h, w, b=None):  # plain PyTorch in the input dtype
        logits = torch.nn.functional.linear(h, w, b) / 0.9
        logp = torch.log_softmax(logits, -1)
        ignored = labels == -100
        lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(ignored, 0)
        return lp, (-(logp.exp() * logp).sum(-1)).masked_fill(ignored, 0)

    ours = _run(fused, leaves, w_lp, w_ent)
    plain = _run(unfused, leaves, w_lp, w_ent)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = _run(
        lambda h, w, b=None: reference.fused_linear_logprobs(h, w, labels, b, temperature=0.9), leaves64, w_lp, w_ent
    )
    names = ["logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, o, p, r in zip(names, ours, plain, ref):
        assert_within_torch_error(o, p, r, ATOL[dtype], f"{backend} {dtype} {name}")
    for g, t in zip(ours[2:], leaves):
        assert g.dtype == t.dtype


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_frozen_weight_and_logprobs_only(backend):
    hidden = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(70, 16, device=DEVICE)
    labels = torch.randint(0, 70, (4,), device=DEVICE)
    lp = rlhf_kernels.fused_linear_logprobs(hidden, weight, labels, backend=backend)
    lp.sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    ref = reference.fused_linear_logprobs(h64, weight.double(), labels)[0]
    ref.sum().backward()
    assert torch.allclose(lp.double(), ref, atol=1e-5)
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-5)
    assert weight.grad is None


def test_default_chunk_size():
    assert default_chunk_size(8192, 131072, 4096) == 1024  # N*H/V = 256, raised to MIN_CHUNK_ROWS
    assert default_chunk_size(16384, 32000, 4096) == 4096  # 2097 -> next power of two
    assert default_chunk_size(10, 50000, 64) == 10  # never more than N
    assert default_chunk_size(1000, 1000000, 8) == 1000  # at least 1024 rows per GEMM, at most N
    assert default_chunk_size(5000, 1000000, 8) == 1024
    assert default_chunk_size(5000, 1000000, 8, "cpu") == 128  # a CPU GEMM is compute-bound from ~40 rows
    assert default_chunk_size(16384, 32000, 4096, "cpu") == 4096  # the N x H target when it is larger


def test_bad_inputs():
    h = torch.randn(3, 8, device=DEVICE)
    w = torch.randn(20, 8, device=DEVICE)
    y = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rlhf_kernels.fused_linear_logprobs(h, torch.randn(20, 7, device=DEVICE), y)
    with pytest.raises(TypeError, match="share one dtype"):
        rlhf_kernels.fused_linear_logprobs(h, w.bfloat16(), y)
    with pytest.raises(ValueError, match="bias"):
        rlhf_kernels.fused_linear_logprobs(h, w, y, bias=torch.zeros(19, device=DEVICE))
    with pytest.raises(ValueError, match="labels must lie"):
        rlhf_kernels.fused_linear_logprobs(h, w, torch.tensor([0, 20, 1], device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size"):
        rlhf_kernels.fused_linear_logprobs(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        rlhf_kernels.fused_linear_logprobs(h, w, y, temperature=0)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rlhf_kernels.fused_linear_logprobs(h.long(), w, y)
