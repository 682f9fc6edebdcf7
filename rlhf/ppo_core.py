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

from . import distributed
from .generation import generate, response_logprobs
from .models import HeadStates, LMHead
from .ptx import PretrainMix, with_ptx
from .train import accumulate_and_step, to_device

KL_ERROR_CLIP = 0.2  # the adaptive controller's error clip


def check_kl_estimator(name: str) -> str:
    """``name`` when it is one of :data:`rlhf_kernels.KL_ESTIMATORS`, else a ValueError listing them."""
    if name not in rlhf_kernels.KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {name!r}; choose from {', '.join(rlhf_kernels.KL_ESTIMATORS)}")
    return name


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


def response_values(critic, batch: dict) -> torch.Tensor:
    """``(B, R)`` fp32 values ``V(s_t)`` of the state before each response token (garbage off the mask)."""
    P = batch["prompt_length"]
    return critic.token_values(batch["input_ids"], batch["attention_mask"])[:, P - 1 : -1]


def kl_per_token(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str = "k1",
    states: HeadStates | None = None,
    ref_states: HeadStates | None = None,
    head: LMHead | None = None,
) -> torch.Tensor:
    """Per-token KL penalty ``(B, R)`` fp32, 0 off ``mask``, by ``estimator`` (one of :data:`KL_ESTIMATORS`).

    The sampled-token estimators (:data:`rlhf_kernels.KL_ESTIMATORS`; ``"k1"``: ``log pi(y_t) - log pi_ref(y_t)``,
    unbiased, can be negative per token) read the two log-probs of the sampled token. ``"exact"``: the
    full-vocabulary ``KL(pi(.|s_t) || pi_ref(.|s_t))`` from both models' hidden states (``states``,
    ``ref_states``) through the head adapter ``head`` (never negative).
    """
    check_kl_estimator(estimator)
    if estimator != "exact":
        return rlhf_kernels.kl_penalty(logprobs, ref_logprobs, estimator).masked_fill(~mask, 0.0)
    if states is None or ref_states is None or head is None:
        raise ValueError("the exact KL needs the hidden states of both models and the head adapter")
    return head.kl(states, ref_states, mask)


@torch.no_grad()
def rollout_tensors(policy, ref, critic, batch: dict, cfg, head: LMHead) -> dict:
    """The ``(B, R)`` tensors of one chunk of a rollout: ``logprobs, entropy, ref_logprobs, kl, values``."""
    mask = batch["response_mask"]
    exact = cfg.kl_estimator == "exact"
    logprobs, entropy, *states = response_logprobs(head, policy, batch, return_entropy=True, return_hidden=exact)
    ref_model, context = reference(policy, ref)
    with context:
        ref_out = response_logprobs(head, ref_model, batch, return_hidden=exact)
        ref_logprobs, *ref_states = ref_out if exact else (ref_out,)
        kl = kl_per_token(
            logprobs,
            ref_logprobs,
            mask,
            estimator=cfg.kl_estimator,
            states=states[0] if exact else None,
            ref_states=ref_states[0] if exact else None,
            head=head,
        )
    values = response_values(critic, batch).masked_fill(~mask, 0.0)
    return {
        "logprobs": logprobs,
        "entropy": entropy.masked_fill(~mask, 0.0),
        "ref_logprobs": ref_logprobs,
        "kl": kl,
        "values": values,
    }


def chunk_seed(seed: int, step: int, first: int) -> int:
    """The sampling seed of the generation chunk whose first prompt is number ``first`` of iteration ``step``'s
    global rollout batch: a function of the run's seed and the chunk's place only, so the same prompts get the
    same samples on any number of processes and after a resume."""
    return (seed * 1_000_003 + step) * 1_000_033 + first


def pad_rollout(batch: dict, prompt_length: int, response_length: int, pad_token_id: int) -> dict:
    """A rollout batch padded to ``prompt_length`` (prompts, on the left) and ``response_length`` (responses, on
    the right): pad tokens with attention 0 and 0 / False in the ``(B, R)`` tensors. Values are unchanged."""
    P, n = batch["prompt_length"], batch["input_ids"].shape[0]
    R = batch["input_ids"].shape[1] - P
    left, right = prompt_length - P, response_length - R
    if left == 0 and right == 0:
        return batch
    out = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask"):
            fill = pad_token_id if key == "input_ids" else 0
            out[key] = torch.cat([value.new_full((n, left), fill), value, value.new_full((n, right), fill)], dim=1)
        elif torch.is_tensor(value) and value.dim() == 2:  # (B, R) response tensors
            out[key] = torch.cat([value, value.new_zeros((n, right))], dim=1)
        else:
            out[key] = value
    out["prompt_length"] = prompt_length
    return out


