"""rlhf_kernels.fused_linear_kto_loss against kto_loss applied to fused_linear_logprobs sequence sums, a plain
PyTorch version and the fp64 reference composition, on every backend (values, stats, gradients), with z from
mismatched hidden states, given, or 0; chunkings; and the argument checks."""

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, assert_within_torch_error

import rlhf_kernels
from rlhf_kernels import reference

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
B, M, T, H, V = 5, 3, 9, 16, 307  # V not a power of two
DESIRABLE = [True, False, True, True, False]


def make_batch(dtype):
    hidden = (torch.randn(B, T, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    bias = torch.randn(V, device=DEVICE).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    for s, prompt in enumerate([0, 2, 5, 3, 7]):
        labels[s, :prompt] = -100
    labels[1, -2:] = -100
    kl_hidden = (torch.randn(M, T, H, device=DEVICE) / 2).to(dtype)
    kl_labels = torch.randint(0, V, (M, T), device=DEVICE)
    kl_labels[:, :3] = -100
    ref = torch.randn(B, device=DEVICE) - 45
    ref_kl = torch.randn(M, device=DEVICE) * 0.5 - 45  # below the policy's (~ -37 for 6 tokens): z > 0
    return hidden, weight, bias, labels, ref, kl_hidden, kl_labels, ref_kl


def plain_seq(h, w, b, labels):
    logp = torch.log_softmax(torch.nn.functional.linear(h, w, b), -1)
    keep = labels != -100
    return (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep).sum(-1)


def run(fn, leaves):
    for x in leaves:
        x.grad = None
    loss, stats = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [x.grad.detach().clone() for x in leaves], stats


F32, BF16 = torch.float32, torch.bfloat16
CASES = [("mismatched", None, F32), ("given", None, F32), ("none", None, F32), ("mismatched", 1, F32),
         ("mismatched", 12, BF16), ("mismatched", None, BF16)]  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("z_from,chunk_size,dtype", CASES, ids=[f"{z}-{c}-{str(d)[6:]}" for z, c, d in CASES])
def test_matches_composition_and_reference(backend, z_from, chunk_size, dtype):
    hidden, weight, bias, labels, ref, kl_hidden, kl_labels, ref_kl = make_batch(dtype)
    desirable = torch.tensor(DESIRABLE, device=DEVICE)
    opts = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.9)

    def z_args(seq_of_kl):  # how the unfused versions get z: from their own mismatched log-probs
        if z_from == "mismatched":
            return dict(policy_kl_logps=seq_of_kl, ref_kl_logps=ref_kl.to(seq_of_kl.dtype))
        return dict(kl=0.4) if z_from == "given" else {}

    def fused(h, w, b):
        extra = {}
        if z_from == "mismatched":
            extra = dict(kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_logps=ref_kl)
        elif z_from == "given":
            extra = dict(kl=0.4)
        return rlhf_kernels.fused_linear_kto_loss(
            h, w, labels, ref, desirable, bias=b, chunk_size=chunk_size, backend=backend, **extra, **opts
        )

    def composed(h, w, b):
        seq = rlhf_kernels.fused_linear_logprobs(h, w, labels, bias=b, chunk_size=chunk_size, backend=backend).sum(-1)
        with torch.no_grad():
            kl_seq = rlhf_kernels.fused_linear_logprobs(kl_hidden, w, kl_labels, bias=b, backend=backend).sum(-1)
        return rlhf_kernels.kto_loss(seq, ref, desirable, **z_args(kl_seq), **opts)

    def plain(h, w, b):
        with torch.no_grad():
            kl_seq = plain_seq(kl_hidden, w, b, kl_labels)
        return rlhf_kernels.kto_loss(plain_seq(h, w, b, labels), ref, desirable, **z_args(kl_seq), **opts)

    def ref64(h, w, b):
        seq = reference.fused_linear_logprobs(h, w, labels, b)[0].sum(-1)
        with torch.no_grad():
            kl_seq = reference.fused_linear_logprobs(kl_hidden.double(), w, kl_labels, b)[0].sum(-1)
        return rlhf_kernels.kto_loss(seq, ref.double(), desirable, **z_args(kl_seq), **opts)

    leaves = [hidden, weight, bias]
    ours, ours_stats = run(fused, leaves)
    comp, comp_stats = run(composed, leaves)
    base, _ = run(plain, leaves)
    ref_out, ref_stats = run(ref64, [x.detach().double().requires_grad_() for x in leaves])
    assert ours[0].dtype == torch.float32
    for name, o, c, p, r in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], ours, comp, base, ref_out):
        assert o.dtype == c.dtype
        assert torch.allclose(o.float(), c.float(), rtol=1e-4, atol=ATOL[dtype]), f"{name} vs composition"
        assert_within_torch_error(o, p, r, ATOL[dtype], f"{backend} {dtype} {name}")
    assert (ours[1][labels == -100] == 0).all() and ours[1].abs().sum() > 0
    assert set(ours_stats) == set(ref_stats)
    for k in ref_stats:
        assert torch.allclose(ours_stats[k].double(), comp_stats[k].double(), rtol=1e-4, atol=1e-4), k
    if z_from == "mismatched":
        assert ours_stats["kl"].item() > 0  # the case exercises a positive reference point
        # exact z of the fused op: the reference's z within fp32 error
        assert ours_stats["kl"].item() == pytest.approx(
            ref_stats["kl"].item(), abs=1e-3 if dtype == torch.bfloat16 else 1e-4
        )


def test_normalizer_and_no_grad():
    hidden, weight, bias, labels, ref, *_ = make_batch(torch.float32)
    desirable = torch.tensor(DESIRABLE, device=DEVICE)
    full, _ = rlhf_kernels.fused_linear_kto_loss(hidden, weight, labels, ref, desirable, bias=bias, kl=0.2)
    parts = [
        rlhf_kernels.fused_linear_kto_loss(
            hidden[s], weight, labels[s], ref[s], desirable[s], bias=bias, kl=0.2, normalizer=B
        )[0]
        for s in (slice(0, 2), slice(2, B))
    ]
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        quiet, _ = rlhf_kernels.fused_linear_kto_loss(hidden, weight, labels, ref, desirable, bias=bias, kl=0.2)
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, full.detach(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(ref=torch.zeros(B + 1)), ValueError, r"ref_logps must be a \(B,\) float tensor"),
        (dict(kl_hidden=torch.zeros(M, T, H)), ValueError, "go together"),
        (dict(ref_kl_logps=torch.zeros(M)), ValueError, "needs kl_hidden and kl_labels"),
        (dict(empty=True), ValueError, "has no response token"),
        (dict(desirable=torch.ones(B)), TypeError, "desirable must be a bool tensor"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    hidden, weight, bias, labels, ref, *_ = make_batch(torch.float32)
    desirable = change.pop("desirable", torch.tensor(DESIRABLE, device=DEVICE))
    ref = change.pop("ref", ref)
    if change.pop("empty", False):
        labels[2] = -100
    with pytest.raises(error, match=match):
        rlhf_kernels.fused_linear_kto_loss(hidden, weight, labels, ref, desirable, **change)
