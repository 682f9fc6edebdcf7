"""rlhf_kernels.fused_linear_ppo_loss against the fp64 reference composition and against the public unfused
composition fused_linear_logprobs -> ppo_policy_loss + kl_penalty + aggregate_loss, on every backend."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_within_torch_error, op_backends

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops.kl_penalty import kl_penalty_from_delta

FUSED_BACKENDS = op_backends("ppo_policy_fwd")
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
B, T, H, V = 4, 13, 16, 211
STATS = ("policy/clipfrac", "policy/clipfrac_low", "policy/clipfrac_high", "policy/approxkl", "policy/clipfrac_lower",
         "policy/entropy", "policy/kl")  # fmt: skip


def make_batch(dtype, per_seq_adv=False, garbage=True):
    """Rows of different lengths (left padding, holes) and a fully masked row 2. Unmasked positions hold garbage
    labels (ignore_index, out of range, negative) and NaN old / ref log-probs, which must not matter."""
    hidden = (torch.randn(B, T, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).to(dtype).requires_grad_()
    bias = (torch.randn(V, device=DEVICE) / 2).to(dtype).requires_grad_()
    mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    mask[0, 3:] = True
    mask[1, :5] = True
    mask[3] = torch.rand(T, device=DEVICE) > 0.4
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    with torch.no_grad():  # old / ref near the current log-probs: ratios on both sides of the clip range
        lp = reference.fused_linear_logprobs(hidden, weight, labels, bias)[0]
    old = lp + torch.randn(B, T, device=DEVICE) * 0.3
    ref = lp + torch.randn(B, T, device=DEVICE) * 0.5
    adv = torch.randn(B, device=DEVICE) if per_seq_adv else torch.randn(B, T, device=DEVICE)
    if garbage:
        pad = ~mask
        labels = labels.masked_fill(pad, -100)
        labels[0, 0], labels[2, 1], labels[2, 2] = V + 5, -7, V
        old, ref = old.masked_fill(pad, float("nan")), ref.masked_fill(pad, float("inf"))
        if not per_seq_adv:
            adv = adv.masked_fill(pad, float("nan"))
    return hidden, weight, bias, labels, old, adv, mask, ref


def run(fn, leaves, scale=1.0):
    for x in leaves:
        x.grad = None
    loss, stats = fn(*leaves)
    (loss * scale).backward()
    return [loss.detach()] + [x.grad.detach().clone() for x in leaves], {k: v.detach() for k, v in stats.items()}


def composition(h, w, b, labels, old, adv, mask, ref, o, backend):
    """The public unfused ops: fused_linear_logprobs -> ppo_policy_loss, kl_penalty, aggregate_loss."""
    y = torch.where(mask, labels, -100)
    lp, ent = rlhf_kernels.fused_linear_logprobs(
        h, w, y, bias=b, temperature=o["temperature"], return_entropy=True, backend=backend
    )
    clip = {k: o[k] for k in ("clip_low", "clip_high", "dual_clip", "agg")}
    loss, stats = rlhf_kernels.ppo_policy_loss(lp, old, adv, mask, backend=backend, **clip)
    loss = loss - o["entropy_coef"] * rlhf_kernels.aggregate_loss(ent, mask, o["agg"])
    stats["policy/entropy"] = ent[mask].mean() if mask.any() else ent.new_zeros(())
    if ref is not None:
        kl = rlhf_kernels.kl_penalty(lp, torch.where(mask, ref, 0.0), o["kl_estimator"])
        loss = loss + o["kl_coef"] * rlhf_kernels.aggregate_loss(kl, mask, o["agg"])
        stats["policy/kl"] = kl[mask].mean() if mask.any() else kl.new_zeros(())
    return loss, stats


def plain_torch(h, w, b, labels, old, adv, mask, ref, o):
    """The same loss written out with PyTorch ops on the inputs' dtype (the baseline of the 2x rule)."""
    logp = torch.log_softmax(F.linear(h, w, b) / o["temperature"], -1)
    lp = logp.gather(-1, torch.where(mask, labels, 0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - o["clip_low"], 1 + o["clip_high"]))
    if o["dual_clip"] is not None:
        per = torch.where(adv < 0, torch.minimum(per, -adv * o["dual_clip"]), per)
    agg = o["agg"]
    loss = reference.aggregate_loss(per, mask, agg) - o["entropy_coef"] * reference.aggregate_loss(ent, mask, agg)
    if ref is not None:
        kl = kl_penalty_from_delta(lp - ref, o["kl_estimator"])
        loss = loss + o["kl_coef"] * reference.aggregate_loss(kl, mask, agg)
    return loss, {}


