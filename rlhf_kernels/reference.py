"""Plain PyTorch references: written for clarity, used as the test oracle, the benchmark baseline and the
last-resort backend.

Inputs are upcast to at least fp32 (fp64 stays fp64, which is how tests build their oracle). These functions
allocate full ``(N, V)`` temporaries; the kernels exist to avoid exactly that.
"""

from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of ``labels`` and entropy under softmax(logits / temperature).

    logits (..., V), labels (...) -> (logprobs (...), entropy (...)), in fp32 (fp64 for fp64 logits).
    Rows whose label is ``ignore_index`` give 0.0 for both; rows with a NaN or +-inf logit give NaN for both;
    a label outside [0, V) that is not ``ignore_index`` gives a NaN log-prob.
    """
    z = _upcast(logits) / temperature  # (..., V)
    logp = torch.log_softmax(z, dim=-1)  # (..., V)
    ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, torch.full_like(lp, float("nan")))
    ent = -(logp.exp() * logp).sum(-1)
    bad = ~torch.isfinite(z).all(-1)
    nan = torch.full_like(lp, float("nan"))
    lp = torch.where(bad, nan, lp)
    ent = torch.where(bad, nan, ent)
    zero = torch.zeros_like(lp)
    return torch.where(ignored, zero, lp), torch.where(ignored, zero, ent)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dimension: (..., V) -> (...)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs(logits, labels, temperature)[1]


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs(hidden @ weight.T + bias, labels)``: hidden (..., H), weight (V, H), bias (V,)."""
    logits = torch.nn.functional.linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    return logprobs(logits, labels, temperature, ignore_index)


def kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    direction: str = "reverse",
) -> torch.Tensor:
    """Exact per-token KL between p = softmax(logits / T) and q = softmax(ref_logits / T): (..., V) -> (...).

    ``direction="reverse"``: KL(p || q) = sum_v p_v (log p_v - log q_v); ``"forward"``: KL(q || p). Computed in
    fp32 (fp64 if either input is fp64); clamped at 0; 0.0 where ``mask`` is False; NaN for a row holding a NaN or
    +-inf logit in either input. ``ref_logits`` is treated as frozen (no gradient).
    """
    dtype = torch.promote_types(_upcast(logits).dtype, _upcast(ref_logits).dtype)
    if mask is not None:  # masked-out rows are ignored entirely: their values (even NaN) reach no output or gradient
        keep = mask.bool().unsqueeze(-1)
        logits = torch.where(keep, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        ref_logits = torch.where(keep, ref_logits, torch.zeros((), dtype=ref_logits.dtype, device=ref_logits.device))
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (..., V)
    logq = torch.log_softmax(ref_logits.detach().to(dtype) / temperature, dim=-1)  # (..., V)
    if direction == "forward":
        logp, logq = logq, logp
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
    bad = ~(torch.isfinite(logits).all(-1) & torch.isfinite(ref_logits).all(-1))
    kl = torch.where(bad, torch.full_like(kl, float("nan")), kl)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def fused_linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    direction: str = "reverse",
) -> torch.Tensor:
    """``kl_from_logits(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias)``."""
    linear = torch.nn.functional.linear
    logits = linear(_upcast(hidden), _upcast(weight), None if bias is None else _upcast(bias))
    ref_b = None if ref_bias is None else _upcast(ref_bias).detach()
    ref_logits = linear(_upcast(ref_hidden).detach(), _upcast(ref_weight).detach(), ref_b)
    return kl_from_logits(logits, ref_logits, temperature, mask, direction)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation with masked positions skipped: the per-time-step loop, (B, T) -> (B, T).

    Going from t = T-1 down to 0 with next_value = acc = 0: where mask[t], delta = r_t + gamma next_value - V_t,
    acc = delta + gamma lam acc and next_value = V_t; elsewhere both carry through. advantages[t] = acc after step
    t; returns = advantages + values. fp32 (fp64 for fp64 inputs).
    """
    dtype = torch.promote_types(_upcast(rewards).dtype, _upcast(values).dtype)
    r, v, m = rewards.to(dtype), values.to(dtype), mask.bool()
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=dtype, device=r.device)
    acc = torch.zeros(B, dtype=dtype, device=r.device)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        acc = torch.where(m[:, t], delta + gamma * lam * acc, acc)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        adv[:, t] = acc
    return adv, adv + v


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token ``loss`` (..., T) reduced over the tokens where ``mask`` is True, by mode (sequences are the
    leading dimensions). Positions outside the mask never reach the result, even if they hold NaN.

    ``normalizer`` (> 0) replaces the batch's denominator: the token count for ``"token-mean"``, the count of
    sequences with a masked token for ``"seq-mean-token-sum"`` and ``"seq-mean-token-mean"``, and that count
    times T for ``"seq-mean-token-sum-norm"``."""
    m = mask.bool()
    x = torch.where(m, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    given = None if normalizer is None else torch.as_tensor(normalizer, dtype=x.dtype, device=x.device)
    if agg == "token-mean":
        return x.sum() / (m.sum().clamp_min(1) if given is None else given)
    seq_sum = x.sum(-1)  # (...)
    seq_len = m.sum(-1)
    has_tokens = seq_len > 0
    n_seq = has_tokens.sum().clamp_min(1) if given is None else given
    if agg == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if agg == "seq-mean-token-mean":
        return (seq_sum / seq_len.clamp_min(1)).sum() / n_seq
    if agg == "seq-mean-token-sum-norm":
        return seq_sum.sum() / n_seq / loss.shape[-1] if given is None else seq_sum.sum() / given
    raise ValueError(f"unknown agg {agg!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / m.sum().clamp_min(1)


def _masked_out(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with 0 outside the mask, so that padding (even NaN) reaches neither loss nor gradient."""
    return torch.where(mask.bool(), x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    loss_type: str = "clip",
    ratio_level: str = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-family policy loss, written with autograd: the clipped surrogate (https://arxiv.org/abs/1707.06347),
    optionally dual-clipped (https://arxiv.org/abs/1912.09729), or CISPO / SAPO, with the ratio per token or per
    sequence (GSPO). All inputs (..., T); ``is_weights`` (..., T) multiplies the per-token loss (a zero weight also
    leaves the token out of its sequence's mean log-ratio and out of the stats). Returns (loss, stats) in fp32
    (fp64 for fp64). ``normalizer``: as in :func:`aggregate_loss`; the stats are means over this batch's tokens."""
    dtype = torch.promote_types(_upcast(logprobs).dtype, _upcast(old_logprobs).dtype)
    counted = mask.bool() if is_weights is None else mask.bool() & (is_weights != 0)
    lp, old, adv = (_masked_out(x, counted, dtype) for x in (logprobs, old_logprobs.detach(), advantages.detach()))
    log_ratio = lp - old
    if ratio_level == "token":
        x = log_ratio
    else:
        seq_mean = log_ratio.sum(-1, keepdim=True) / counted.sum(-1, keepdim=True).clamp_min(1)
        # "sequence": every token moves the shared ratio; "sequence_token": value s, gradient through pi / sg[pi]
        x = seq_mean.expand_as(lp) if ratio_level == "sequence" else seq_mean.detach() + lp - lp.detach()
    ratio = torch.exp(x.clamp(-20.0, 20.0))
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    lower = torch.zeros_like(counted)
    if loss_type == "clip":
        unclipped, clipped = -adv * ratio, -adv * ratio.clamp(lo, hi)
        per_token = torch.maximum(unclipped, clipped)
        if dual_clip is not None:
            cap = -adv * dual_clip
            lower = (adv < 0) & (per_token > cap)
            per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
        low, high = (clipped > unclipped) & (adv < 0), (clipped > unclipped) & (adv > 0)
    elif loss_type == "cispo":
        per_token = -ratio.clamp(lo, hi).detach() * adv * lp
        low, high = ratio < lo, ratio > hi
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_tau_pos, sapo_tau_neg).to(dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
        low, high = (adv < 0) & (ratio < lo), (adv > 0) & (ratio > hi)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if is_weights is not None:
        per_token = per_token * _masked_out(is_weights.detach(), counted, dtype)
    stats = {
        "policy/clipfrac": _masked_mean((low | high).to(dtype), counted),
        "policy/clipfrac_low": _masked_mean(low.to(dtype), counted),
        "policy/clipfrac_high": _masked_mean(high.to(dtype), counted),
        "policy/approxkl": _masked_mean(-log_ratio.detach(), counted),
        "policy/clipfrac_lower": _masked_mean(lower.to(dtype), counted),
    }
    return aggregate_loss(per_token, mask, agg, normalizer), stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2), aggregated by ``agg``
    (``normalizer`` as in :func:`aggregate_loss`)."""
    dtype = torch.promote_types(_upcast(values).dtype, _upcast(old_values).dtype)
    v, old, ret = (_masked_out(x, mask, dtype) for x in (values, old_values.detach(), returns.detach()))
    unclipped = (v - ret).square()
    clipped = unclipped if clip is None else (torch.minimum(torch.maximum(v, old - clip), old + clip) - ret).square()
    per_token = 0.5 * torch.maximum(unclipped, clipped)
    stats = {"val/clipfrac": _masked_mean((clipped > unclipped).to(dtype), mask)}
    return aggregate_loss(per_token, mask, agg, normalizer), stats


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    reference_free: bool = False,
) -> torch.Tensor:
    """Per-pair DPO-family losses (B,), written out one formula per loss type."""
    pc, pr = _upcast(policy_chosen_logps), _upcast(policy_rejected_logps)
    no_ref = reference_free or loss_type == "simpo"
    rc = torch.zeros_like(pc) if no_ref else _upcast(ref_chosen_logps).detach()
    rr = torch.zeros_like(pr) if no_ref else _upcast(ref_rejected_logps).detach()
    h = (pc - rc) - (pr - rr)
    eps = label_smoothing
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * (pc - rc)) + torch.sigmoid(beta * (pr - rr))
    if loss_type == "simpo":
        x = beta * (pc - pr) - gamma
        return -(1 - eps) * logsig(x) - eps * logsig(-x)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def ranked_reward_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    mode: str = "pairwise",
    margins: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Per-prompt ranked reward-model losses (P,), written as loops over the prompts and their pairs: pairwise
    (InstructGPT) means over a prompt's pairs, or the Plackett-Luce negative log-likelihood (ties: each member
    of a tie group chooses from the same remaining set). 0 for a prompt without a ranked pair."""
    r = _upcast(rewards)
    out = []
    for p in range(r.shape[0]):
        idx = [k for k in range(r.shape[1]) if int(ranks[p, k]) >= 0]
        pairs = [(w, v) for w in idx for v in idx if int(ranks[p, w]) < int(ranks[p, v])]
        if not pairs:
            out.append(r[p].sum() * 0)
            continue
        center = sum((r[p, w] + r[p, v]) ** 2 for w, v in pairs) / len(pairs)
        if mode == "pairwise":
            terms = []
            for w, v in pairs:
                m = 0.0
                if margins is not None:
                    m = margins[p, w, v] if margins.dim() == 3 else margins[p, w] - margins[p, v]
                terms.append(-torch.nn.functional.logsigmoid(r[p, w] - r[p, v] - _upcast(torch.as_tensor(m))))
            loss = sum(terms) / len(pairs)
        else:
            loss = 0.0
            for i in idx:
                rest = [j for j in idx if int(ranks[p, j]) >= int(ranks[p, i])]
                loss = loss + torch.logsumexp(r[p, rest], 0) - r[p, i]
        out.append(loss + center_coef * center)
    return torch.stack(out)


def fused_linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ignore_index: int = -100,
    normalizer: float | torch.Tensor | None = None,
    loss_type: str = "clip",
    ratio_level: str = "token",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unfused composition: full logits -> log-probs and entropy -> policy loss (:func:`ppo_policy_loss`, with
    ``is_weights`` on it alone) + kl_coef * KL estimator - entropy_coef * entropy, each aggregated by ``agg`` over
    ``mask`` (``normalizer`` as in :func:`aggregate_loss`)."""
    from .ops.kl_penalty import kl_penalty_from_delta

    m = mask.bool()
    labels = torch.where(m, labels, torch.full_like(labels, ignore_index))
    lp, ent = fused_linear_logprobs(hidden, weight, labels, bias, temperature, ignore_index)
    loss, stats = ppo_policy_loss(
        lp, old_logprobs, advantages, m, clip_low, clip_high, dual_clip, agg, normalizer, loss_type, ratio_level,
        sapo_tau_pos, sapo_tau_neg, is_weights,
    )  # fmt: skip
    stats["policy/entropy"] = _masked_mean(ent.detach(), m)
    dev = (lp.detach() - _masked_out(old_logprobs.detach(), m, lp.dtype)).abs()
    stats["policy/max_abs_log_ratio"] = torch.where(m, dev, torch.zeros((), dtype=dev.dtype, device=dev.device)).amax()
    loss = loss - entropy_coef * aggregate_loss(ent, m, agg, normalizer)
    if ref_logprobs is not None:
        kl = kl_penalty_from_delta(lp - _masked_out(ref_logprobs.detach(), m, lp.dtype), kl_estimator)
        stats["policy/kl"] = _masked_mean(kl.detach(), m)
        loss = loss + kl_coef * aggregate_loss(kl, m, agg, normalizer)
    return loss, stats