def concat_rollouts(parts: list[dict], pad_token_id: int) -> dict:
    """Rollout batches of different prompt and response lengths as one batch (padded to the longest)."""
    P = max(p["prompt_length"] for p in parts)
    R = max(p["input_ids"].shape[1] - p["prompt_length"] for p in parts)
    parts = [pad_rollout(p, P, R, pad_token_id) for p in parts]
    return {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k]) else parts[0][k] for k in parts[0]}


def gather_rollout(batch: dict, pad_token_id: int) -> dict:
    """Every process's rollout batch, padded to the longest prompt and response of all, concatenated in rank
    order (one process: ``batch`` itself). Every process gets the whole global batch: advantages are whitened
    over it and the update's mini-batches mix the rows of all processes as on one process."""
    if distributed.context().world == 1:
        return batch
    P, R = (
        int(v)
        for v in distributed.all_reduce(
            [batch["prompt_length"], batch["input_ids"].shape[1] - batch["prompt_length"]], "max"
        ).tolist()
    )
    batch = pad_rollout(batch, P, R, pad_token_id)
    return {k: distributed.all_gather_rows(v) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def rollout(
    policy,
    ref,
    critic,
    reward_model,
    tokenizer,
    rows: list[dict],
    collate,
    cfg,
    head: LMHead,
    *,
    step: int,
    first: int = 0,
    autocast=contextlib.nullcontext,
) -> dict:
    """Sample one response per prompt of ``rows`` (this process's share of the iteration's prompts, which start
    at number ``first`` of the global batch) and score it without gradients.

    Prompts go to ``generate`` in chunks of ``cfg.generation_batch_size`` (``batch_size`` when 0), each sampled
    with its own seed (:func:`chunk_seed`, the global RNG is left alone); the tokens of each chunk are then scored
    in pieces of ``cfg.batch_size``: log-probs (through ``head``, at the sampling temperature), the reference's,
    the per-token KL, the critic's values, and the reward model's ``scores`` (minus ``missing_eos_penalty``
    without EOS). ``ref=None`` uses the adapter-disabled policy. Returns this process's rollout batch (module
    docstring), padded to its longest prompt and response.
    """
    size = cfg.generation_batch_size or cfg.batch_size
    device = next(policy.parameters()).device
    chunks = []
    for start in range(0, len(rows), size):
        prompts = to_device(collate(rows[start : start + size]), device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(chunk_seed(cfg.seed, step, first + start))
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
        for begin in range(0, batch["input_ids"].shape[0], cfg.batch_size):
            with autocast():
                piece = take(batch, slice(begin, begin + cfg.batch_size))
                parts.append(rollout_tensors(policy, ref, critic, piece, cfg, head))
                parts[-1]["scores"] = score(reward_model, piece, missing_eos_penalty=cfg.missing_eos_penalty)
        batch.update({key: torch.cat([p[key] for p in parts]) for key in parts[0]})
        chunks.append(batch)
    return concat_rollouts(chunks, tokenizer.pad_token_id)


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


def ppo_losses(policy, critic, batch: dict, cfg, head: LMHead, normalizer) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)`` of one micro-batch: the clipped policy loss (fused LM head) + ``vf_coef`` x the clipped
    value loss, each aggregated by ``cfg.agg`` with the denominator ``normalizer`` of the whole mini-batch
    (:func:`rlhf_kernels.aggregation_denominator` of its mask), so the micro-batches' losses add up to the
    mini-batch's. ``batch`` holds the rollout tensors and ``advantages, returns``; ``stats`` are detached, the
    micro-batch's means scaled by its share of the mini-batch (``*/max`` keys: maxima)."""
    P, mask = batch["prompt_length"], batch["response_mask"]
    policy_loss, stats = head.ppo_loss(
        policy,
        batch["input_ids"],
        batch["attention_mask"],
        batch["input_ids"][:, P:],  # (b, R) predicted by the hidden states of positions P-1 .. T-2
        batch["logprobs"],
        batch["advantages"],
        mask,
        start=P - 1,
        normalizer=normalizer,
        entropy_coef=cfg.entropy_coef,
        clip_low=cfg.clip_range,
        clip_high=cfg.clip_range,
        agg=cfg.agg,
    )
    value_loss, value_stats = rlhf_kernels.ppo_value_loss(
        response_values(critic, batch),
        batch["values"],
        batch["returns"],
        mask,
        clip=cfg.clip_range_value,
        agg=cfg.agg,
        normalizer=normalizer,
        backend=cfg.backend,
    )
    share = rlhf_kernels.aggregation_denominator(mask, cfg.agg) / normalizer
    out = {
        "loss/policy": policy_loss.detach(),
        "loss/value": value_loss.detach(),
        "policy/approxkl": stats["policy/approxkl"] * share,
        "policy/clipfrac": stats["policy/clipfrac"] * share,
        "policy/entropy": stats["policy/entropy"] * share,
        "val/clipfrac": value_stats["val/clipfrac"] * share,
        "policy/log_ratio/max": stats["policy/max_abs_log_ratio"],
    }
    return policy_loss + cfg.vf_coef * value_loss, out


def mini_batch_step(
    models: dict,
    optimizers: dict,
    mini: dict,
    cfg,
    head: LMHead,
    autocast=contextlib.nullcontext,
    *,
    ptx: PretrainMix | None = None,
    update: int = 0,
) -> dict:
    """One optimizer update of the policy and the critic (``models["policy"]``, ``models["critic"]``) on a
    mini-batch, accumulated over micro-batches of ``cfg.batch_size`` (:func:`rlhf.train.accumulate_and_step`).
    On many processes ``mini`` is the global mini-batch: each process runs its contiguous share, and the
    normaliser is the whole mini-batch's. Returns its stats (means over the mini-batch; ``policy/log_ratio/max`` a
    max)."""
    normalizer = rlhf_kernels.aggregation_denominator(mini["response_mask"], cfg.agg).clamp_min(1.0)
    mine = take(mini, distributed.rank_slice(mini["input_ids"].shape[0]))
    n = mine["input_ids"].shape[0]
    micros = [take(mine, slice(start, start + cfg.batch_size)) for start in range(0, n, cfg.batch_size)]
    micros, loss_fn = with_ptx(  # PPO-ptx: the LM-loss micro-batches of update ``update`` (none without ptx)
        micros,
        lambda micro, norm: ppo_losses(models["policy"], models["critic"], micro, cfg, head, norm),
        ptx,
        models["policy"],
        update,
        mini["input_ids"].device,
    )
    return accumulate_and_step(
        models,
        optimizers,
        micros,
        loss_fn,
        normalizer,
        max_grad_norm=cfg.max_grad_norm,
        autocast=autocast,
        norm_keys={"policy": "grad_norm", "critic": "val/grad_norm"},
    )


def ppo_update(
    models: dict,
    optimizers: dict,
    batch: dict,
    cfg,
    head: LMHead,
    *,
    seed: int,
    autocast=contextlib.nullcontext,
    ratio_tolerance: float = 1e-3,
    ptx: PretrainMix | None = None,
    first_update: int = 0,
) -> dict:
    """``cfg.ppo_epochs`` passes over the rollout batch in shuffled mini-batches of ``cfg.mini_batch_size``.

    ``models``, ``optimizers``: ``{"policy": ..., "critic": ...}``. The shuffles come from a generator seeded by
    ``seed`` (the global RNG is left alone). The ratio-1 check: the first mini-batch runs before any optimizer
    step of this update, so its recomputed log-probs must equal the rollout's; their largest deviation is returned as
    ``policy/ratio_dev_at_start`` and a warning is raised above ``ratio_tolerance``. The other stats are means over
    the mini-batches (``*_avg``, ``grad_norm``, ``val/grad_norm``, and with ``ptx`` the mean NLL ``ptx/loss``).
    ``ptx``: PPO-ptx (:mod:`rlhf.ptx`); the updates are counted from ``first_update`` for its data order.
    """
    n = batch["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.mini_batch_size):
            mini = take(batch, order[start : start + cfg.mini_batch_size])
            update = first_update + len(parts)
            parts.append(mini_batch_step(models, optimizers, mini, cfg, head, autocast, ptx=ptx, update=update))
    deviation = parts[0]["policy/log_ratio/max"]
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
    if ptx is not None:
        names["ptx/loss"] = "ptx/loss"
    stats = {new: sum(p[old] for p in parts) / len(parts) for old, new in names.items()}
    stats["policy/ratio_dev_at_start"] = deviation
    return stats
