"""normalizer= (the denominator of a whole optimizer step) and rlhf_kernels.aggregation_denominator: a batch split
into micro-batches of unequal sizes, each loss given the step's normalizer, must sum to the one-big-batch loss in
value and gradient, for every aggregation mode, every averaging loss and every backend."""

import functools

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS, assert_within_torch_error, op_backends

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops.dpo_loss import AVERAGED_LOSS_TYPES

POLICY_BACKENDS = op_backends("ppo_policy_fwd")
VALUE_BACKENDS = op_backends("ppo_value_fwd")
AGGS = rlhf_kernels.AGG_MODES
B, T, H, V = 6, 9, 16, 97

# Rows of different lengths: a prompt then 7 tokens, 3 tokens then padding, nothing, holes, all 9, the last 2.
MASK_ROWS = [
    [0, 0, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 0, 1, 1, 0, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 0, 1, 1],
]
# Micro-batches of unequal sizes and token counts: (10, 4, 11) tokens, and (10, 0, 15) with a fully masked one.
SPLITS = {"3-1-2": [(0, 3), (3, 4), (4, 6)], "2-1-3": [(0, 2), (2, 3), (3, 6)]}


def token_mask() -> torch.Tensor:
    return torch.tensor(MASK_ROWS, dtype=torch.bool, device=DEVICE)


def step_normalizer(mask: torch.Tensor, agg: str, split) -> torch.Tensor:
    """What a training loop does: sum the micro-batches' denominators (then all-reduce them across ranks)."""
    return sum(rlhf_kernels.aggregation_denominator(mask[s:e], agg) for s, e in split)


def run(fn, leaves):
    """fn(*leaves) -> (loss, stats); returns [loss, grad of each leaf], detached."""
    for x in leaves:
        x.grad = None
    loss, _ = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [x.grad.detach().clone() for x in leaves]


def micro_sum(fn, split):
    """A loss function of whole-batch leaves -> the sum of fn over the micro-batch slices of ``split``."""

    def summed(*leaves):
        return sum(fn(s, e, *leaves)[0] for s, e in split), {}

    return summed


def check_against(ours, big, ref, atol, what):
    """Micro-batched sum vs one big batch (same backend, same dtype) vs the fp64 oracle of the big batch."""
    names = ["loss"] + [f"grad {i}" for i in range(len(ours) - 1)]
    for name, o, b, r in zip(names, ours, big, ref):
        assert o.dtype == b.dtype and o.shape == b.shape
        assert_within_torch_error(o, b, r, atol, f"{what} {name}")


# ---------------------------------------------------------------------------------------------------------
# aggregation_denominator and the normalizer semantics on hand-computed cases
# ---------------------------------------------------------------------------------------------------------


def test_denominator_hand_computed():
    # rows: 2 tokens, none, 2 tokens (with a hole); T = 3
    # token-mean: 2 + 0 + 2 = 4 tokens; seq modes: 2 sequences with a token; sum-norm: 2 x T = 6
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], device=DEVICE)
    expect = {"token-mean": 4.0, "seq-mean-token-sum": 2.0, "seq-mean-token-mean": 2.0, "seq-mean-token-sum-norm": 6.0}
    for agg in AGGS:
        d = rlhf_kernels.aggregation_denominator(mask, agg)
        assert d.dtype == torch.float32 and d.dim() == 0 and d.device == mask.device
        assert d.item() == expect[agg], agg
    # leading dimensions are sequences too: (2, 2, 3) holds the 3 rows above plus one more of 3 tokens
    mask4 = torch.cat((mask, torch.ones(1, 3, dtype=mask.dtype, device=DEVICE))).view(2, 2, 3)
    assert rlhf_kernels.aggregation_denominator(mask4, "token-mean").item() == 7.0
    assert rlhf_kernels.aggregation_denominator(mask4, "seq-mean-token-sum-norm").item() == 9.0
    assert rlhf_kernels.aggregation_denominator(torch.zeros(2, 3, dtype=torch.bool), "token-mean").item() == 0.0


