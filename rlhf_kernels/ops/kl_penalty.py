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
K3_LOG_RATIO_CLAMP = 20.0  # |log pi_ref - log pi| is clamped to this before the exponential
K3_VALUE_CLAMP = 10.0  # and k3 itself to [-10, 10]


def check_kl_kind(kind: str) -> str:
    if kind not in KL_PENALTY_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; valid kinds are {', '.join(KL_PENALTY_KINDS)}")
    return kind


def kl_penalty_from_delta(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """The estimator ``kind`` applied elementwise to ``delta = log pi - log pi_ref`` (any shape, float)."""
    if kind == "k1":
        return delta
    if kind == "abs":
        return delta.abs()
    if kind == "k2":
        return 0.5 * delta.square()
    if kind == "k3":
        d = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # log pi_ref - log pi
        return (torch.expm1(d) - d).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)  # exp(d) - d - 1, exact near d = 0
    check_kl_kind(kind)
    raise AssertionError("unreachable")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL penalty estimated from the log-probs of the sampled tokens under the policy and the reference.

    Args:
        logprobs: log pi(y_t) of the sampled tokens, any shape, float (e.g. from :func:`rlhf_kernels.logprobs`).
        ref_logprobs: log pi_ref(y_t), same shape. Treated as a constant: it gets no gradient.
        kind: ``"k1"``: log pi - log pi_ref; ``"abs"``: |k1|; ``"k2"``: (log pi - log pi_ref)^2 / 2;
            ``"k3"``: exp(d) - d - 1 with d = log pi_ref - log pi clamped to [-20, 20], then clamped to [-10, 10].
            The k3 clamps keep bf16 / fp16 runs finite when the policy drifts far from the reference on some
            token (exp(20) ~ 5e8); they cut the gradient of the tokens they clamp.

    Returns a tensor of the same shape, in fp32 (fp64 if an input is fp64), differentiable with respect to
    ``logprobs``. For the exact KL over the whole vocabulary, use :func:`rlhf_kernels.kl_from_logits` or
    :func:`rlhf_kernels.fused_linear_kl`.
    """
    check_kl_kind(kind)
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
    return kl_penalty_from_delta(delta, kind)


def kl_penalty_and_grad(delta: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl_penalty_from_delta(delta, kind), its derivative with respect to delta)``, elementwise, without
    autograd: for losses that compute their gradient in the forward pass. A clamp that is active cuts the
    derivative to 0 (as autograd does through ``clamp``)."""
    if kind == "k1":
        return delta, torch.ones_like(delta)
    if kind == "abs":
        return delta.abs(), delta.sign()
    if kind == "k2":
        return 0.5 * delta.square(), delta
    if kind == "k3":
        d = (-delta).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
        e = torch.expm1(d)
        k3 = e - d
        inside = (delta.abs() <= K3_LOG_RATIO_CLAMP) & (k3 <= K3_VALUE_CLAMP) & (k3 >= -K3_VALUE_CLAMP)
        return k3.clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP), torch.where(inside, -e, torch.zeros_like(e))
    check_kl_kind(kind)
    raise AssertionError("unreachable")
