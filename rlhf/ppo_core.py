"""PPO building blocks, one function per phase: rollout, scoring, KL penalty, KL controllers, advantages, update.

Shapes: ``B`` sequences in a rollout batch, ``P`` (left-padded) prompt tokens, ``R`` response tokens, ``H`` hidden
size. A rollout batch is the dict of :func:`rlhf.generation.generate` (``input_ids, attention_mask (B, P + R)``,
``response_mask (B, R)``, ``ended (B,)``, ``prompt_length``) to which the phases add ``(B, R)`` fp32 tensors:

- :func:`rollout`: ``logprobs`` (the policy's at sampling time, the "old" log-probs of the ratio), ``entropy``,
  ``ref_logprobs``, ``kl`` (the per-token KL penalty) and ``values`` (the critic's, of the state before each token);
- :func:`score` gives ``scores (B,)``; :func:`compute_advantages` gives ``rewards``, ``advantages``, ``returns``.

Everything off ``response_mask`` is 0. The response token ``t`` is predicted from position ``P - 1 + t``, so the
hidden states, log-probs and values of the responses are the positions ``P - 1 .. P + R - 2`` of the sequence.
See Ouyang et al. 2022 (https://arxiv.org/abs/2203.02155) and Ziegler et al. 2019
(https://arxiv.org/abs/1909.08593) for the method; the KL controller is the latter's.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

import rlhf_kernels

from .generation import generate, response_logprobs
from .models import causal_lm_parts, head_dtype, last_hidden

KL_ERROR_CLIP = 0.2  # the adaptive controller's error clip


def take(batch: dict, index) -> dict:
    """The rows ``index`` (a slice or an index tensor) of a rollout batch; ``prompt_length`` is kept."""
    return {k: v[index] if torch.is_tensor(v) else v for k, v in batch.items()}


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so the update's first forward reproduces the rollout's (ratio 1)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def reference(policy, ref):
    """``(model, context)`` to compute reference log-probs: ``ref`` itself, or (``ref=None``, a LoRA policy) the
    policy inside ``disable_adapter()``, i.e. the frozen base model with no copy in memory."""
    if ref is not None:
        return ref, contextlib.nullcontext()
    return policy, policy.disable_adapter()


def response_hidden(model, batch: dict) -> tuple[torch.Tensor, nn.Linear]:
    """``(hidden (B, R, H), lm_head)``: the last hidden states predicting each response token, in the head's dtype
    (the autocast dtype inside autocast)."""
    P = batch["prompt_length"]
    backbone, head = causal_lm_parts(model)
    hidden = last_hidden(backbone, batch["input_ids"], batch["attention_mask"])[:, P - 1 : -1]
    return hidden.to(head_dtype(hidden, head)), head


def response_values(critic, batch: dict) -> torch.Tensor:
    """``(B, R)`` fp32 values ``V(s_t)`` of the state before each response token (garbage off the mask)."""
    P = batch["prompt_length"]
    return critic.token_values(batch["input_ids"], batch["attention_mask"])[:, P - 1 : -1]


def _head_args(hidden: torch.Tensor, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias in ``hidden``'s dtype."""
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    return head.weight.to(hidden.dtype), bias


