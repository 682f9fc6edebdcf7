"""The low-level ops of the op table (:mod:`rlhf_kernels._registry`) in plain PyTorch, and example inputs for each.

Each function has the arguments and outputs of its op (contract in the table) and computes in ``dtype`` (fp64 by
default: the oracle of the cross-backend test; fp32 gives "plain PyTorch in the kernels' precision", the
yardstick of the test's tolerance). Inputs are rounded the way every kernel rounds them (z = fp32(x) * fp32(1/T),
the log-ratio d = lp - old in fp32) before widening. ``cast=False`` returns the outputs in ``dtype`` instead of the
contract's dtypes. These functions allocate (N, V) temporaries; they are the "reference" backend of the low-level
ops, never a fast path.

``*_examples(device, big)`` build the inputs the cross-backend test (tests/test_cross_backend.py) runs every
backend on: ignored rows and masked-out rows holding NaN (they must not be read), masks with holes, V not a power
of two, rows longer than one kernel block. ``big=True`` gives shapes that reach each launcher's largest block (for
the ahead-of-time compile test, which never runs them).
"""

from __future__ import annotations

import torch

from . import reference

F32, F64 = torch.float32, torch.float64
NAN = float("nan")


def _out(x: torch.Tensor, dtype: torch.dtype, cast: bool) -> torch.Tensor:
    return x.to(dtype).contiguous() if cast else x


def _scaled(x: torch.Tensor, inv_temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """z = x * inv_temperature rounded in fp32, as every kernel computes it, then widened to ``dtype``."""
    return (x.float() * torch.tensor(inv_temperature, dtype=F32)).to(dtype)


def _zero_where(cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, torch.zeros((), dtype=x.dtype, device=x.device), x)


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------------------------


def logprobs_fwd(logits, labels, inv_temperature, ignore_index, *, dtype=F64, cast=True):
    V = logits.shape[-1]
    ignored = labels == ignore_index  # (B, T)
    z = _scaled(logits, inv_temperature, dtype)
    z = _zero_where(ignored.unsqueeze(-1), z)  # ignored rows are not read: whatever they hold stays out
    row_max = z.amax(-1)
    d = z - row_max.unsqueeze(-1)
    log_norm = d.exp().sum(-1).log()
    logp = d - log_norm.unsqueeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    valid = (labels >= 0) & (labels < V)
    lp = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, NAN)
    return tuple(_out(_zero_where(ignored, x), F32, cast) for x in (lp, entropy, row_max, log_norm))


def logprobs_bwd(
    logits, labels, grad_logprobs, grad_entropy, row_max, log_norm, entropy, inv_temperature, ignore_index,
    *, dtype=F64, cast=True,
):  # fmt: skip
    V = logits.shape[-1]
    ignored = (labels == ignore_index).unsqueeze(-1)
    z = _zero_where(ignored, _scaled(logits, inv_temperature, dtype))
    g_lp, g_h, m, ln, h = (t.to(dtype).unsqueeze(-1) for t in (grad_logprobs, grad_entropy, row_max, log_norm, entropy))
    logp = (z - m) - ln  # from the saved statistics, as the kernels do
    onehot = torch.arange(V, device=logits.device) == labels.unsqueeze(-1)
    gz = torch.where(onehot, g_lp, 0.0) - logp.exp() * (g_lp + g_h * (logp + h))
    return _out(_zero_where(ignored, gz * inv_temperature), logits.dtype, cast)


