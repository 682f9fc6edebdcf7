"""rlhf_kernels.fused_linear_dpo_loss against dpo_loss applied to fused_linear_logprobs sequence sums (or means),
on every backend, and against the fp64 reference composition."""

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, assert_within_torch_error

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops._linear import default_chunk_size
from rlhf_kernels.ops._sequence_loss import unit_chunks

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
B, T, H, V = 3, 11, 16, 307  # 3 pairs; V not a power of two


def make_batch(dtype, with_bias=True):
    """hidden (2B, T, H): chosen sequences 0..B-1, rejected B..2B-1. Prompts of different lengths are masked with
    ignore_index (-100), and two sequences have right padding."""
    hidden = (torch.randn(2 * B, T, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    bias = torch.randn(V, device=DEVICE).to(dtype).requires_grad_() if with_bias else None
    labels = torch.randint(0, V, (2 * B, T), device=DEVICE)
    for s, prompt in enumerate([0, 2, 5, 3, 9, 1]):
        labels[s, :prompt] = -100
    labels[1, -2:] = -100
    labels[3, -4:] = -100
    ref_c, ref_r = torch.randn(2, B, device=DEVICE) * 2 - 25
    return hidden, weight, bias, labels, ref_c, ref_r


def run(fn, leaves):
    for x in leaves:
        x.grad = None
    loss, stats = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [x.grad.detach().clone() for x in leaves], stats


def plain_seq_logps(h, w, b, labels, average):
    """Sequence sums (or means) of the label log-probs, plain PyTorch in the inputs' dtype."""
    logp = torch.log_softmax(torch.nn.functional.linear(h, w, b), -1)
    keep = labels != -100
    lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep
    total = lp.sum(-1)
    return total / keep.sum(-1) if average else total


LOSSES = {  # name: dpo options, average_log_prob argument, whether the default averages
    "sigmoid": ({"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.1}, None, False),
    "ipo": ({"loss_type": "ipo", "beta": 0.5}, None, True),
    "simpo": ({"loss_type": "simpo", "beta": 2.0, "gamma": 0.5}, None, True),
    "hinge avg": ({"loss_type": "hinge", "beta": 0.1}, True, True),
    "apo_zero": ({"loss_type": "apo_zero", "beta": 0.1}, None, False),
    "ipo sum": ({"loss_type": "ipo", "beta": 0.01}, False, False),
}

# chunk_size counts response tokens of whole pairs. Pairs hold 11 + 4 = 15, 7 + 2 = 9 and 6 + 10 = 16 response
# tokens: a budget of 1 makes every pair its own chunk, 25 gives chunks {0, 1} and {2}, the default one chunk.
# Every loss in fp32 at the default chunk; each chunking in fp32 and bf16 with a summed and an averaged loss.
CASES = [(None, k, torch.float32) for k in LOSSES] + [
    (c, k, dt) for c in (1, 25, None) for k in ("sigmoid", "ipo") for dt in (torch.float32, torch.bfloat16)
    if (c, dt) != (None, torch.float32)
]  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("chunk_size,loss,dtype", CASES, ids=[f"{c}-{k}-{str(d)[6:]}" for c, k, d in CASES])
def test_matches_composition_and_reference(backend, dtype, chunk_size, loss):
    opts, avg_arg, average = LOSSES[loss]
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(dtype)
    refs = (None, None) if opts["loss_type"] == "simpo" else (ref_c, ref_r)
    leaves = [hidden, weight, bias]

    def fused(h, w, b):
        return rlhf_kernels.fused_linear_dpo_loss(
            h, w, labels, *refs, bias=b, average_log_prob=avg_arg, chunk_size=chunk_size, backend=backend, **opts
        )

    def composed(h, w, b):  # the public ops: token log-probs, their sums (means), then dpo_loss
        lp = rlhf_kernels.fused_linear_logprobs(h, w, labels, bias=b, chunk_size=chunk_size, backend=backend)
        seq = lp.sum(-1) / ((labels != -100).sum(-1) if average else 1)
        return rlhf_kernels.dpo_loss(seq[:B], seq[B:], *refs, **opts)

    def plain(h, w, b):
        seq = plain_seq_logps(h, w, b, labels, average)
        return rlhf_kernels.dpo_loss(seq[:B], seq[B:], *refs, **opts)

    def ref64(h, w, b):
        lp = reference.fused_linear_logprobs(h, w, labels, b)[0]
        seq = lp.sum(-1) / ((labels != -100).sum(-1) if average else 1)
        return rlhf_kernels.dpo_loss(seq[:B], seq[B:], *[None if r is None else r.double() for r in refs], **opts)

    ours, ours_stats = run(fused, leaves)
    comp, comp_stats = run(composed, leaves)
    base, base_stats = run(plain, leaves)
    ref, ref_stats = run(ref64, [x.detach().double().requires_grad_() for x in leaves])
    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    assert ours[0].dtype == torch.float32
    for name, o, c, p, r in zip(names, ours, comp, base, ref):
        assert o.dtype == c.dtype
        assert torch.allclose(o.float(), c.float(), rtol=1e-4, atol=ATOL[dtype]), f"{name} vs composition"
        assert_within_torch_error(o, p, r, ATOL[dtype], f"{backend} {dtype} {name}")
    assert (ours[1][labels == -100] == 0).all()  # prompt and padding positions get no gradient
    assert ours[1].abs().sum() > 0
    assert set(ours_stats) == set(ref_stats)
    for k in ref_stats:
        assert torch.allclose(ours_stats[k], comp_stats[k], rtol=1e-4, atol=1e-4), k
        assert_within_torch_error(ours_stats[k], base_stats[k], ref_stats[k], 1e-4, f"{backend} {dtype} {k}")


def test_pair_chunking():
    """The chunkings the comment above CASES claims (a chunk never splits a pair)."""
    labels = make_batch(torch.float32)[3]
    counts = (labels != -100).sum(-1).tolist()
    assert counts == [11, 7, 6, 4, 2, 10]

    def pair_ranges(budget):
        chunks = unit_chunks((labels != -100).reshape(-1), B, 2, T, budget)
        for chunk in chunks:  # each chunk's rows: its pairs' chosen tokens, then their rejected tokens
            p0, p1, lengths = chunk.info
            assert lengths.tolist() == counts[p0:p1] + counts[B + p0 : B + p1]
            assert chunk.rows.numel() == sum(lengths.tolist())
        return [chunk.info[:2] for chunk in chunks]

    assert pair_ranges(1) == [(0, 1), (1, 2), (2, 3)]
    assert pair_ranges(25) == [(0, 2), (2, 3)]
    assert pair_ranges(default_chunk_size(2 * B * T, V, H)) == [(0, 3)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_average_default_follows_loss_type(backend):
    """ipo / simpo average by default; passing average_log_prob explicitly overrides it either way."""
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    with torch.no_grad():
        kw = dict(bias=bias, backend=backend, chunk_size=4)
        ipo = [
            rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="ipo", **kw, **a)[0]
            for a in ({}, {"average_log_prob": True}, {"average_log_prob": False})
        ]
        sig = [
            rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, **kw, **a)[0]
            for a in ({}, {"average_log_prob": False}, {"average_log_prob": True})
        ]
    assert ipo[0] == ipo[1] and ipo[0] != ipo[2]
    assert sig[0] == sig[1] and sig[0] != sig[2]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_upstream_gradient_and_frozen_weight(backend):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    weight.requires_grad_(False)
    grads = []
    for scale in (1.0, 2.5):
        hidden.grad = bias.grad = None
        loss, _ = rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, backend=backend)
        (loss * scale).backward()
        grads.append((hidden.grad.clone(), bias.grad.clone()))
    assert weight.grad is None
    for g1, g2 in zip(*grads):
        assert torch.allclose(g2, 2.5 * g1, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_inputs(backend):
    hidden, weight, bias, labels, ref_c, ref_r = make_batch(torch.float32)
    kw = dict(bias=bias, backend=backend)
    empty = labels.clone()
    empty[4] = -100  # rejected response of pair 1: prompt only
    with pytest.raises(ValueError, match=r"no response token .* Sequence 4 \(1 such"):
        rlhf_kernels.fused_linear_dpo_loss(hidden, weight, empty, ref_c, ref_r, **kw)
    with pytest.raises(ValueError, match=r"\(2B, T, H\)"):
        rlhf_kernels.fused_linear_dpo_loss(hidden[:5], weight, labels[:5], ref_c, ref_r, **kw)
    with pytest.raises(ValueError, match=r"\(2B, T, H\)"):
        rlhf_kernels.fused_linear_dpo_loss(hidden[0], weight, labels[0], ref_c, ref_r, **kw)
    with pytest.raises(ValueError, match="ref_chosen_logps is required"):
        rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, **kw)
    with pytest.raises(ValueError, match="ref_rejected_logps shape"):
        rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r[:2], **kw)
    with pytest.raises(ValueError, match="valid loss types"):
        rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="kto", **kw)
    with pytest.raises(TypeError, match="unexpected keyword"):
        rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, temperature=0.7, **kw)
    with pytest.raises(ValueError, match="labels must lie"):
        bad = labels.clone()
        bad[2, -1] = V
        rlhf_kernels.fused_linear_dpo_loss(hidden, weight, bad, ref_c, ref_r, **kw)