def kl_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str = "k1",
    hidden: tuple | None = None,
    ref_hidden: tuple | None = None,
    temperature: float = 1.0,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token KL penalty ``(B, R)`` fp32, 0 off ``mask``.

    ``"k1"``: ``log pi(y_t) - log pi_ref(y_t)`` of the sampled token (unbiased, can be negative per token).
    ``"exact"``: the full-vocabulary ``KL(pi(.|s_t) || pi_ref(.|s_t))`` from both models' ``(hidden (B, R, H),
    lm_head)`` pairs (``hidden``, ``ref_hidden``) through :func:`rlhf_kernels.fused_linear_kl` (never negative).
    """
    if estimator == "k1":
        return rlhf_kernels.kl_penalty(logprobs, ref_logprobs, "k1").masked_fill(~mask, 0.0)
    if estimator != "exact":
        raise ValueError(f"kl estimator must be 'k1' or 'exact'; got {estimator!r}")
    if hidden is None or ref_hidden is None:
        raise ValueError("the exact KL needs the hidden states and LM heads of both models")
    (h, head), (ref_h, ref_head) = hidden, ref_hidden
    weight, bias = _head_args(h, head)
    ref_weight, ref_bias = _head_args(ref_h, ref_head)
    return rlhf_kernels.fused_linear_kl(
        h,
        weight,
        ref_h,
        ref_weight,
        bias=bias,
        ref_bias=ref_bias,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        backend=backend,
    )


@torch.no_grad()
def rollout_tensors(policy, ref, critic, batch: dict, cfg) -> dict:
    """The ``(B, R)`` tensors of one chunk of a rollout: ``logprobs, entropy, ref_logprobs, kl, values``."""
    mask = batch["response_mask"]
    exact = cfg.kl_estimator == "exact"
    kwargs = dict(temperature=cfg.temperature, backend=cfg.backend, chunk_size=cfg.chunk_size, return_hidden=exact)
    logprobs, entropy, *hidden = response_logprobs(policy, batch, return_entropy=True, **kwargs)
    ref_model, context = reference(policy, ref)
    with context:
        ref_out = response_logprobs(ref_model, batch, **kwargs)
        ref_logprobs, *ref_hidden = ref_out if exact else (ref_out,)
        kl = kl_per_token(
            logprobs,
            ref_logprobs,
            mask,
            estimator=cfg.kl_estimator,
            hidden=hidden[0] if exact else None,
            ref_hidden=ref_hidden[0] if exact else None,
            temperature=cfg.temperature,
            backend=cfg.backend,
            chunk_size=cfg.chunk_size,
        )
    values = response_values(critic, batch).masked_fill(~mask, 0.0)
    return {
        "logprobs": logprobs,
        "entropy": entropy.masked_fill(~mask, 0.0),
        "ref_logprobs": ref_logprobs,
        "kl": kl,
        "values": values,
    }


@torch.no_grad()
def rollout(policy, ref, critic, tokenizer, prompts: dict, cfg, autocast=contextlib.nullcontext) -> dict:
    """Sample one response per prompt, then score its tokens without gradients (in chunks of ``cfg.batch_size``).

    ``prompts``: left-padded ``input_ids, attention_mask (B, P)``. ``ref=None`` uses the adapter-disabled policy.
    Sampling follows ``cfg`` (``max_new_tokens, temperature, top_p, top_k``) and draws from the global torch RNG.
    Returns the rollout batch with ``logprobs, entropy, ref_logprobs, kl, values`` (module docstring).
    """
    batch = generate(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        do_sample=True,
    )
    parts = []
    for start in range(0, batch["input_ids"].shape[0], cfg.batch_size):
        with autocast():
            parts.append(rollout_tensors(policy, ref, critic, take(batch, slice(start, start + cfg.batch_size)), cfg))
    batch.update({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
    return batch


@torch.no_grad()
def score(
    reward_model, batch: dict, *, missing_eos_penalty: float | None = None, batch_size: int | None = None
) -> torch.Tensor:
    """``(B,)`` fp32 reward-model scores of prompt + response, read at the last real token (the EOS when there is
    one); ``missing_eos_penalty`` is subtracted from the responses that did not end with EOS (``ended == False``)."""
    n = batch["input_ids"].shape[0]
    step = batch_size or n
    scores = torch.cat(
        [
            reward_model(batch["input_ids"][i : i + step], batch["attention_mask"][i : i + step])
            for i in range(0, n, step)
        ]
    )
    if missing_eos_penalty is not None:
        scores = torch.where(batch["ended"], scores, scores - missing_eos_penalty)
    return scores


class FixedKLController:
    """A constant KL coefficient (``value``)."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_sequences: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional control of the KL coefficient towards a target sequence KL (Ziegler et al. 2019, sec. 2.2).

    After a batch of ``n`` sequences with mean KL ``kl``: ``error = clip(kl / target - 1, -0.2, 0.2)``, then
    ``value *= 1 + error * n / horizon``.
    """

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_sequences: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -KL_ERROR_CLIP), KL_ERROR_CLIP)
        self.value *= 1.0 + error * n_sequences / self.horizon


def compute_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    whiten: bool,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rewards, advantages, returns)``, each ``(B, R)`` fp32.

    ``rewards = -kl_coef * kl`` on every response token plus ``scores (B,)`` on the last one
    (:func:`rlhf_kernels.token_rewards`); advantages and returns by GAE over the response tokens
    (:func:`rlhf_kernels.gae`), advantages whitened over the batch when ``whiten``; all 0 off ``mask``.
    """
    rewards = rlhf_kernels.token_rewards(scores, mask, kl=kl, kl_coef=kl_coef)
    advantages, returns = rlhf_kernels.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, backend=backend)
    return rewards, advantages.masked_fill(~mask, 0.0), returns.masked_fill(~mask, 0.0)