def logprobs_fwd_examples(device, big=False):
    g = torch.Generator().manual_seed(0)
    if big:  # the largest blocks: 8192 bf16 / 4096 fp32 elements
        cases = []
        for V, dtype in ((70_001, torch.bfloat16), (5_000, F32)):
            x = torch.randn(1, 2, V, generator=g).to(dtype)
            cases.append((x, torch.randint(0, V, (1, 2), generator=g), 1.0, -100))
        return [tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in c) for c in cases]
    # fp32, V = 5003: more than one block on every backend; ignored rows hold NaN; a label out of range (NaN log-prob)
    x1 = 3 * torch.randn(2, 5, 5003, generator=g)
    y1 = torch.randint(0, 5003, (2, 5), generator=g)
    y1[0, 1], y1[1, 3:], y1[1, 0] = -100, -100, 5003
    x1[0, 1], x1[1, 4, ::7] = NAN, float("inf")
    # bf16 rows read in place from logits[:, :-1] (strides (1500, 300)), V = 300, ignore_index 0 (label 0 ignored)
    x2 = (2 * torch.randn(3, 5, 300, generator=g)).to(torch.bfloat16)[:, :-1]
    y2 = torch.randint(1, 300, (3, 4), generator=g)
    y2[0, 2], y2[2, :2] = 0, 0
    x2[0, 2] = NAN
    # fp16, V = 1 (every log-prob is exactly 0), one ignored row; and a batch whose rows are all ignored
    x3 = torch.randn(2, 3, 1, generator=g).half()
    y3 = torch.zeros(2, 3, dtype=torch.int64)
    y3[1, 1] = -1
    x4 = torch.full((1, 3, 17), NAN)
    y4 = torch.full((1, 3), -100)
    cases = [(x1, y1, 1 / 0.7, -100), (x2, y2, 1.0, 0), (x3, y3, 2.0, -1), (x4, y4, 1.0, -100)]
    return [(x.to(device), y.to(device), t, i) for x, y, t, i in cases]


def logprobs_bwd_examples(device, big=False):
    g = torch.Generator().manual_seed(1)
    cases = []
    for x, y, inv_t, ignore in logprobs_fwd_examples(device, big):
        lp, ent, row_max, log_norm = logprobs_fwd(x, y, inv_t, ignore)
        g_lp, g_h = (torch.randn(y.shape, generator=g).to(device) for _ in range(2))
        cases.append((x, y, g_lp, g_h, row_max, log_norm, ent, inv_t, ignore))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Exact KL over the vocabulary
# ---------------------------------------------------------------------------------------------------------


def _row_stats(z):
    m = z.amax(-1)
    return m, (z - m.unsqueeze(-1)).exp().sum(-1).log()


def kl_fwd(logits, ref_logits, mask, inv_temperature, reverse, *, dtype=F64, cast=True):
    V = logits.shape[-1]
    keep = torch.ones(logits.shape[0] * logits.shape[1], dtype=torch.bool, device=logits.device)
    keep = keep if mask is None else mask
    z = _zero_where(~keep.unsqueeze(-1), _scaled(logits.reshape(-1, V), inv_temperature, dtype))
    w = _zero_where(~keep.unsqueeze(-1), _scaled(ref_logits.reshape(-1, V), inv_temperature, dtype))
    a, b = (z, w) if reverse else (w, z)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0.0)
    kl = torch.where(torch.isfinite(z).all(-1) & torch.isfinite(w).all(-1), kl, NAN)
    outs = (kl, *_row_stats(z), *_row_stats(w))
    return tuple(_out(_zero_where(~keep, x), F32, cast) for x in outs)


def kl_bwd(
    logits, ref_logits, mask, grad_kl, row_max, log_norm, ref_row_max, ref_log_norm, kl, inv_temperature, reverse,
    *, dtype=F64, cast=True,
):  # fmt: skip
    V = logits.shape[-1]
    drop = torch.zeros(grad_kl.shape, dtype=torch.bool, device=logits.device) if mask is None else ~mask
    drop = drop.unsqueeze(-1)
    z = _zero_where(drop, _scaled(logits.reshape(-1, V), inv_temperature, dtype))
    w = _zero_where(drop, _scaled(ref_logits.reshape(-1, V), inv_temperature, dtype))
    g, m_z, l_z, m_w, l_w, k = (t.to(dtype).unsqueeze(-1) for t in (grad_kl, row_max, log_norm, ref_row_max,
                                                                    ref_log_norm, kl))  # fmt: skip
    lp, lq = (z - m_z) - l_z, (w - m_w) - l_w
    gz = g * lp.exp() * ((lp - lq) - k) if reverse else g * (lp.exp() - lq.exp())
    return _out(_zero_where(drop, gz * inv_temperature).view(logits.shape), logits.dtype, cast)


