"""Per-token KL estimators from the sampled tokens' log-probabilities (k1, |k1|, k2, k3).

With delta = log pi(y) - log pi_ref(y) for a token y sampled from pi, each estimator's expectation over y relates
to KL(pi || pi_ref) (see http://joschu.net/blog/kl-approx.html):
    k1 = delta                         unbiased, high variance, negative for many tokens
    abs = |delta|                      biased upward, never negative
    k2 = delta^2 / 2                   biased, low variance
    k3 = exp(-delta) + delta - 1       unbiased, never negative, low variance
:func:`kl_penalty_from_delta` is the single definition of these formulas: every loss that needs one calls it.
"""

from __future__ import annotations

import torch

KL_PENALTY_KINDS = ("k1", "abs", "k2", "k3")
# Every per-token KL the library computes: the sampled-token estimators above, and "exact", the full-vocabulary
# KL(pi || pi_ref) of :func:`rlhf_kernels.kl_from_logits` / :func:`rlhf_kernels.fused_linear_kl`.
KL_ESTIMATORS = (*KL_PENALTY_KINDS, "exact")
K3_LOG_RATIO_CLAMP = 20.0  # |log pi_ref - log pi| is clamped to this before the exponential
K3_VALUE_CLAMP = 10.0  # and k3 itself to [-10, 10]


def check_kl_estimator(kl_estimator: str) -> str:
    """``kl_estimator`` when it is one of the sampled-token estimators, else a ValueError listing them."""
    if kl_estimator not in KL_PENALTY_KINDS:
        valid = ", ".join(KL_PENALTY_KINDS)
        raise ValueError(f"unknown kl_estimator {kl_estimator!r} for the sampled tokens; valid ones are {valid}")
    return kl_estimator


def kl_penalty_from_delta(delta: torch.Tensor, kl_estimator: str) -> torch.Tensor:
    """The estimator ``kl_estimator`` applied elementwise to ``delta = log pi - log pi_ref`` (any shape, float)."""
    if kl_estimator == "k1":
        return delta
    if kl_estimator == "abs":
        return delta.abs()
    if kl_estimator == "k2":
        return 0.5 * delta.square()
    if kl_estimator == "k3":
        d = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # log pi_ref - log pi
        return (torch.expm1(d) - d).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)  # exp(d) - d - 1, exact near d = 0
    check_kl_estimator(kl_estimator)
    raise AssertionError("unreachable")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token KL penalty estimated from the log-probs of the sampled tokens under the policy and the reference.

    Args:
        logprobs: log pi(y_t) of the sampled tokens, any shape, float (e.g. from :func:`rlhf_kernels.logprobs`).
        ref_logprobs: log pi_ref(y_t), same shape. Treated as a constant: it gets no gradient.
        kl_estimator: ``"k1"``: log pi - log pi_ref; ``"abs"``: |k1|; ``"k2"``: (log pi - log pi_ref)^2 / 2;
            ``"k3"``: exp(d) - d - 1 with d = log pi_ref - log pi clamped to [-20, 20], then clamped to [-10, 10].
            The k3 clamps keep bf16 / fp16 runs finite when the policy drifts far from the reference on some
            token (exp(20) ~ 5e8); they cut the gradient of the tokens they clamp.

    Returns a tensor of the same shape, in fp32 (fp64 if an input is fp64), differentiable with respect to
    ``logprobs``. For the exact KL over the whole vocabulary, use :func:`rlhf_kernels.kl_from_logits` or
    :func:`rlhf_kernels.fused_linear_kl`.
    """
    check_kl_estimator(kl_estimator)
    for name, x in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have the same shape, got {tuple(logprobs.shape)} and "
            f"{tuple(ref_logprobs.shape)}"
        )
    if logprobs.device != ref_logprobs.device:
        raise ValueError(f"logprobs are on {logprobs.device} but ref_logprobs are on {ref_logprobs.device}")
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype), torch.float32)
    delta = logprobs.to(dtype) - ref_logprobs.detach().to(dtype)
    return kl_penalty_from_delta(delta, kl_estimator)


def kl_penalty_and_grad(delta: torch.Tensor, kl_estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl_penalty_from_delta(delta, kl_estimator), its derivative with respect to delta)``, elementwise, without
    autograd: for losses that compute their gradient in the forward pass. A clamp that is active cuts the
    derivative to 0 (as autograd does through ``clamp``)."""
    if kl_estimator == "k1":
        return delta, torch.ones_like(delta)
    if kl_estimator == "abs":
        return delta.abs(), delta.sign()
    if kl_estimator == "k2":
        return 0.5 * delta.square(), delta
    if kl_estimator == "k3":
        d = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        e = torch.expm1(d)
        k3 = e - d
        inside = (delta.abs() <= K3_LOG_RATIO_CLAMP) & (k3 <= K3_VALUE_CLAMP) & (k3 >= -K3_VALUE_CLAMP)
        return k3.clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP), torch.where(inside, -e, torch.zeros_like(e))
    check_kl_estimator(kl_estimator)
    raise AssertionError("unreachable")