@pytest.mark.parametrize("backend", ["default", "reference"])
def test_normalizer_hand_computed(backend):
    # loss [[1, 2, 3], [4, 5, 6]], mask [[1, 1, 0], [0, 0, 1]] (masked sum 1 + 2 + 6 = 9), normalizer 10:
    # token-mean and seq-mean-token-sum: 9 / 10; seq-mean-token-mean: (mean(1, 2) + 6) / 10 = 7.5 / 10;
    # seq-mean-token-sum-norm: 9 / 10 (the normalizer stands for sequences x T)
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64, device=DEVICE)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool, device=DEVICE)
    expect = {"token-mean": 0.9, "seq-mean-token-sum": 0.9, "seq-mean-token-mean": 0.75, "seq-mean-token-sum-norm": 0.9}
    agg_fn = rlhf_kernels.aggregate_loss if backend == "default" else reference.aggregate_loss
    for agg in AGGS:
        for n in (10, 10.0, torch.tensor(10), torch.tensor(10.0, device=DEVICE)):
            kw = {"normalizer": n} if backend == "default" else {"normalizer": torch.as_tensor(n)}
            assert agg_fn(loss, mask, agg, **kw).item() == pytest.approx(expect[agg], rel=1e-6), (agg, n)


@pytest.mark.parametrize("agg", AGGS)
def test_local_denominator_is_the_default(agg):
    """normalizer=aggregation_denominator(mask) reproduces normalizer=None bit for bit (the fully masked row
    included), through aggregate_loss and through the kernels' weights."""
    mask = token_mask()
    loss = torch.randn(B, T, device=DEVICE, dtype=torch.float64)
    n = rlhf_kernels.aggregation_denominator(mask, agg)
    assert torch.equal(
        rlhf_kernels.aggregate_loss(loss, mask, agg), rlhf_kernels.aggregate_loss(loss, mask, agg, normalizer=n)
    )
    lp, old, adv, mask = policy_batch()
    policy = functools.partial(rlhf_kernels.ppo_policy_loss, old_logprobs=old, advantages=adv, mask=mask, agg=agg)
    for backend in POLICY_BACKENDS:
        default = run(functools.partial(policy, backend=backend), [lp])
        given = run(functools.partial(policy, backend=backend, normalizer=n), [lp])
        for x, y in zip(default, given):
            assert torch.equal(x, y), backend


# ---------------------------------------------------------------------------------------------------------
# Micro-batches with the step's normalizer == one big batch
# ---------------------------------------------------------------------------------------------------------


def policy_batch(dtype=torch.float32):
    mask = token_mask()
    lp = (torch.randn(B, T, device=DEVICE) * 0.5 - 2).to(dtype).requires_grad_()
    old = (lp.detach() + 0.3 * torch.randn(B, T, device=DEVICE)).masked_fill(~mask, float("nan"))
    adv = torch.randn(B, T, device=DEVICE).masked_fill(~mask, float("nan"))
    return lp, old.to(dtype), adv.to(dtype), mask


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
def test_policy_loss_micro_batches(backend, agg, split):
    lp, old, adv, mask = policy_batch()
    parts = SPLITS[split]
    n = step_normalizer(mask, agg, parts)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg, backend=backend)

    def piece(s, e, x):
        return rlhf_kernels.ppo_policy_loss(x[s:e], old[s:e], adv[s:e], mask[s:e], normalizer=n, **kw)

    ours = run(micro_sum(piece, parts), [lp])
    big = run(lambda x: rlhf_kernels.ppo_policy_loss(x, old, adv, mask, **kw), [lp])
    lp64 = lp.detach().double().requires_grad_()
    ref = run(lambda x: reference.ppo_policy_loss(x, old.double(), adv.double(), mask, 0.2, 0.28, 3.0, agg), [lp64])
    check_against(ours, big, ref, 1e-6, f"{backend} {agg}")
    assert ours[1][~mask].eq(0).all() and ours[1].abs().sum() > 0


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("backend", VALUE_BACKENDS + ["reference"])
def test_value_loss_micro_batches(backend, agg, split):
    mask = token_mask()
    v = torch.randn(B, T, device=DEVICE).requires_grad_()
    old = v.detach() + 0.3 * torch.randn(B, T, device=DEVICE)
    ret = (v.detach() + torch.randn(B, T, device=DEVICE)).masked_fill(~mask, float("nan"))
    parts = SPLITS[split]
    n = step_normalizer(mask, agg, parts)

    def piece(s, e, x):
        return rlhf_kernels.ppo_value_loss(
            x[s:e], old[s:e], ret[s:e], mask[s:e], agg=agg, normalizer=n, backend=backend
        )

    ours = run(micro_sum(piece, parts), [v])
    big = run(lambda x: rlhf_kernels.ppo_value_loss(x, old, ret, mask, agg=agg, backend=backend), [v])
    v64 = v.detach().double().requires_grad_()
    ref = run(lambda x: reference.ppo_value_loss(x, old.double(), ret.double(), mask, 0.2, agg), [v64])
    check_against(ours, big, ref, 1e-6, f"{backend} {agg}")


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_loss_micro_batches(agg, split):
    """aggregate_loss in fp32 against the fp64 oracle, and in fp64 (public op and reference) to 1e-12."""
    mask, parts = token_mask(), SPLITS[split]
    n = step_normalizer(mask, agg, parts)
    x32 = torch.randn(B, T, device=DEVICE).masked_fill(~mask, float("nan")).requires_grad_()
    x64 = x32.detach().double().requires_grad_()

    def piece(fn):
        return lambda s, e, x: (fn(x[s:e], mask[s:e], agg, normalizer=n), {})

    def whole(fn):
        return lambda x: (fn(x, mask, agg), {})

    ours = run(micro_sum(piece(rlhf_kernels.aggregate_loss), parts), [x32])
    big = run(whole(rlhf_kernels.aggregate_loss), [x32])
    ref = run(whole(reference.aggregate_loss), [x64])
    check_against(ours, big, ref, 1e-6, agg)
    for fn in (rlhf_kernels.aggregate_loss, reference.aggregate_loss):
        ours64, big64 = run(micro_sum(piece(fn), parts), [x64]), run(whole(fn), [x64])
        for o, b in zip(ours64, big64):
            assert o.dtype == torch.float64
            assert torch.allclose(o, b, rtol=1e-12, atol=1e-15), fn.__module__


