"""The dtype rule of the fused-linear ops (rlhf_kernels.ops._linear.linear_operands) under autocast.

Under autocast every fused-linear head computes with hidden, weight and bias cast to the autocast dtype (as
nn.Linear would), and its backward recomputes exactly the forward's logits: the results and gradients must be
bitwise those of the same op called without autocast on explicitly cast operands, whether the backward runs
inside or outside the autocast context. The CPU has no bf16 GEMM with an fp32 output, so the gradient GEMM upcasts
there and would accept operands of two dtypes; the tests marked "cuda path" replace that GEMM by one that enforces
the CUDA kernel's contract (one bf16/fp16 dtype for both operands) and run the CUDA branch on the CPU.
"""

import pytest
import torch
from conftest import DEVICE, op_backends

import rlhf_kernels
from rlhf_kernels.ops import _linear

B, T, H, V = 3, 5, 16, 37
BACKENDS = ["reference"] + op_backends("logprobs_fwd")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _inputs(hidden_dtype=torch.float32):
    hidden = torch.randn(B, T, H, device=DEVICE).to(hidden_dtype) / 2
    weight = torch.randn(V, H, device=DEVICE) / 2  # fp32 parameters, as a model keeps them under autocast
    bias = torch.randn(V, device=DEVICE) / 4
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[0, :2] = -100
    return hidden, weight, bias, labels


def _heads(backend):
    """name -> f(hidden, weight, bias, labels) -> a scalar to differentiate, one per fused-linear op."""
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[0, :2] = False
    old = torch.full((B, T), -3.5, device=DEVICE)
    adv = torch.linspace(-1, 1, B * T, device=DEVICE).view(B, T)
    g = torch.linspace(0.5, 1.5, B * T, device=DEVICE).view(B, T)  # a non-uniform upstream gradient
    ref_h = torch.randn(B, T, H, device=DEVICE) / 2
    ref_w = torch.randn(V, H, device=DEVICE) / 2

    def logprobs(h, w, b, y):
        lp, ent = rlhf_kernels.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
        return (lp * g).sum() + ent.sum()

    def kl(h, w, b, y):  # the reference model in the policy's dtype (autocast casts it along with the policy)
        rh, rw = ref_h.to(h.dtype), ref_w.to(h.dtype)
        return (rlhf_kernels.fused_linear_kl(h, w, rh, rw, bias=b, mask=mask, backend=backend) * g).sum()

    def ppo(h, w, b, y):
        loss, _ = rlhf_kernels.fused_linear_ppo_loss(
            h, w, y, old, adv, mask, bias=b, entropy_coef=0.01, backend=backend
        )
        return loss

    def dpo(h, w, b, y):
        ref_c, ref_r = torch.tensor([-20.0], device=DEVICE), torch.tensor([-21.0], device=DEVICE)
        loss, _ = rlhf_kernels.fused_linear_dpo_loss(h[:2], w, y[:2], ref_c, ref_r, bias=b, backend=backend)
        return loss

    return {"logprobs": logprobs, "kl": kl, "ppo": ppo, "dpo": dpo}


def _run(f, leaves, labels, *, autocast: bool, backward_inside: bool = True):
    """f's value and the gradients of ``leaves``, under bf16 autocast or not."""
    ctx = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        out = f(*leaves, labels)
        if backward_inside:
            out.backward()
    if not backward_inside:
        out.backward()
    return [out.detach()] + [x.grad for x in leaves]


def _explicit_bf16(f, hidden, weight, bias, labels):
    """The same op without autocast on operands cast to bf16 by hand; gradients taken at the fp32 leaves."""
    leaves = _leaves(hidden, weight, bias)
    out = f(*(x.to(torch.bfloat16) for x in leaves), labels)
    out.backward()
    return [out.detach()] + [x.grad for x in leaves]