BASE = dict(
    kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0, temperature=1.0, clip_low=0.2, clip_high=0.2, dual_clip=None
)
CASES = {  # name: (options, per-sequence advantages, chunk_size)
    "token-mean k3 entropy T=0.8": (dict(agg="token-mean", kl_coef=0.1, entropy_coef=0.01, temperature=0.8), 0, None),
    "seq-sum k1": (dict(agg="seq-mean-token-sum", kl_coef=0.05, kl_estimator="k1"), 0, 1),
    "seq-mean abs dual": (dict(agg="seq-mean-token-mean", kl_coef=0.2, kl_estimator="abs", dual_clip=3.0), 0, 5),
    "sum-norm k2 GRPO T=1.3": (
        dict(agg="seq-mean-token-sum-norm", kl_coef=0.1, kl_estimator="k2", entropy_coef=0.05, temperature=1.3),
        1,
        5,
    ),
    "GRPO dual asym no-ref": (dict(agg="token-mean", entropy_coef=-0.02, dual_clip=2.0, clip_high=0.28), 1, None),
}
DTYPED = [(c, torch.float32) for c in CASES] + [(c, torch.bfloat16) for c in list(CASES)[:3]]


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
@pytest.mark.parametrize("case,dtype", DTYPED, ids=[f"{c}-{str(d)[6:]}" for c, d in DTYPED])
def test_matches_composition_and_reference(backend, case, dtype):
    opts, per_seq, chunk = CASES[case]
    o = {**BASE, **opts}
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(dtype, per_seq)
    ref_arg = ref if o["kl_coef"] != 0 else None
    data = (labels, old, adv, mask, ref_arg)
    leaves = [hidden, weight, bias]

    def fused(h, w, b):
        return rlhf_kernels.fused_linear_ppo_loss(
            h, w, labels, old, adv, mask, bias=b, ref_logprobs=ref_arg, chunk_size=chunk, backend=backend, **o
        )

    ours, ours_stats = run(fused, leaves)
    comp, comp_stats = run(lambda h, w, b: composition(h, w, b, *data, o, backend), leaves)
    clean = [torch.where(mask, x, 0.0) for x in (old, ref)] + [adv if per_seq else torch.where(mask, adv, 0.0)]
    adv_t = clean[2].unsqueeze(-1).expand(B, T) if per_seq else clean[2]
    ref_t = clean[1] if ref_arg is not None else None
    base, _ = run(lambda h, w, b: plain_torch(h, w, b, labels, clean[0], adv_t, mask, ref_t, o), leaves)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    args64 = [labels, clean[0].double(), adv_t.double(), mask, None if ref_t is None else ref_t.double()]
    ref_out, ref_stats = run(
        lambda h, w, b: reference.fused_linear_ppo_loss(h, w, *args64[:4], b, args64[4], **o), leaves64
    )
    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    assert ours[0].dtype == torch.float32
    for name, x, c, p, r in zip(names, ours, comp, base, ref_out):
        assert x.dtype == c.dtype and torch.isfinite(x).all(), name
        assert torch.allclose(x.float(), c.float(), rtol=1e-4, atol=ATOL[dtype]), f"{name} vs composition"
        assert_within_torch_error(x, p, r, ATOL[dtype], f"{backend} {case} {dtype} {name}")
    assert (ours[1][~mask] == 0).all() and (ours[1][mask].abs().sum(-1) > 0).all()
    expect_keys = {k for k in STATS if k != "policy/kl" or ref_arg is not None}
    assert set(ours_stats) - {"policy/max_abs_log_ratio"} == expect_keys
    for k in expect_keys:
        assert torch.allclose(ours_stats[k], comp_stats[k].float(), rtol=1e-4, atol=ATOL[dtype]), k
        if dtype == torch.float32:
            assert ours_stats[k].item() == pytest.approx(ref_stats[k].item(), rel=1e-4, abs=1e-5), k
    with torch.no_grad():  # max |lp - old| over the masked tokens, from the same backend's log-probs
        lp = rlhf_kernels.fused_linear_logprobs(
            hidden, weight, torch.where(mask, labels, -100), bias=bias, temperature=o["temperature"], backend=backend
        )
        lp64 = reference.fused_linear_logprobs(
            *leaves64[:2], torch.where(mask, labels, 0), leaves64[2], o["temperature"]
        )
    max_dev = ours_stats["policy/max_abs_log_ratio"].item()
    assert max_dev == pytest.approx((lp - clean[0])[mask].abs().max().item(), rel=1e-4, abs=ATOL[dtype])
    if dtype == torch.float32:  # and from the fp64 ones
        assert max_dev == pytest.approx((lp64[0] - clean[0].double())[mask].abs().max().item(), rel=1e-4)
    assert ours_stats["policy/clipfrac"] > 0


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
@pytest.mark.parametrize("agg", rlhf_kernels.AGG_MODES)
def test_fully_masked_batch(backend, agg):
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32)
    mask = torch.zeros_like(mask)
    labels = torch.full_like(labels, -100)
    kw = dict(bias=bias, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, agg=agg, dual_clip=3.0, backend=backend)
    ours, stats = run(
        lambda h, w, b: rlhf_kernels.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw), [hidden, weight, bias]
    )
    assert ours[0].item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in ours[1:])
    assert stats and all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_labels_outside_mask_do_not_matter(backend):
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32, per_seq_adv=True)
    kw = dict(bias=bias, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, chunk_size=3, backend=backend)
    clean = torch.where(mask, labels, 0)  # valid labels at every position, the same inside the mask
    a, a_stats = run(
        lambda h, w, b: rlhf_kernels.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw), [hidden, weight, bias]
    )
    b_, b_stats = run(
        lambda h, w, b: rlhf_kernels.fused_linear_ppo_loss(h, w, clean, old, adv, mask, **kw), [hidden, weight, bias]
    )
    for x, y in zip(a, b_):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)
    for k in a_stats:
        assert torch.allclose(a_stats[k], b_stats[k], rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, None])