@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
def test_without_normalizer_micro_batches_differ(backend):
    """The bug the normalizer fixes: local token means weight each micro-batch's tokens by 1 / its own count
    (1/10, 1/4, 1/11 here) instead of 1/25, so the summed gradient is not the big batch's."""
    lp, old, adv, mask = policy_batch()
    parts = SPLITS["3-1-2"]
    kw = dict(agg="token-mean", backend=backend)
    n = step_normalizer(mask, "token-mean", parts)
    assert n.item() == 25.0

    def piece(s, e, x, **extra):
        return rlhf_kernels.ppo_policy_loss(x[s:e], old[s:e], adv[s:e], mask[s:e], **kw, **extra)

    local = run(micro_sum(piece, parts), [lp])
    glob = run(micro_sum(lambda s, e, x: piece(s, e, x, normalizer=n), parts), [lp])
    big = run(lambda x: rlhf_kernels.ppo_policy_loss(x, old, adv, mask, **kw), [lp])
    scale = big[1].abs().max().item()
    assert (local[1] - big[1]).abs().max().item() > 0.1 * scale  # wrong by a factor 25/10, 25/4 or 25/11
    assert (glob[1] - big[1]).abs().max().item() <= 1e-6 * scale


# ---------------------------------------------------------------------------------------------------------
# fused_linear_ppo_loss
# ---------------------------------------------------------------------------------------------------------

FUSED_PPO_OPTIONS = {
    "plain": {},
    "entropy": {"entropy_coef": 0.03},
    "kl+entropy": {"kl_coef": 0.1, "kl_estimator": "k3", "entropy_coef": 0.02},
}