def kl_fwd_examples(device, big=False):
    g = torch.Generator().manual_seed(2)
    if big:
        x = torch.randn(1, 2, 70_001, generator=g).to(torch.bfloat16)
        cases = [(x, x.float(), None, 1.0, True), (x, x, torch.ones(2, dtype=torch.bool), 1.0, False)]
    else:
        # fp32 policy (2, 3) against a bf16 reference split (3, 2); holes in the mask (masked rows hold NaN); one
        # row identical in both (KL exactly 0)
        x1 = (3 * torch.randn(2, 3, 1000, generator=g)).to(torch.bfloat16).float()
        r1 = (3 * torch.randn(3, 2, 1000, generator=g)).to(torch.bfloat16)
        r1.view(6, 1000)[4] = x1.view(6, 1000)[4].bfloat16()
        m1 = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
        x1.view(6, 1000)[1], r1.view(6, 1000)[5] = NAN, float("-inf")
        # fp32 both, V = 5003 (several blocks), no mask, forward KL
        x2, r2 = 2 * torch.randn(1, 4, 5003, generator=g), 2 * torch.randn(1, 4, 5003, generator=g)
        # bf16 rows read in place from [:, :-1], fp16 reference, every row masked out
        x3 = torch.randn(2, 4, 77, generator=g).to(torch.bfloat16)[:, :-1]
        r3 = torch.randn(2, 3, 77, generator=g).half()
        m3 = torch.zeros(6, dtype=torch.bool)
        cases = [(x1, r1, m1, 1 / 0.7, True), (x2, r2, None, 1.0, False), (x3, r3, m3, 1.0, True)]
    return [(x.to(device), r.to(device), None if m is None else m.to(device), t, rev) for x, r, m, t, rev in cases]


def kl_bwd_examples(device, big=False):
    g = torch.Generator().manual_seed(3)
    cases = []
    for x, r, m, inv_t, reverse in kl_fwd_examples(device, big):
        kl, *stats = kl_fwd(x, r, m, inv_t, reverse)
        grad_kl = torch.randn(kl.shape, generator=g).to(device)
        cases.append((x, r, m, grad_kl, *stats, kl, inv_t, reverse))
    return cases


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


def gae_fwd(rewards, values, mask, gamma, lam, *, dtype=F64, cast=True):
    adv, ret = reference.gae(rewards.to(dtype), values.to(dtype), mask, gamma, lam)
    w = mask.to(dtype)
    count = w.sum(-1)
    mean = (w * adv).sum(-1) / count.clamp_min(1)
    m2 = (w * (adv - mean.unsqueeze(-1)).square()).sum(-1)
    return tuple(_out(x, F32, cast) for x in (adv, ret, torch.stack([count, mean, m2], -1)))


def gae_fwd_examples(device, big=False):
    g = torch.Generator().manual_seed(4)
    if big:  # the largest Triton block (1024 steps)
        return [(torch.randn(2, 3000, device=device), torch.randn(2, 3000, device=device),
                 torch.ones(2, 3000, dtype=torch.bool, device=device), 0.99, 0.95)]  # fmt: skip
    # fp32 (5, 37): holes, right padding, an empty row, a full row
    r1, v1 = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g)
    m1 = torch.rand(5, 37, generator=g) > 0.3
    m1[1, 20:], m1[2], m1[3] = False, False, True
    # bf16 (2, 1500): rows longer than one Triton block and one CPU tile
    r2, v2 = (torch.randn(2, 1500, generator=g).to(torch.bfloat16) for _ in range(2))
    m2 = torch.rand(2, 1500, generator=g) > 0.1
    # fp16 (3, 1), gamma = 0 (advantages = r - V)
    r3, v3 = (torch.randn(3, 1, generator=g).half() for _ in range(2))
    m3 = torch.tensor([[True], [False], [True]])
    cases = [(r1, v1, m1, 0.99, 0.95), (r2, v2, m2, 0.999, 0.9), (r3, v3, m3, 0.0, 0.5)]
    return [(r.to(device), v.to(device), m.to(device), gm, lm) for r, v, m, gm, lm in cases]


# ---------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------


def _segment_ids(seq_offsets: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) index of each token's sequence from the (S + 1,) offsets table."""
    return torch.bucketize(torch.arange(n, device=seq_offsets.device), seq_offsets[1:], right=True)