def test_first_minibatch_stats(backend, chunk_size):
    """old_logprobs = the current log-probs (the first mini-batch of an update): ratio 1 everywhere, so
    max |lp - old| = approxkl = clipfrac = 0, and the loss is -agg(A)."""
    hidden, weight, bias, labels, _, adv, mask, _ = make_batch(torch.float32, garbage=False)
    with torch.no_grad():
        lp = rlhf_kernels.fused_linear_logprobs(
            hidden, weight, torch.where(mask, labels, -100), bias=bias, chunk_size=chunk_size, backend=backend
        )
    loss, stats = rlhf_kernels.fused_linear_ppo_loss(
        hidden, weight, labels, lp, adv, mask, bias=bias, chunk_size=chunk_size, backend=backend
    )
    assert stats["policy/max_abs_log_ratio"].item() == 0.0
    assert stats["policy/approxkl"].item() == 0.0 and stats["policy/clipfrac"].item() == 0.0
    # fp32 sums of terms of both signs: the error is relative to the terms' size, not to their (small) mean
    terms = adv[mask].double()
    assert abs(loss.item() + terms.mean().item()) <= 1e-6 * terms.abs().mean().item()


def test_reference_backend_reports_every_stat():
    """Every backend returns the documented statistics (a trainer logging them must not depend on the backend)."""
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32)
    kw = dict(bias=bias, ref_logprobs=ref, kl_coef=0.1)
    stats = rlhf_kernels.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="reference", **kw)[1]
    assert set(stats) == set(STATS) | {"policy/max_abs_log_ratio"}


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_per_sequence_advantages_broadcast_over_tokens(backend):
    """(B,) advantages mean the same as (B, T) ones repeated along T, also when B == T (a broadcast along the
    wrong dimension would pass silently there)."""
    h, w = torch.randn(4, 4, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    y = torch.randint(0, 50, (4, 4), device=DEVICE)
    old, mask = torch.randn(4, 4, device=DEVICE) - 4, torch.rand(4, 4, device=DEVICE) > 0.2
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5], device=DEVICE)
    per_seq = rlhf_kernels.fused_linear_ppo_loss(h, w, y, old, adv, mask, backend=backend)[0]
    per_tok = rlhf_kernels.fused_linear_ppo_loss(h, w, y, old, adv[:, None].expand(4, 4), mask, backend=backend)[0]
    assert per_seq.item() == pytest.approx(per_tok.item(), rel=1e-6)


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_upstream_gradient_scales(backend):
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32)
    kw = dict(bias=bias, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, chunk_size=5, backend=backend)
    leaves = [hidden, weight, bias]
    one, _ = run(lambda h, w, b: rlhf_kernels.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw), leaves)
    scaled, _ = run(lambda h, w, b: rlhf_kernels.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **kw), leaves, 2.5)
    for g1, g2 in zip(one[1:], scaled[1:]):  # the kernels scale saved gradients; the reference runs autograd
        assert g1.abs().sum() > 0 and torch.allclose(g2, 2.5 * g1, rtol=1e-6, atol=1e-6 * g1.abs().max().item())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """Under torch.compile every token goes through the chunks (no data-dependent row selection), so the
    garbage at unmasked positions (NaN / inf old and ref log-probs, ignore_index labels) meets the kernels."""
    torch._dynamo.reset()
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32)
    kw = dict(bias=bias, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, chunk_size=5, backend=backend, check=False)

    def step(h, w, b):
        loss, stats = rlhf_kernels.fused_linear_ppo_loss(h, w, labels, old, adv, mask, **{**kw, "bias": b})
        return loss * 2, stats

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    leaves = [hidden, weight, bias]
    eager, eager_stats = run(step, leaves)
    comp, comp_stats = run(compiled, leaves)
    for a, b in zip(comp, eager):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert set(comp_stats) == set(eager_stats)
    for k in eager_stats:
        assert torch.allclose(comp_stats[k], eager_stats[k], rtol=1e-5, atol=1e-7), k


def test_bad_inputs():
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32)
    with pytest.raises(ValueError, match="kl_coef is non-zero but ref_logprobs is None"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, kl_coef=0.1)
    bad = labels.clone()
    bad[0, 5] = -100  # a masked position
    with pytest.raises(ValueError, match="mask selects a position whose label is ignore_index=-100"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, bad, old, adv, mask)
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprobs=ref, kl_estimator="k4")
    bad = labels.clone()
    bad[0, 5] = V  # out of range inside the mask
    with pytest.raises(ValueError, match="labels must lie"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, bad, old, adv, mask)
    with pytest.raises(ValueError, match="valid modes"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, agg="sum")
    longer = torch.zeros(B, T + 1, device=DEVICE)  # consistent with each other, not with hidden (B, T, H)
    with pytest.raises(ValueError, match="token shape"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, labels, longer, longer, longer > -1)
    with pytest.raises(ValueError, match="dual_clip"):
        rlhf_kernels.fused_linear_ppo_loss(hidden, weight, labels, old, adv, mask, dual_clip=1.0)