@pytest.mark.parametrize("options", list(FUSED_PPO_OPTIONS))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("backend", POLICY_BACKENDS + ["reference"])
def test_fused_linear_ppo_loss_micro_batches(backend, agg, options):
    o = FUSED_PPO_OPTIONS[options]
    mask, parts = token_mask(), SPLITS["2-1-3"]
    hidden = (torch.randn(B, T, H, device=DEVICE) / 2).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).requires_grad_()
    bias = (torch.randn(V, device=DEVICE) / 2).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=DEVICE).masked_fill(~mask, -100)
    with torch.no_grad():
        lp = reference.fused_linear_logprobs(hidden, weight, labels, bias)[0]
    old = (lp + 0.3 * torch.randn(B, T, device=DEVICE)).masked_fill(~mask, float("nan"))
    ref_lp = (lp + 0.5 * torch.randn(B, T, device=DEVICE)).masked_fill(~mask, float("nan")) if "kl_coef" in o else None
    adv = torch.randn(B, T, device=DEVICE)
    n = step_normalizer(mask, agg, parts)
    kw = dict(agg=agg, clip_low=0.2, clip_high=0.28, **o)

    def call(h, w, b, sl=slice(None), **extra):
        r = None if ref_lp is None else ref_lp[sl]
        return rlhf_kernels.fused_linear_ppo_loss(
            h[sl], w, labels[sl], old[sl], adv[sl], mask[sl], bias=b, ref_logprobs=r, chunk_size=4, backend=backend,
            **kw, **extra,
        )  # fmt: skip

    leaves = [hidden, weight, bias]
    ours = run(micro_sum(lambda s, e, h, w, b: call(h, w, b, slice(s, e), normalizer=n), parts), leaves)
    big = run(call, leaves)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    ref64 = None if ref_lp is None else ref_lp.double()

    def oracle(h, w, b):
        return reference.fused_linear_ppo_loss(
            h, w, labels, old.double(), adv.double(), mask, b, ref64, ignore_index=-100, **kw
        )

    check_against(ours, big, run(oracle, leaves64), 1e-5, f"{backend} {agg} {options}")
    assert ours[1][~mask].eq(0).all() and ours[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# The DPO family: normalizer = the step's number of pairs
# ---------------------------------------------------------------------------------------------------------

P = 5  # pairs
PAIR_SPLIT = [(0, 1), (1, 4), (4, 5)]
DPO_OPTIONS = {
    "sigmoid": {"beta": 0.1, "label_smoothing": 0.1},
    "robust": {"beta": 0.1, "label_smoothing": 0.2},
    "hinge": {"beta": 0.1},
    "ipo": {"beta": 0.5},
    "apo_zero": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma": 0.5},
}


def test_dpo_options_cover_every_loss_type():
    assert set(DPO_OPTIONS) == set(rlhf_kernels.DPO_LOSS_TYPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
def test_dpo_loss_micro_batches(loss_type, dtype):
    opts = dict(loss_type=loss_type, **DPO_OPTIONS[loss_type])
    pc, pr = (x.clone().requires_grad_() for x in (torch.randn(2, P, device=DEVICE, dtype=dtype) * 3 - 30))
    rc, rr = (torch.randn(2, P, device=DEVICE, dtype=dtype) * 3 - 30).unbind()

    def piece(s, e, c, r):
        return rlhf_kernels.dpo_loss(c[s:e], r[s:e], rc[s:e], rr[s:e], normalizer=P, **opts)

    ours = run(micro_sum(piece, PAIR_SPLIT), [pc, pr])
    big = run(lambda c, r: rlhf_kernels.dpo_loss(c, r, rc, rr, **opts), [pc, pr])
    if dtype == torch.float64:  # the same sums in another order
        for o, b in zip(ours, big):
            assert torch.allclose(o, b, rtol=1e-12, atol=1e-15)
        return
    leaves64 = [x.detach().double().requires_grad_() for x in (pc, pr)]
    ref = run(lambda c, r: (reference.dpo_loss(c, r, rc.double(), rr.double(), **opts).mean(), {}), leaves64)
    check_against(ours, big, ref, 1e-6, loss_type)


def pair_batch():
    """hidden (2P, T, H): the P chosen sequences, then the P rejected ones; prompts of different lengths and right
    padding at -100."""
    hidden = (torch.randn(2 * P, T, H, device=DEVICE) / 2).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) / 2).requires_grad_()
    bias = (torch.randn(V, device=DEVICE) / 2).requires_grad_()
    labels = torch.randint(0, V, (2 * P, T), device=DEVICE)
    for s, prompt in enumerate([0, 2, 5, 3, 8, 1, 4, 6, 2, 7]):
        labels[s, :prompt] = -100
    labels[1, -3:] = -100
    labels[6, -2:] = -100
    ref_c, ref_r = (torch.randn(2, P, device=DEVICE) * 2 - 25).unbind()
    return hidden, weight, bias, labels, ref_c, ref_r