def rollout_stats(batch: dict, kl_coef: float) -> dict:
    """The rollout's ``objective/*`` metrics, per sequence then averaged over the batch (python floats)."""
    mask = batch["response_mask"]
    kl = batch["kl"].sum(-1)  # (B,) sequence KL
    scores = batch["scores"]
    return {
        "objective/kl": kl.mean().item(),
        "objective/entropy": batch["entropy"].sum(-1).mean().item(),
        "objective/non_score_reward": (-kl_coef * kl).mean().item(),
        "objective/rlhf_reward": (scores - kl_coef * kl).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/kl_coef": kl_coef,
        "val/num_eos_tokens": int(batch["ended"].sum()),
        "response_length": mask.sum(-1).float().mean().item(),
    }


def ppo_losses(policy, critic, batch: dict, cfg) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)`` of one micro-batch: the clipped policy loss (fused LM head) + ``vf_coef`` x the clipped
    value loss, each aggregated over the micro-batch by ``cfg.agg``. ``batch`` holds the rollout tensors and
    ``advantages, returns``; ``stats`` are detached 0-dim tensors."""
    P, mask = batch["prompt_length"], batch["response_mask"]
    hidden, head = response_hidden(policy, batch)  # (b, R, H)
    weight, bias = _head_args(hidden, head)
    policy_loss, stats = rlhf_kernels.fused_linear_ppo_loss(
        hidden,
        weight,
        batch["input_ids"][:, P:],
        batch["logprobs"],
        batch["advantages"],
        mask,
        bias=bias,
        entropy_coef=cfg.entropy_coef,
        temperature=cfg.temperature,
        clip_low=cfg.clip_range,
        clip_high=cfg.clip_range,
        agg=cfg.agg,
        chunk_size=cfg.chunk_size,
        backend=cfg.backend,
    )
    value_loss, value_stats = rlhf_kernels.ppo_value_loss(
        response_values(critic, batch),
        batch["values"],
        batch["returns"],
        mask,
        clip=cfg.clip_range_value,
        agg=cfg.agg,
        backend=cfg.backend,
    )
    out = {
        "loss/policy": policy_loss.detach(),
        "loss/value": value_loss.detach(),
        "policy/approxkl": stats["policy/approxkl"],
        "policy/clipfrac": stats["policy/clipfrac"],
        "policy/entropy": stats["policy/entropy"],
        "val/clipfrac": value_stats["val/clipfrac"],
        "max_abs_log_ratio": stats["policy/max_abs_log_ratio"],
    }
    return policy_loss + cfg.vf_coef * value_loss, out


def micro_share(micro_mask: torch.Tensor, mini_mask: torch.Tensor, agg: str) -> float:
    """The weight of a micro-batch's loss in its mini-batch's, so that the micro-batches add up to the loss of the
    whole mini-batch: its share of the tokens (``token-mean``) or of the sequences with a token (``seq-mean-*``)."""
    if agg == "token-mean":
        return int(micro_mask.sum()) / max(int(mini_mask.sum()), 1)
    return int(micro_mask.any(-1).sum()) / max(int(mini_mask.any(-1).sum()), 1)


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip the gradient norm (``max_grad_norm = 0``: no clipping), step, zero the gradients; returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def mini_batch_step(policy, critic, optimizers: dict, mini: dict, cfg, autocast=contextlib.nullcontext) -> dict:
    """One optimizer update of the policy and the critic on a mini-batch, accumulated over micro-batches of
    ``cfg.batch_size``. Returns its stats (means over the mini-batch; ``max_abs_log_ratio`` a max)."""
    mask, n = mini["response_mask"], mini["input_ids"].shape[0]
    totals: dict = {}
    for start in range(0, n, cfg.batch_size):
        micro = take(mini, slice(start, start + cfg.batch_size))
        share = micro_share(micro["response_mask"], mask, cfg.agg)
        with autocast():
            loss, stats = ppo_losses(policy, critic, micro, cfg)
        (loss * share).backward()
        for key, value in stats.items():
            if key == "max_abs_log_ratio":
                totals[key] = max(totals.get(key, 0.0), float(value))
            else:
                totals[key] = totals.get(key, 0.0) + float(value) * share
    totals["grad_norm"] = clip_and_step(policy, optimizers["policy"], cfg.max_grad_norm)
    totals["val/grad_norm"] = clip_and_step(critic, optimizers["critic"], cfg.max_grad_norm)
    return totals


def ppo_update(
    policy,
    critic,
    optimizers: dict,
    batch: dict,
    cfg,
    *,
    seed: int,
    autocast=contextlib.nullcontext,
    ratio_tolerance: float = 1e-3,
) -> dict:
    """``cfg.ppo_epochs`` passes over the rollout batch in shuffled mini-batches of ``cfg.mini_batch_size``.

    ``optimizers``: ``{"policy": ..., "critic": ...}``. The shuffles come from a generator seeded by ``seed`` (the
    global RNG is left alone). The ratio-1 check: the first mini-batch runs before any optimizer step of this
    update, so its recomputed log-probs must equal the rollout's; their largest deviation is returned as
    ``policy/ratio_dev_at_start`` and a warning is raised above ``ratio_tolerance``. The other stats are means over
    the mini-batches (``*_avg``, ``grad_norm``, ``val/grad_norm``).
    """
    n = batch["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.mini_batch_size):
            mini = take(batch, order[start : start + cfg.mini_batch_size])
            parts.append(mini_batch_step(policy, critic, optimizers, mini, cfg, autocast))
    deviation = parts[0]["max_abs_log_ratio"]
    if deviation > ratio_tolerance:
        warnings.warn(
            f"PPO ratio check: the first mini-batch's log-probs differ from the rollout's by up to {deviation:.3g} "
            f"(> {ratio_tolerance:g}) before any update; the rollout and update forwards disagree (dropout, "
            "different numerics or a stale policy)",
            stacklevel=2,
        )
    names = {
        "policy/approxkl": "policy/approxkl_avg",
        "policy/clipfrac": "policy/clipfrac_avg",
        "policy/entropy": "policy/entropy_avg",
        "loss/policy": "loss/policy_avg",
        "loss/value": "loss/value_avg",
        "val/clipfrac": "val/clipfrac_avg",
        "grad_norm": "grad_norm",
        "val/grad_norm": "val/grad_norm",
    }
    stats = {new: sum(p[old] for p in parts) / len(parts) for old, new in names.items()}
    stats["policy/ratio_dev_at_start"] = deviation
    return stats