def _segment_mean(x: torch.Tensor, counts: torch.Tensor, seg: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per token: the mean of ``x`` over the counted tokens of its sequence (x is 0 where a token does not count)."""
    total = torch.zeros(n_seq, dtype=x.dtype, device=x.device).index_add_(0, seg, x)
    n = torch.zeros(n_seq, dtype=x.dtype, device=x.device).index_add_(0, seg, counts.to(x.dtype))
    return (total / n.clamp_min(1))[seg]


def ppo_policy_fwd(logprobs, old_logprobs, advantages, weight, seq_offsets, clip_low, clip_high, dual_clip,
                   loss_type, ratio_level, tau_pos, tau_neg, *, dtype=F64, cast=True):  # fmt: skip
    counts = weight != 0
    d = torch.where(counts, logprobs - old_logprobs, 0.0).to(dtype)  # rounded in fp32 first, as the kernels do
    lp = torch.where(counts, logprobs, 0.0).to(dtype)
    A = torch.where(counts, advantages, 0.0).to(dtype)
    w = weight.to(dtype)
    n_tok = logprobs.shape[0]
    seg = _segment_ids(seq_offsets, n_tok) if ratio_level != 0 else None
    # the log-ratio of each token's ratio: its own, or its sequence's mean rounded to fp32 as the kernels store it
    x = d if ratio_level == 0 else _segment_mean(d, counts, seg, seq_offsets.shape[0] - 1).to(F32).to(dtype)
    lo = torch.tensor(1.0 - clip_low, dtype=F32).item()  # formed in fp64, rounded once to fp32
    hi = torch.tensor(1.0 + clip_high, dtype=F32).item()
    saturated = x.abs() > 20.0
    rho = x.clamp(-20.0, 20.0).exp()
    zero = torch.zeros_like(rho)
    lower = torch.zeros_like(counts)
    if loss_type == 0:  # clip
        l1, l2 = -A * rho, -A * rho.clamp(lo, hi)
        clipped = l2 > l1
        loss = torch.where(clipped, l2, l1)
        lower = (dual_clip > 0) & (A < 0) & (loss > -A * dual_clip)
        loss = torch.where(lower, -A * dual_clip, loss)
        q = torch.where(clipped | lower | saturated, zero, l1)
        e = zero
        low, high = clipped & (A < 0), clipped & (A > 0)
    elif loss_type == 1:  # cispo: the clipped ratio is a constant weight on -A logprobs
        rc = rho.clamp(lo, hi)
        loss, q, e = -rc * A * lp, zero, -rc * A
        low, high = rho < lo, rho > hi
    elif loss_type == 2:  # sapo: a sigmoid gate in place of the hard clip
        tau = torch.where(A > 0, tau_pos, tau_neg).to(dtype)
        g = torch.sigmoid(tau * (rho - 1.0))
        loss = -g * (4.0 / tau) * A
        q = torch.where(saturated, zero, -4.0 * A * g * (1.0 - g) * rho)
        e = zero
        low, high = (A < 0) & (rho < lo), (A > 0) & (rho > hi)
    else:
        raise ValueError(f"unknown loss_type {loss_type}")
    if ratio_level == 1:  # every token's log-prob moves its sequence's ratio by 1 / n_s
        grad = w * e + _segment_mean(torch.where(counts, w * q, 0.0), counts, seg, seq_offsets.shape[0] - 1)
    else:
        grad = w * (q + e)
    terms = torch.stack([w * loss, low.to(dtype), high.to(dtype), -d, lower.to(dtype)])  # (5, N)
    sums = torch.where(counts, terms, 0.0).sum(-1)
    return _out(torch.where(counts, grad, 0.0), F32, cast), _out(sums, F32, cast)


def ppo_value_fwd(values, old_values, returns, weight, clip, *, dtype=F64, cast=True):
    lo, hi = (old_values - clip).to(dtype), (old_values + clip).to(dtype)  # the clip range rounded in fp32
    v, R, w = values.to(dtype), returns.to(dtype), weight.to(dtype)
    a = v - R
    b = torch.minimum(torch.maximum(v, lo), hi) - R
    clipped = b * b > a * a
    loss = 0.5 * torch.where(clipped, b * b, a * a)
    counts = weight != 0
    sums = torch.where(counts, torch.stack([w * loss, clipped.to(dtype)]), 0.0).sum(-1)
    return _out(torch.where(counts & ~clipped, w * a, 0.0), F32, cast), _out(sums, F32, cast)


def _drop_near_ties(w: torch.Tensor, *gaps: torch.Tensor) -> None:
    """Tokens whose clip decision lies within 1e-5 (relative) of its threshold stop counting: fp32 and fp64 may
    decide them either way, and the gradient jumps there."""
    for gap in gaps:
        w[gap.abs() < 1e-5] = 0.0


def _policy_gaps(rho, adv, clip_low, clip_high, dual, loss_type):
    """Relative distances of each token's decisions (clip bounds, dual clip) from their thresholds."""
    gaps = [(rho - (1 - clip_low)) / rho, (rho - (1 + clip_high)) / rho]
    if dual > 0 and loss_type == 0:
        gaps.append((adv < 0) * (rho.clamp(1 - clip_low, None) - dual) / dual + (adv >= 0))
    return gaps


# (loss_type, ratio_level, clip_low, clip_high, dual_clip, tau_pos, tau_neg) of the examples
_POLICY_MODES = (
    (0, 0, 0.2, 0.28, 3.0, 1.0, 1.05),
    (0, 0, 0.2, 0.2, 0.0, 1.0, 1.05),
    (1, 0, 0.8, 4.0, 0.0, 1.0, 1.05),  # CISPO's wide range
    (2, 0, 0.2, 0.2, 0.0, 1.0, 1.05),
    (0, 1, 3e-4, 4e-4, 3.0, 1.0, 1.05),  # GSPO's small range
    (0, 2, 0.05, 0.08, 0.0, 1.0, 1.05),
    (1, 1, 0.2, 0.28, 0.0, 1.0, 1.05),
    (2, 1, 0.2, 0.2, 0.0, 0.5, 2.0),
    (2, 2, 0.1, 0.1, 0.0, 1.0, 1.05),
)


def ppo_policy_fwd_examples(device, big=False):
    g = torch.Generator().manual_seed(5)
    n = 3000  # three Triton blocks, two CPU blocks
    # sequences: empty ones, one token, one longer than a Triton block and a CPU block, one never counted
    lengths = torch.tensor([0, 1, 7, 2300, 64, 0, 200, 300, 100, 28])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    seg = _segment_ids(offsets, n)
    shift = (0.3 * torch.randn(len(lengths), generator=g))[seg]  # sequence-level log-ratios spread around 0
    old = -5 * torch.rand(n, generator=g)
    lp = old + shift + 0.3 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    w = 0.5 + torch.rand(n, generator=g)
    lp[:40] = old[:40] + torch.where(torch.arange(40) % 2 == 0, 25.0, -25.0)  # saturated log-ratios
    lp[offsets[7] : offsets[8]] = old[offsets[7] : offsets[8]] + 22.0  # a saturated sequence
    w[offsets[8] : offsets[9]] = 0.0  # a sequence without counted tokens
    w[-300:] = 0.0  # tokens that do not count hold NaN / inf (never read)
    lp[-300::2], adv[-299::2] = NAN, float("inf")
    cases = []
    for loss_type, level, clip_low, clip_high, dual, tau_pos, tau_neg in _POLICY_MODES:
        wc = w.clone()
        counts = wc != 0
        d = torch.where(counts, lp - old, 0.0)
        x = d if level == 0 else _segment_mean(d.double(), counts, seg, len(lengths))
        rho = x.double().clamp(-20, 20).exp()
        near = torch.zeros(n, dtype=torch.bool)
        for gap in _policy_gaps(rho, adv.double(), clip_low, clip_high, dual, loss_type):
            near |= gap.abs() < 1e-5  # fp32 and fp64 may decide these either way
        if level != 0:  # drop whole sequences, so that no other sequence's mean changes
            near = torch.zeros(len(lengths)).index_add_(0, seg, near.float())[seg] > 0
        wc[near] = 0.0
        cases.append((lp, old, adv, wc, offsets, clip_low, clip_high, dual, loss_type, level, tau_pos, tau_neg))
    empty = torch.zeros(0)
    cases.append((empty, empty, empty, empty, torch.zeros(1, dtype=torch.int64), 0.2, 0.2, 0.0, 0, 1, 1.0, 1.05))
    return [tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in c) for c in cases]


def ppo_value_fwd_examples(device, big=False):
    g = torch.Generator().manual_seed(6)
    n = 2500
    v, old, ret = (torch.randn(n, generator=g) for _ in range(3))
    w = 0.5 + torch.rand(n, generator=g)
    w[-250:] = 0.0
    v[-250::2], old[-249::2] = NAN, float("-inf")
    cases = []
    for clip in (0.2, float("inf")):
        wc = w.clone()
        lo, hi = (old - clip).double(), (old + clip).double()
        a = v.double() - ret.double()
        b = torch.minimum(torch.maximum(v.double(), lo), hi) - ret.double()
        _drop_near_ties(wc, torch.where(b != a, (b * b - a * a) / (a * a + b * b), 1.0))
        cases.append((v, old, ret, wc, clip))
    return [tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in c) for c in cases]
