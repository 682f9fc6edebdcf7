"""The compiled op torch.ops.rlhf_kernels_C.ppo_policy_fwd in its loss variants (loss_type cispo / sapo,
ratio_level sequence / sequence_token) against hand-computed values and the fp64 reference of the op table: tokens
that do not count, determinism. Shares its helpers with tests/test_ppo_loss_ops.py."""

import math

import pytest
import torch
from test_ppo_loss_ops import COUNT_COLS, DEVICES, EXP_ULPS, E, U, policy_op, tensors

from rlhf_kernels import _reference_ops as ref_ops

# ---------------------------------------------------------------------------------------------------------
# loss_type cispo / sapo and ratio_level sequence (GSPO) / sequence_token (GSPO-token)
# ---------------------------------------------------------------------------------------------------------

# name: (mode, tokens (lp, olp, A, w), offsets (None: token level), expected, rtol in u as a function of EXP_ULPS)
#   mode = (loss_type, ratio_level, clip_low, clip_high, dual_clip, tau_pos, tau_neg);
#   expected = (grad per token, weight * l per token, clip-low, clip-high, sum old - lp, lower).
# rtol 0: every value is exact in fp32 (r = 1, or only compared with the bounds).
F1_2 = 1.2000000476837158  # 1 + 0.2 rounded to fp32
G = 1 / (1 + E(-2 * (E(0.5) - 1)))  # sigmoid(tau_neg (e^0.5 - 1)) = 0.785404 (sapo, tau_neg = 2)
NAN_TOKEN = (math.nan, math.inf, math.inf, 0.0)  # does not count: never read
MODE_HAND = {
    # cispo, range [0.75, 1.25], e = -A clamp(r), l = e lp, grad = w e:
    #   d = 0: r = 1, e = -2, l = -2 * -1 = 2; d = 0.5: r = 1.649 -> 1.25 (clip-high), e = -2.5, l = 2.5;
    #   d = -0.5, A = -2, w = 0.5: r = 0.607 -> 0.75 (clip-low), e = 1.5, l = 1.5 * -2 = -3: grad 0.75, term -1.5
    "cispo": (
        (1, 0, 0.25, 0.25, 0.0, 1.0, 1.05),
        [(-1.0, -1.0, 2.0, 1.0), (-1.0, -1.5, 2.0, 1.0), (-2.0, -1.5, -2.0, 0.5), NAN_TOKEN],
        None,
        ([-2.0, -2.5, 0.75, 0.0], [2.0, 2.5, -1.5, 0.0], 1, 1, 0.0, 0),
        lambda e: 0,
    ),
    # sapo, tau_pos = 1, tau_neg = 2, range [0.8, 1.2] (counts only), g = sigmoid(tau (r - 1)),
    # l = -g (4 / tau) A, grad = q = -4 A g (1 - g) r:
    #   d = 0, A = 2: g = 1/2, l = -0.5 * 4 * 2 = -4, q = -4 * 2 * 0.25 = -2;
    #   d = 0.5, A = -1: g = sigmoid(2 * 0.6487) = 0.785404, l = 2 g = 1.570809, q = 4 g (1 - g) e^0.5 = 1.111531;
    #   d = 25, A = 1: r = e^20 (saturated: q = 0), g = 1, l = -4, clip-high (A > 0, r > 1.2).
    # The error of r (2 EXP u) moves z = tau (r - 1) by up to 2 * 1.65 * 2 EXP u + 1.3 u; through exp(-|z|), the
    # sigmoid and the products q carries at most (15 EXP + 8) u (l less).
    "sapo": (
        (2, 0, 0.2, 0.2, 0.0, 1.0, 2.0),
        [(-1.0, -1.0, 2.0, 1.0), (-1.0, -1.5, -1.0, 1.0), (24.0, -1.0, 1.0, 1.0), NAN_TOKEN],
        None,
        ([-2.0, 4 * G * (1 - G) * E(0.5), 0.0, 0.0], [-4.0, 2 * G, -4.0, 0.0], 0, 1, -25.5, 0),
        lambda e: 15 * e + 8,
    ),
    # sequence (GSPO), clip, range [0.8, 1.2]; G_s = sum(w q) / n_s added to every counted token:
    #   seq 0: d = 0.5, -0.5 -> D = 0, r = 1; A = 2, -1: l = q = -2, 1; G = -0.5 for both;
    #   seq 1: d = 0.5 -> r = 1.649 > 1.2, A = 1: l = -1.2 (clip-high), q = 0, G = 0;
    #   seq 2: a token of weight 0 (left out of D), d = 0.125 -> r = e^0.125 = 1.133148, A = 1, w = 0.5:
    #   l = q = -1.133148, G = 0.5 * -1.133148 / 1
    "sequence": (
        (0, 1, 0.2, 0.2, 0.0, 1.0, 1.05),
        [(-1.0, -1.5, 2.0, 1.0), (-2.0, -1.5, -1.0, 1.0), (-0.5, -1.0, 1.0, 1.0), NAN_TOKEN, (-1.0, -1.125, 1.0, 0.5)],
        [0, 2, 3, 5],
        ([-0.5, -0.5, 0.0, 0.0, -0.5 * E(0.125)], [-2.0, 1.0, -F1_2, 0.0, -0.5 * E(0.125)], 0, 1, -0.625, 0),
        lambda e: 2 * e + 3,  # term_rtol: r, -A r, w q; the mean G rounded once
    ),
    # the same at sequence_token (GSPO-token): grad = w q per token
    "sequence_token": (
        (0, 2, 0.2, 0.2, 0.0, 1.0, 1.05),
        [(-1.0, -1.5, 2.0, 1.0), (-2.0, -1.5, -1.0, 1.0), (-0.5, -1.0, 1.0, 1.0), NAN_TOKEN, (-1.0, -1.125, 1.0, 0.5)],
        [0, 2, 3, 5],
        ([-2.0, 1.0, 0.0, 0.0, -0.5 * E(0.125)], [-2.0, 1.0, -F1_2, 0.0, -0.5 * E(0.125)], 0, 1, -0.625, 0),
        lambda e: 2 * e + 3,
    ),
    # sequence with dual clip 3: d = 1.5, 1.5 -> r = e^1.5 = 4.48; A = -1, -2: l1 = 4.48 > 3, 8.96 > 6: lower,
    # l = 3, 6, no gradient
    "sequence, dual clip": (
        (0, 1, 0.2, 0.2, 3.0, 1.0, 1.05),
        [(0.5, -1.0, -1.0, 1.0), (0.5, -1.0, -2.0, 1.0)],
        [0, 0, 2],
        ([0.0, 0.0], [3.0, 6.0], 0, 0, -3.0, 2),
        lambda e: 0,
    ),
    # cispo per sequence, range [0.75, 1.25]: seq 0: D = (0.5 + 0) / 2 = 0.25 -> r = 1.284 > 1.25 for both tokens
    # (clip-high twice): e = -1.25 A = -2.5, 1.25, l = e lp = 2.5, -1.25; seq 1: D = -0.5 -> r = 0.607 -> 0.75
    # (clip-low), A = 1: e = -0.75, l = 2.25. q = 0, so G_s = 0 and grad = w e at both sequence levels
    "cispo sequence": (
        (1, 1, 0.25, 0.25, 0.0, 1.0, 1.05),
        [(-1.0, -1.5, 2.0, 1.0), (-1.0, -1.0, -1.0, 1.0), (-3.0, -2.5, 1.0, 1.0)],
        [0, 2, 3],
        ([-2.5, 1.25, -0.75], [2.5, -1.25, 2.25], 1, 2, 0.0, 0),
        lambda e: 0,
    ),
    # sapo per sequence, tau_pos = 1, tau_neg = 2: D = (0.5 - 0.5) / 2 = 0, r = 1, g = 1/2: A = 1: l = -2,
    # q = -1; A = -1: l = -0.5 * 2 * -1 = 1, q = 1. sequence: G = (-1 + 1) / 2 = 0 for both tokens
    "sapo sequence": (
        (2, 1, 0.2, 0.2, 0.0, 1.0, 2.0),
        [(-1.0, -1.5, 1.0, 1.0), (-1.5, -1.0, -1.0, 1.0)],
        [0, 2],
        ([0.0, 0.0], [-2.0, 1.0], 0, 0, 0.0, 0),
        lambda e: 0,
    ),
    # ... and at sequence_token: grad = q = -1, 1
    "sapo sequence_token": (
        (2, 2, 0.2, 0.2, 0.0, 1.0, 2.0),
        [(-1.0, -1.5, 1.0, 1.0), (-1.5, -1.0, -1.0, 1.0)],
        [0, 2],
        ([-1.0, 1.0], [-2.0, 1.0], 0, 0, 0.0, 0),
        lambda e: 0,
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(MODE_HAND))
def test_policy_modes_hand_computed(device, case):
    (loss_type, level, cl, ch, dual, tau_pos, tau_neg), tokens, offsets, expected, rtol_u = MODE_HAND[case]
    grads, terms, low, high, kl, lower = expected
    lp, olp, adv, w = tensors(device, *zip(*tokens))
    o = None if offsets is None else torch.tensor(offsets, device=device)
    grad, sums = policy_op(lp, olp, adv, w, cl, ch, dual, loss_type, level, o, tau_pos, tau_neg)
    assert grad.shape == (len(tokens),) and sums.shape == (5,)
    rtol = rtol_u(EXP_ULPS[device]) * U
    assert grad.cpu().tolist() == pytest.approx(grads, rel=rtol, abs=0)
    total = sum(terms)
    bound = (rtol + U) * sum(abs(t) for t in terms)  # the terms' errors and the final rounding to fp32
    assert abs(sums[0].item() - total) <= bound, (sums[0].item(), total, bound)
    assert sums[3].item() == pytest.approx(kl, rel=U, abs=0)
    assert (sums[1].item(), sums[2].item(), sums[4].item()) == (low, high, lower)


# (loss_type, ratio_level, clip_low, clip_high, dual_clip, tau_pos, tau_neg) of the random cases
MODES = [
    (0, 0, 0.2, 0.28, 3.0, 1.0, 1.05),
    (1, 0, 0.8, 4.0, 0.0, 1.0, 1.05),
    (2, 0, 0.2, 0.2, 0.0, 1.0, 1.05),
    (0, 1, 3e-4, 4e-4, 3.0, 1.0, 1.05),
    (0, 2, 0.05, 0.08, 0.0, 1.0, 1.05),
    (1, 1, 0.2, 0.28, 0.0, 1.0, 1.05),
    (1, 2, 0.2, 0.28, 0.0, 1.0, 1.05),
    (2, 1, 0.2, 0.2, 0.0, 0.5, 2.0),
    (2, 2, 0.1, 0.1, 0.0, 1.0, 1.05),
]
MODE_IDS = [f"{('clip', 'cispo', 'sapo')[m[0]]}-{('token', 'sequence', 'sequence_token')[m[1]]}" for m in MODES]


def sequence_table(n, g):
    """(S + 1,) offsets covering [0, n): empty sequences, single tokens, one longer than a CPU block and a CUDA
    tile (when n allows), then random lengths."""
    lengths, total = [], 0
    for length in [0, 1, 2100, 0, 7] + torch.randint(1, 600, (n,), generator=g).tolist():
        length = min(length, n - total)
        lengths.append(length)
        total += length
        if total == n and len(lengths) >= 5:
            break
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def ratios(lp, old, w, offsets, level):
    """(N,) fp64 ratio r = exp(clamp(x, -20, 20)) of every token, x its log-ratio at ``level`` (0 where it does
    not count)."""
    counts = w != 0
    x = torch.where(counts, lp - old, 0.0).double()
    if level != 0:
        seg = torch.bucketize(torch.arange(lp.numel()), offsets[1:], right=True)
        total = torch.zeros(offsets.numel() - 1, dtype=torch.float64).index_add_(0, seg, x)
        count = torch.zeros(offsets.numel() - 1, dtype=torch.float64).index_add_(0, seg, counts.double())
        x = (total / count.clamp_min(1))[seg]
    return x.clamp(-20, 20).exp()


def mode_inputs(n, mode, seed=0):
    """Random tokens over sequences (CPU): log-ratios spread around 0 per sequence and per token, saturated tokens
    and a saturated sequence, about 10% of tokens not counting (NaN / inf among them) and a sequence without a
    counted token. Tokens (ratio_level 0) or whole sequences whose clip or dual-clip decision lies within 1e-5
    (relative) of its threshold are made not to count: fp32 and fp64 may decide them either way."""
    loss_type, level, clip_low, clip_high, dual = mode[:5]
    g = torch.Generator().manual_seed(seed)
    offsets = sequence_table(n, g)
    n_seq = offsets.numel() - 1
    seg = torch.bucketize(torch.arange(n), offsets[1:], right=True)
    old = -5 * torch.rand(n, generator=g)
    lp = old + (0.3 * torch.randn(n_seq, generator=g))[seg] + 0.3 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    w = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, torch.rand(n, generator=g))
    sat = torch.randperm(n, generator=g)[: max(1, n // 50)]
    lp[sat] = old[sat] + torch.where(torch.rand(sat.numel(), generator=g) < 0.5, 25.0, -25.0)
    if n_seq > 6:
        lp[offsets[5] : offsets[6]] = old[offsets[5] : offsets[6]] + 22.0  # a saturated sequence
        w[offsets[6] : offsets[7]] = 0.0  # a sequence without a counted token
    off = torch.randperm(n, generator=g)[: n // 10]
    w[off] = 0.0
    lp[off[::2]], adv[off[1::2]] = math.nan, math.inf
    r, A = ratios(lp, old, w, offsets, level), adv.double()
    near = ((r - (1 - clip_low)).abs() < 1e-5 * r) | ((r - (1 + clip_high)).abs() < 1e-5 * r)
    if dual > 0:
        near |= (A < 0) & ((r.clamp(1 - clip_low, None) - dual).abs() < 1e-5 * dual)
    if level != 0:  # whole sequences, so that no other sequence's mean moves
        near = torch.zeros(n_seq).index_add_(0, seg, near.float())[seg] > 0
    w[near] = 0.0
    return [lp, old, adv, w, offsets]


def weighted_loss_bound(args, mode):
    """An upper bound of sum w |l| over the counted tokens, the scale of the weighted-loss sum's error: |A| max(r,
    rc) for clip (the dual clip only lowers |l|), |A| rc |lp| for cispo, (4 / tau) |A| for sapo (g < 1)."""
    lp, old, adv, w, offsets = args
    loss_type, level, clip_low, clip_high, _, tau_pos, tau_neg = mode
    counts = w != 0
    r = ratios(lp, old, w, offsets, level)
    A, rc = torch.where(counts, adv, 0.0).double().abs(), r.clamp(1 - clip_low, 1 + clip_high)
    if loss_type == 0:
        mag = A * torch.maximum(r, rc)
    elif loss_type == 1:
        mag = A * rc * torch.where(counts, lp, 0.0).double().abs()
    else:
        mag = A * 4 / torch.where(adv > 0, tau_pos, tau_neg).double()
    return (w.double() * mag).sum().item()


# Relative error of one weighted loss term: clip r (2 EXP u), -A r, w l (u each), a bound (u); cispo one more
# product (e lp). sapo: g = sigmoid(tau (r - 1)) from u' = exp(-|z|): z moves by tau r 2 EXP u + 2 |z| u (tau and
# the product rounded); for z >= 0, g = 1 / (1 + u') carries at most (u' / (1 + u')) (|dz| + 2 EXP u) + u, at most
# (2 EXP + 2) u; for z in (-tau, 0), g = u' / (1 + u') at most 2 (2 tau EXP + 2 tau + 2 EXP) u + 2 u; then k, the
# products with A and w: at most (8 tau EXP + 8 tau + 8 EXP + 5) u, tau <= 2 here.
def loss_term_rtol(loss_type, device):
    e = EXP_ULPS[device]
    return (2 * e + 3, 2 * e + 4, 24 * e + 21)[loss_type] * U


def scalar_args(mode):
    """The op's scalar arguments in schema order (clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos,
    tau_neg) from a MODES entry."""
    return (*mode[2:5], *mode[:2], *mode[5:])


def mode_call(args, mode, device):
    """The compiled op on mode_inputs' tensors (moved to ``device``) at ``mode``."""
    lp, old, adv, w, offsets = (a.to(device) for a in args)
    loss_type, level, clip_low, clip_high, dual, tau_pos, tau_neg = mode
    return policy_op(lp, old, adv, w, clip_low, clip_high, dual, loss_type, level, offsets, tau_pos, tau_neg)


def check_mode_against_reference(got, args, mode, device):
    """Every output against the fp64 reference op of the table. grad: exactly 0 where the reference is 0 (tokens
    that do not count, no gradient), elsewhere flash-attention's rule |ours - fp64| <= 2 |torch fp32 - fp64| + 4
    ulps of the largest value. sums: counts exact; the weighted loss within its terms' errors (loss_term_rtol) and
    one rounding to fp32 (a max-norm rule does not fit a sum whose terms share one per-sequence error); the log-ratio
    sum (exact terms) within one rounding."""
    ref64 = ref_ops.ppo_policy_fwd(*args, *scalar_args(mode), dtype=torch.float64, cast=False)
    plain = ref_ops.ppo_policy_fwd(*args, *scalar_args(mode), dtype=torch.float32)
    grad, sums = (x.cpu() for x in got)
    assert grad.dtype == sums.dtype == torch.float32 and grad.shape == ref64[0].shape and sums.shape == (5,)
    ours, r64, r32 = grad.double(), ref64[0], plain[0].double()
    zero = r64 == 0
    assert bool((ours[zero] == 0).all()), "exact zeros differ"
    if not zero.all():
        err, torch_err = (ours - r64)[~zero].abs().max().item(), (r32 - r64)[~zero].abs().max().item()
        atol = 4 * torch.finfo(torch.float32).eps * r64[~zero].abs().max().item()
        assert err <= 2 * torch_err + atol, (err, torch_err, atol)
    sums, expect = sums.double().tolist(), ref64[1].tolist()
    for c in COUNT_COLS[5]:
        assert sums[c] == expect[c], (c, sums[c], expect[c])
    bound = loss_term_rtol(mode[0], device) * weighted_loss_bound(args, mode) + U * abs(expect[0])
    assert abs(sums[0] - expect[0]) <= bound, (sums[0], expect[0], bound)
    d = torch.where(args[3] != 0, args[0] - args[1], 0.0).double()
    assert abs(sums[3] - expect[3]) <= U * abs(expect[3]) + 2**-40 * d.abs().sum().item(), (sums[3], expect[3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 33, 2049, 3 * 2048 + 5, 20000])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_policy_modes_matches_reference(device, n, mode):
    args = mode_inputs(n, mode)
    check_mode_against_reference(mode_call(args, mode, device), args, mode, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_policy_modes_ignored_tokens(device, mode):
    """Tokens of weight 0 give the same outputs, bit for bit, whether they hold zeros or NaN / inf, at every loss
    type and ratio level, and get gradient 0."""
    args = mode_inputs(5000, mode, seed=1)
    off = args[3] == 0
    clean = [torch.where(off, 0.0, x) for x in args[:3]] + args[3:]
    base = mode_call(clean, mode, device)
    assert (base[0][off.to(device)] == 0).all()
    for k, bad in enumerate((math.nan, math.inf, -math.inf)):
        dirty = list(clean)
        dirty[k] = torch.where(off, bad, clean[k])
        for a, b in zip(base, mode_call(dirty, mode, device)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_policy_modes_deterministic(device, mode):
    """The same bits twice, and (CPU) with 1 or 2 threads: partials per block or per sequence, added in order."""
    args = mode_inputs(60_000, mode, seed=2)
    first = mode_call(args, mode, device)
    outs = [mode_call(args, mode, device)]
    if device == "cpu":
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(mode_call(args, mode, device))
        finally:
            torch.set_num_threads(before)
    for out in outs:
        for a, b in zip(first, out):
            assert torch.equal(a, b)