@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_fused_linear_dpo_loss_micro_batches(backend, loss_type):
    opts = dict(loss_type=loss_type, **DPO_OPTIONS[loss_type])
    hidden, weight, bias, labels, ref_c, ref_r = pair_batch()

    def pairs(x, s, e):  # the chosen and rejected rows of pairs s..e-1, in the (2B, ...) layout
        return torch.cat((x[s:e], x[P + s : P + e]))

    def piece(s, e, h, w, b):
        return rlhf_kernels.fused_linear_dpo_loss(
            pairs(h, s, e), w, pairs(labels, s, e), ref_c[s:e], ref_r[s:e], bias=b, normalizer=torch.tensor(P),
            chunk_size=12, backend=backend, **opts,
        )  # fmt: skip

    def whole(h, w, b):
        return rlhf_kernels.fused_linear_dpo_loss(
            h, w, labels, ref_c, ref_r, bias=b, chunk_size=12, backend=backend, **opts
        )

    def oracle(h, w, b):
        lp = reference.fused_linear_logprobs(h, w, labels, b)[0]
        seq = lp.sum(-1) / ((labels != -100).sum(-1) if loss_type in AVERAGED_LOSS_TYPES else 1)
        return reference.dpo_loss(seq[:P], seq[P:], ref_c.double(), ref_r.double(), **opts).mean(), {}

    leaves = [hidden, weight, bias]
    ours, big = run(micro_sum(piece, PAIR_SPLIT), leaves), run(whole, leaves)
    ref = run(oracle, [x.detach().double().requires_grad_() for x in leaves])
    check_against(ours, big, ref, 1e-5, f"{backend} {loss_type}")
    assert ours[1][labels == -100].eq(0).all() and ours[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# torch.compile and input checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", POLICY_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """Micro-batches of a compiled step with the normalizer as a tensor input (checked on the device, no graph
    break) and as a float, against eager; a tensor normalizer of 0 fails inside the compiled graph."""
    torch._dynamo.reset()
    lp, old, adv, mask = policy_batch()
    hidden, weight, bias, labels, *_ = pair_batch()
    flat = (labels != -100)[:B]

    def step(x, h, s, e, n):
        loss, _ = rlhf_kernels.ppo_policy_loss(
            x[s:e], old[s:e], adv[s:e], mask[s:e], agg="seq-mean-token-mean", normalizer=n, backend=backend
        )
        zeros = torch.zeros(flat[s:e].shape, device=DEVICE)
        head, _ = rlhf_kernels.fused_linear_ppo_loss(
            h[s:e], weight, labels[s:e], zeros, zeros + 1.0, flat[s:e], normalizer=n, backend=backend, check=False
        )
        return loss + head

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")

    def accumulate(fn, n):  # the micro-batches of one optimizer step, summed
        return lambda x, h: (sum(fn(x, h, s, e, n) for s, e in SPLITS["2-1-3"]), {})

    h = hidden[:B].detach().requires_grad_()
    for n in (torch.tensor(7.0, device=DEVICE), 7.0):
        ours, eager = run(accumulate(compiled, n), [lp, h]), run(accumulate(step, n), [lp, h])
        for a, b in zip(ours, eager):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    if DEVICE.type == "cpu":  # on a GPU a failed device-side assertion would end the process
        with pytest.raises(RuntimeError, match="normalizer must be a finite number > 0"):
            compiled(lp, h, 0, 2, torch.tensor(0.0))


BAD = [
    (0, ValueError, "finite number > 0"),
    (-3.0, ValueError, "finite number > 0"),
    (float("inf"), ValueError, "finite number > 0"),
    (float("nan"), ValueError, "finite number > 0"),
    (torch.tensor(0.0), ValueError, "finite number > 0"),
    (torch.tensor([4.0]), ValueError, "0-dim"),
    (torch.tensor(True), TypeError, "real number"),
    (True, TypeError, "normalizer must be"),
    ("4", TypeError, "normalizer must be"),
]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=[repr(b) for b, _, _ in BAD])
def test_bad_normalizer(bad, exc, match):
    lp, old, adv, mask = policy_batch()
    hidden, weight, bias, labels, ref_c, ref_r = pair_batch()
    zeros = torch.zeros(labels.shape, device=DEVICE)
    calls = [
        lambda: rlhf_kernels.aggregate_loss(old, mask, normalizer=bad),
        lambda: rlhf_kernels.ppo_policy_loss(lp, old, adv, mask, normalizer=bad),
        lambda: rlhf_kernels.ppo_value_loss(lp, old, adv, mask, normalizer=bad),
        lambda: rlhf_kernels.fused_linear_ppo_loss(
            hidden, weight, labels, zeros, zeros, labels != -100, normalizer=bad
        ),
        lambda: rlhf_kernels.dpo_loss(ref_c, ref_r, ref_c, ref_r, normalizer=bad),
        lambda: rlhf_kernels.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, normalizer=bad),
    ]
    for call in calls:
        with pytest.raises(exc, match=match):
            call()