def _assert_bitwise(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype, f"{what}: output {i} dtype {a.dtype} != {b.dtype}"
        assert torch.equal(a, b), f"{what}: output {i} differs by {(a.double() - b.double()).abs().max().item()}"


@pytest.fixture
def cuda_gemm_path(monkeypatch):
    """Run the CUDA branch of the weight-gradient GEMM on the CPU, with the CUDA kernel's operand contract."""
    calls = []

    def fp32_out_addmm(acc, a, b):
        # torch.addmm(..., out_dtype=torch.float32) on CUDA: bf16/fp16 operands of one dtype, an fp32 output
        assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16), (a.dtype, b.dtype)
        assert acc.dtype == torch.float32
        calls.append(a.dtype)
        acc.addmm_(a.float(), b.float())

    monkeypatch.setattr(_linear, "fp32_out_gemm_available", lambda device: True)
    monkeypatch.setattr(_linear, "_fp32_out_addmm", fp32_out_addmm)
    return calls


# The reference backend differentiates with autograd, whose backward ops follow the autocast state the backward
# runs under (PyTorch advises running backward outside autocast); the kernel backends recompute under their own rule.
CASES = [(b, inside) for b in BACKENDS for inside in (True, False) if not (b == "reference" and inside)]


@pytest.mark.parametrize("backend,backward_inside", CASES, ids=[f"{b}-bwd-{'in' if i else 'out'}" for b, i in CASES])
@pytest.mark.parametrize("head", ["logprobs", "kl", "ppo", "dpo"])
def test_autocast_equals_explicit_cast(backend, head, backward_inside):
    """fp32 hidden, weight and bias under bf16 autocast: bitwise the op on bf16 casts; fp32 gradients."""
    hidden, weight, bias, labels = _inputs()
    f = _heads(backend)[head]
    leaves = _leaves(hidden, weight, bias)
    got = _run(f, leaves, labels, autocast=True, backward_inside=backward_inside)
    want = _explicit_bf16(f, hidden, weight, bias, labels)
    assert all(g.dtype == torch.float32 for g in got[1:])  # gradients in the parameters' dtype
    _assert_bitwise(got, want, f"{head} on {backend}")


@pytest.mark.parametrize("head", ["logprobs", "kl", "ppo", "dpo"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32-hidden", "bf16-hidden"])
def test_autocast_on_cuda_gemm_path(cuda_gemm_path, head, hidden_dtype):
    """The CUDA branch (bf16 GEMM with an fp32 output, one operand dtype) under autocast, with fp32 weights and
    fp32 or bf16 hidden states (bf16 x fp32 operands): no mixed-dtype GEMM is reached, and the results equal the
    explicit bf16 computation bitwise."""
    backend = op_backends("logprobs_fwd")[0] if op_backends("logprobs_fwd") else "reference"
    hidden, weight, bias, labels = _inputs(hidden_dtype)
    f = _heads(backend)[head]
    got = _run(f, _leaves(hidden, weight, bias), labels, autocast=True, backward_inside=False)
    n_autocast = len(cuda_gemm_path)
    want = _explicit_bf16(f, hidden, weight, bias, labels)
    assert n_autocast > 0 and cuda_gemm_path == [torch.bfloat16] * len(cuda_gemm_path)  # the branch ran
    _assert_bitwise(got, want, f"{head} on the CUDA GEMM path")


def test_mixed_dtypes_without_autocast_are_rejected():
    hidden, weight, bias, labels = _inputs(torch.bfloat16)
    with pytest.raises(TypeError, match="must share one dtype outside autocast"):
        rlhf_kernels.fused_linear_logprobs(hidden, weight, labels, bias=bias)


def test_mixed_operands_never_reach_the_gemm():
    """The gradient GEMM names the broken invariant instead of failing inside the CUDA kernel."""
    acc = torch.zeros(3, 4)
    with pytest.raises(TypeError, match="two dtypes"):
        _linear._addmm_fp32(acc, torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(2, 4))
