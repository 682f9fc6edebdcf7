"""GRPO and its successors (Dr. GRPO, DAPO, GSPO, CISPO, RLOO, REINFORCE++): group sampling with rewards from
functions, critic-free advantages, and clipped updates through the fused policy-loss head.

``rlhf grpo --config FILE key=value ...`` or :func:`train`. One iteration (one "step" of the training core) is:

1. sample: ``prompts_per_step`` prompts x ``num_generations`` (G) completions each, all G samples of a prompt in
   one ``generate`` call (chunks of ``generation_batch_size`` prompts, each with its own seed, a function of the run's
   seed, the step and the chunk's place), recording the sampler's own log-probs of the sampled tokens;
2. score: the weighted reward functions (:mod:`rlhf.rewards`) plus DAPO's soft overlong penalty; with dynamic
   sampling, groups whose rewards are all equal are dropped and more prompts sampled, up to
   ``max_resample_rounds`` extra rounds;
3. log-probs without gradients: the policy's ("old", through the fused head at the sampling temperature) and, when
   ``beta > 0``, the reference's; the sampler-trainer importance weights (``rollout_correction``);
4. advantages per sequence (:func:`rlhf.grpo_core.advantages`) on the gathered global batch;
5. update: ``num_iterations`` passes in shuffled mini-batches of ``mini_batch_size`` samples (None: the whole batch),
   each one optimizer step through :func:`rlhf_kernels.fused_linear_ppo_loss` with the configured policy loss,
   ratio level, clip range, KL (``beta``, ``kl_estimator``) and importance weights.

``recipe`` fills every option left at None with a published combination (:data:`rlhf.grpo_core.RECIPES`). The loop,
data order, checkpoints and exact resume are the training core's (:func:`rlhf.train.run`); every random choice of
an iteration is a function of ``(seed, step)``, so a resumed run ends as an uninterrupted one. On many processes
each samples and scores whole groups of its share of the prompts; the batch is then gathered, so advantages and
mini-batches are those of one process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random

import torch

import rlhf_kernels

from . import batch_invariant, distributed
from .collators import PromptCollator
from .data import tokenize_prompt
from .errors import UserError
from .generation import generate, response_logprobs
from .grpo_core import (
    GRPOConfig,
    advantages,
    overlong_penalty,
    resolve_recipe,
    reuses_sampler_logprobs,
    rollout_correction,
    zero_variance_groups,
)
from .models import LMHead, apply_lora, load_causal_lm, load_reward_model, load_tokenizer
from .ppo import frozen
from .ppo_core import chunk_seed, concat_rollouts, disable_dropout, gather_rollout, pad_rollout, reference, take
from .ptx import PretrainMix, build_ptx, with_ptx
from .rewards import build_reward_functions, compute_rewards
from .sft import build_policy, save_policy
from .sources import load_rows, split_holdout
from .train import Stage, StepContext, accumulate_and_step, build_device, run, start_stage, to_device

PROMPT_FIELDS = ("prompt", "messages")
NO_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------------- data


def load_prompts(cfg: GRPOConfig, tokenizer, log=print) -> tuple[list[dict], list[dict] | None]:
    """Train and held-out prompt rows ``{"input_ids", "prompt", "columns"}``: the token ids, the prompt as the
    dataset holds it (for the reward functions) and its other columns. Prompts longer than ``max_prompt_length``
    tokens are an error with ``overlong=error`` and dropped otherwise."""
    ds = load_rows(cfg.dataset, cfg.split, config_name=cfg.dataset_config)
    if cfg.eval_dataset is not None or cfg.eval_split is not None:
        held = load_rows(cfg.eval_dataset or cfg.dataset, cfg.eval_split or cfg.split, config_name=cfg.dataset_config)
    elif cfg.eval_fraction > 0:
        ds, held = split_holdout(ds, cfg.eval_fraction, cfg.seed)
    else:
        held = None

    def rows_of(examples, split):
        out = []
        for i, ex in enumerate(examples):
            ids = tokenize_prompt(ex, tokenizer, NO_LIMIT, index=i)["input_ids"]
            if len(ids) > cfg.max_prompt_length:
                if cfg.overlong == "error":
                    raise UserError(f"{split} prompt {i} has {len(ids)} tokens > max_prompt_length (overlong=error)")
                continue
            field = next(f for f in PROMPT_FIELDS if f in ex)
            out.append({"input_ids": ids, "prompt": ex[field], "columns": {k: v for k, v in ex.items() if k != field}})
        if len(out) < len(examples):
            log(f"dropped {len(examples) - len(out)} of {len(examples)} {split} prompts over max_prompt_length")
        if len(examples) and not out:
            raise UserError(f"every {split} prompt is longer than max_prompt_length={cfg.max_prompt_length}")
        return out

    return rows_of(ds, "train"), None if held is None else rows_of(held, "eval")


def _prompt_text(prompt) -> str:
    """A dataset prompt (a string or a message list) as text for the reward functions."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


# ---------------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_groups(policy, tokenizer, rows: list[dict], cfg: GRPOConfig, *, step: int, first: int, round_: int = 0):
    """G completions of each prompt of ``rows`` (sample ``g`` of prompt ``i`` is row ``i * G + g``), generated in
    chunks of ``generation_batch_size`` prompts; a chunk's seed is a function of the run's seed, the step, the
    global index of its first prompt (``rows`` start at ``first``) and the resampling round, so with a fixed
    ``generation_batch_size`` the samples do not depend on the number of processes. The response dimension is
    padded to ``max_completion_length`` (the constant of the ``seq-mean-token-sum-norm`` aggregation)."""
    G, device = cfg.num_generations, next(policy.parameters()).device
    collate, size = PromptCollator(tokenizer.pad_token_id), cfg.generation_batch_size or max(len(rows), 1)
    parts = []
    for start in range(0, len(rows), size):
        prompts = to_device(collate([r for r in rows[start : start + size] for _ in range(G)]), device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(chunk_seed(cfg.seed, step, first + start) * 1009 + round_)
            batch = generate(
                policy, tokenizer, prompts, record_logprobs=True, max_new_tokens=cfg.max_completion_length,
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, do_sample=True,
            )  # fmt: skip
        parts.append(batch)
    batch = concat_rollouts(parts, tokenizer.pad_token_id)
    return pad_rollout(batch, batch["prompt_length"], cfg.max_completion_length, tokenizer.pad_token_id)


def score_groups(batch: dict, rows: list[dict], cfg: GRPOConfig, functions, tokenizer) -> dict:
    """Adds ``rewards (B,)`` (weighted functions + overlong penalty) and ``reward/<name> (B,)`` (NaN where a
    function does not apply) to ``batch``; ``rows`` are its prompts (each repeated G times)."""
    G, P = cfg.num_generations, batch["prompt_length"]
    completions = tokenizer.batch_decode(batch["input_ids"][:, P:].masked_fill(~batch["response_mask"], 0),
                                         skip_special_tokens=True)  # fmt: skip
    prompts = [_prompt_text(r["prompt"]) for r in rows for _ in range(G)]
    names = dict.fromkeys(k for r in rows for k in r["columns"])
    columns = {k: [r["columns"].get(k) for r in rows for _ in range(G)] for k in names}
    total, per = compute_rewards(functions, prompts, completions, columns, batch)
    if cfg.overlong_buffer > 0:
        lengths = batch["response_mask"].sum(-1).cpu()
        total = total + overlong_penalty(lengths, cfg.max_completion_length, cfg.overlong_buffer, cfg.overlong_penalty)
    device = batch["input_ids"].device
    batch["rewards"] = total.to(device)
    batch.update({f"reward/{name}": values.to(device) for name, values in per.items()})
    return batch


def sample_step(policy, tokenizer, rows: list[dict], cfg: GRPOConfig, functions, pool: list[dict], *, step: int,
                first: int) -> tuple[dict, dict]:  # fmt: skip
    """This process's scored groups for one step: its prompt ``rows`` (number ``first`` on of the global batch).

    With dynamic sampling, groups whose rewards are all equal are dropped and prompts drawn from ``pool`` (by a
    generator seeded from the run's seed, the step and ``first``) are sampled in their place, for up to
    ``max_resample_rounds`` more rounds; if groups are still missing then, the last dropped ones fill the batch
    (their advantages are 0: they add no policy gradient), so every step has ``prompts_per_step`` groups.
    Returns ``(batch, stats)``."""
    G, target = cfg.num_generations, len(rows)
    rng = random.Random(f"grpo-dynamic-{cfg.seed}-{step}-{first}")
    kept, flat_groups, stats = [], [], {}
    for round_ in range(cfg.max_resample_rounds + 1 if cfg.dynamic_sampling else 1):
        if round_ > 0:
            rows = [pool[rng.randrange(len(pool))] for _ in range(target - len(kept))]
        batch = sample_groups(policy, tokenizer, rows, cfg, step=step, first=first, round_=round_)
        batch = score_groups(batch, rows, cfg, functions, tokenizer)
        flat = zero_variance_groups(batch["rewards"].cpu(), torch.arange(len(rows)).repeat_interleave(G))
        if round_ == 0:
            stats["frac_reward_zero_std"] = flat.float().mean().item() if len(rows) else 0.0
            if not cfg.dynamic_sampling:
                return batch, stats
        for i in range(len(rows)):
            group = take(batch, slice(i * G, (i + 1) * G))
            (flat_groups if flat[i * G] else kept).append(group)
        kept = kept[:target]
        if len(kept) == target:
            break
    stats["dynamic_sampling/dropped_groups"] = len(flat_groups)
    stats["dynamic_sampling/filled_with_flat"] = max(target - len(kept), 0)
    kept += flat_groups[len(flat_groups) - (target - len(kept)) :] if len(kept) < target else []
    return concat_rollouts(kept, tokenizer.pad_token_id), stats


# ---------------------------------------------------------------------------------------------------- log-probs


@torch.no_grad()
def add_logprobs(policy, ref, batch: dict, cfg: GRPOConfig, head: LMHead, autocast=contextlib.nullcontext) -> dict:
    """Adds ``logprobs`` (the "old" log-probs of the ratio), ``entropy`` and, with a reference, ``ref_logprobs``:
    ``(B, R)`` fp32, 0 off ``response_mask``, computed in pieces of ``batch_size`` rows. When the update reuses the
    sampler's log-probs (:func:`reuses_sampler_logprobs`) the policy is not run: ``logprobs`` are the sampler's,
    and the entropy is measured by the update instead."""
    reuse = reuses_sampler_logprobs(cfg)
    if reuse:
        batch["logprobs"] = batch["sampler_logprobs"].clone()
        if ref is False:
            return batch
    parts = []
    for begin in range(0, batch["input_ids"].shape[0], cfg.batch_size):
        piece = take(batch, slice(begin, begin + cfg.batch_size))
        with autocast():
            out = {}
            if not reuse:
                lp, ent = response_logprobs(head, policy, piece, return_entropy=True)
                out = {"logprobs": lp, "entropy": ent.masked_fill(~piece["response_mask"], 0.0)}
            if ref is not False:
                model, context = reference(policy, ref)
                with context:
                    out["ref_logprobs"] = response_logprobs(head, model, piece)
        parts.append(out)
    batch.update({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return batch


# ---------------------------------------------------------------------------------------------------- update


def loss_mask(batch: dict, cfg: GRPOConfig) -> torch.Tensor:
    """The tokens of the loss: the responses, without the truncated ones under ``mask_truncated``."""
    mask = batch["response_mask"]
    return mask & batch["ended"][:, None] if cfg.mask_truncated else mask


def grpo_losses(policy, batch: dict, cfg: GRPOConfig, head: LMHead, normalizer) -> tuple[torch.Tensor, dict]:
    """``(loss, stats)`` of one micro-batch through the fused head, aggregated with the mini-batch's ``normalizer``;
    stats are the micro-batch's means scaled by its share of the mini-batch."""
    P, mask = batch["prompt_length"], loss_mask(batch, cfg)
    options = dict(
        entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_type=cfg.policy_loss,
        ratio_level=cfg.ratio_level, sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg, agg=cfg.agg,
        is_weights=batch.get("is_weights"),
    )  # fmt: skip
    if cfg.beta > 0:
        options.update(ref_logprobs=batch["ref_logprobs"], kl_coef=cfg.beta, kl_estimator=cfg.kl_estimator)
    loss, stats = head.ppo_loss(
        policy, batch["input_ids"], batch["attention_mask"], batch["input_ids"][:, P:], batch["logprobs"],
        batch["advantages"], mask, start=P - 1, normalizer=normalizer, **options,
    )  # fmt: skip
    share = rlhf_kernels.aggregation_denominator(mask, cfg.agg) / normalizer
    out = {"loss": loss.detach(), "policy/log_ratio/max": stats["policy/max_abs_log_ratio"],
           "update/entropy_sum": stats["policy/entropy"] * mask.sum()}  # fmt: skip
    names = {"policy/clipfrac_low": "clip_ratio/low_mean", "policy/clipfrac_high": "clip_ratio/high_mean",
             "policy/clipfrac": "clip_ratio/region_mean", "policy/kl": "kl"}  # fmt: skip
    out.update({new: stats[old] * share for old, new in names.items() if old in stats})
    return loss, out


def grpo_update(models: dict, optimizers: dict, batch: dict, cfg: GRPOConfig, head: LMHead, *, seed: int,
                autocast=contextlib.nullcontext, ptx: PretrainMix | None = None,
                first_update: int = 0) -> dict:  # fmt: skip
    """``num_iterations`` passes over the batch in shuffled mini-batches (one optimizer step each); returns the
    means over the mini-batches (``policy/log_ratio/max``: the first one's, 0 when the old log-probs are
    reproduced exactly). ``ptx``: PPO-ptx (:mod:`rlhf.ptx`), updates counted from ``first_update``."""
    n = batch["input_ids"].shape[0]
    size = cfg.mini_batch_size or n
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(cfg.num_iterations):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            mini = take(batch, order[start : start + size])
            normalizer = rlhf_kernels.aggregation_denominator(loss_mask(mini, cfg), cfg.agg).clamp_min(1.0)
            if not parts:
                first_tokens = int(loss_mask(mini, cfg).sum())
            mine = take(mini, distributed.rank_slice(mini["input_ids"].shape[0]))
            micros = [take(mine, slice(b, b + cfg.batch_size)) for b in range(0, mine["input_ids"].shape[0],
                                                                              cfg.batch_size)]  # fmt: skip
            micros, loss_fn = with_ptx(
                micros, lambda m, norm: grpo_losses(models["policy"], m, cfg, head, norm), ptx, models["policy"],
                first_update + len(parts), mini["input_ids"].device,
            )  # fmt: skip
            parts.append(
                accumulate_and_step(models, optimizers, micros, loss_fn, normalizer, max_grad_norm=cfg.max_grad_norm,
                                    autocast=autocast)
            )  # fmt: skip
    stats = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if k != "policy/log_ratio/max"}
    stats["policy/log_ratio_at_start"] = parts[0]["policy/log_ratio/max"]
    # the mean entropy over the first mini-batch's loss tokens, under the policy before any step of this update
    stats["update/entropy"] = float(parts[0]["update/entropy_sum"]) / max(first_tokens, 1)
    del stats["update/entropy_sum"]
    return stats


# ---------------------------------------------------------------------------------------------------- one step


def batch_stats(batch: dict, functions, G: int) -> dict:
    """TRL-named metrics of a scored batch of groups of ``G`` samples (python floats)."""
    rewards, mask = batch["rewards"], batch["response_mask"]
    stats = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.view(-1, G).std(-1).mean().item() if G > 1 else 0.0,
        "completions/mean_length": mask.sum(-1).float().mean().item(),
        "completions/clipped_ratio": (~batch["ended"]).float().mean().item(),
        "entropy": (batch["entropy"].sum() / mask.sum().clamp_min(1)).item() if "entropy" in batch else None,
        "num_tokens": int(batch["attention_mask"].sum()),
    }
    for rf in functions:
        values = batch[f"reward/{rf.name}"]
        stats[f"rewards/{rf.name}/mean"] = values.nanmean().item() if (~values.isnan()).any() else 0.0
    return stats


def iteration(ctx: StepContext, models: dict, cfg: GRPOConfig, tokenizer, head: LMHead, functions, pool,
              ptx: PretrainMix | None = None) -> dict:  # fmt: skip
    """One GRPO iteration on this process's prompts ``ctx.rows``; returns the same metrics on every process."""
    policy, ref = models["policy"], models["ref"]
    first = distributed.context().rank * len(ctx.rows)
    local, mine = sample_step(policy, tokenizer, ctx.rows, cfg, functions, pool, step=ctx.step, first=first)
    world = distributed.context().world  # the process's fraction of the groups: means of means over processes
    stats = distributed.reduce_stats({k: v / world if k == "frac_reward_zero_std" else v for k, v in mine.items()})
    local["group"] = (first + torch.arange(local["input_ids"].shape[0] // cfg.num_generations)).repeat_interleave(
        cfg.num_generations
    ).to(local["input_ids"].device)  # fmt: skip
    local = add_logprobs(policy, ref, local, cfg, head, ctx.autocast)
    batch = gather_rollout(local, tokenizer.pad_token_id)
    weights, correction = rollout_correction(
        batch["logprobs"], batch["sampler_logprobs"], batch["response_mask"], cfg.rollout_correction,
        cfg.rollout_correction_cap,
    )  # fmt: skip
    if weights is not None:
        batch["is_weights"] = weights
    batch["advantages"] = advantages(batch["rewards"].float(), batch["group"], cfg.advantage, cfg.scale_rewards)
    stats.update(correction)
    stats.update(batch_stats(batch, functions, cfg.num_generations))
    n = batch["input_ids"].shape[0]
    updates = cfg.num_iterations * -(-n // (cfg.mini_batch_size or n))  # optimizer steps per iteration
    stats.update(grpo_update(ctx.models, ctx.optimizers, batch, cfg, head, seed=cfg.seed * 1_000_003 + ctx.step,
                             autocast=ctx.autocast, ptx=ptx, first_update=ctx.step * updates))  # fmt: skip
    measured = stats.pop("update/entropy", None)
    if stats["entropy"] is None:  # no old-log-prob pass: the update measured it (same policy, same tokens)
        stats["entropy"] = measured
    return {k: v for k, v in stats.items() if v is not None}


# ---------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy, tokenizer, rows: list[dict], cfg: GRPOConfig, functions, autocast=contextlib.nullcontext):
    """Greedy completions of the held-out prompts: the mean reward and each function's mean (each process its
    share of the prompts)."""
    device = next(policy.parameters()).device
    collate = PromptCollator(tokenizer.pad_token_id)
    sums = torch.zeros(2 + len(functions), dtype=torch.float64)  # total reward, count, per-function sums
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for part, real in distributed.shard_for_eval(rows, cfg.eval_batch_size):
            batch = generate(policy, tokenizer, to_device(collate(part), device),
                             max_new_tokens=cfg.max_completion_length, do_sample=False)  # fmt: skip
            P = batch["prompt_length"]
            texts = tokenizer.batch_decode(batch["input_ids"][:, P:].masked_fill(~batch["response_mask"], 0),
                                           skip_special_tokens=True)  # fmt: skip
            names = dict.fromkeys(k for r in part for k in r["columns"])
            columns = {k: [r["columns"].get(k) for r in part] for k in names}
            with autocast():
                total, per = compute_rewards(functions, [_prompt_text(r["prompt"]) for r in part], texts, columns,
                                             batch)  # fmt: skip
            if real:
                sums[0] += total.sum().double()
                sums[1] += len(part)
                for k, rf in enumerate(functions):
                    sums[2 + k] += per[rf.name].nan_to_num(0.0).sum().double()
    sums = distributed.all_reduce(sums)
    n = max(sums[1].item(), 1.0)
    out = {"reward": sums[0].item() / n}
    out.update({f"rewards/{rf.name}/mean": sums[2 + k].item() / n for k, rf in enumerate(functions)})
    return out


# ---------------------------------------------------------------------------------------------------- the stage


def build_models(cfg: GRPOConfig, tokenizer, device) -> tuple:
    """``(policy, ref)``: ``ref`` is False when ``beta == 0`` (no reference at all), None when the LoRA policy's
    disabled adapter is the reference, else a frozen model (``ref_model`` or a copy of the initial policy)."""
    policy = build_policy(dataclasses.replace(cfg, lora_r=0), tokenizer, device)
    ref = False
    if cfg.beta > 0:
        if cfg.ref_model is not None:
            ref = frozen(load_causal_lm(cfg.ref_model, tokenizer, dtype=cfg.dtype, device=device,
                                        trust_remote_code=cfg.trust_remote_code, seed=cfg.seed))  # fmt: skip
        else:
            ref = None if cfg.lora_r > 0 else frozen(copy.deepcopy(policy))
    if cfg.lora_r > 0:
        policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_target_modules)  # fmt: skip
    if cfg.batch_invariant:
        for model in (policy, ref):
            if model not in (None, False):
                batch_invariant.enable(model)
    disable_dropout(policy)
    policy.train()
    return policy, ref


def check_processes(cfg: GRPOConfig, world: int) -> None:
    """Prompts split over the processes in whole groups; mini-batches split evenly."""
    if cfg.prompts_per_step % world:
        raise UserError(f"prompts_per_step={cfg.prompts_per_step} does not split evenly over {world} processes")
    if cfg.mini_batch_size is not None and cfg.mini_batch_size % world:
        raise UserError(f"mini_batch_size={cfg.mini_batch_size} does not split evenly over {world} processes")


def train(cfg: GRPOConfig, resume: bool = False) -> dict:
    """Run GRPO as configured; returns the last logged train metrics and the final evaluation (``eval/...``)."""
    cfg = resolve_recipe(cfg)
    device = start_stage(cfg)
    check_processes(cfg, distributed.context().world)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_prompts(cfg, tokenizer)
    run_device = build_device(device)
    policy, ref = build_models(cfg, tokenizer, run_device)
    policy = distributed.shard(policy)
    ref = ref if ref in (None, False) else distributed.place_frozen(ref)

    def load_rm(path):
        model = load_reward_model(path, tokenizer, dtype=cfg.dtype, device=run_device,
                                  trust_remote_code=cfg.trust_remote_code)  # fmt: skip
        return distributed.place_frozen(frozen(model))

    functions = build_reward_functions(cfg.reward_funcs, cfg.reward_weights, load_rm)
    models = {"policy": policy, "ref": ref}
    head = LMHead.from_config(cfg, temperature=cfg.temperature)
    ptx = build_ptx(cfg, tokenizer)

    def step(ctx: StepContext) -> dict:
        stats = iteration(ctx, models, cfg, tokenizer, head, functions, train_rows, ptx)
        stats["num_episodes"] = cfg.prompts_per_step * cfg.num_generations
        return stats

    def evaluate_fn() -> dict:
        from .train import autocast_context

        return evaluate(policy, tokenizer, eval_rows, cfg, functions, autocast_context(cfg, run_device))

    stage = Stage(
        models={"policy": policy},
        rows=train_rows,
        rows_per_step=cfg.prompts_per_step,
        step=step,
        save_final=lambda path, trained: save_policy(trained["policy"], tokenizer, path),
        evaluate=evaluate_fn if eval_rows else None,
        plain_models=lambda: {
            "policy": build_models(dataclasses.replace(cfg, beta=0.0), tokenizer, torch.device("cpu"))[0]
        },
        show=("reward", "kl") if cfg.beta > 0 else ("reward", "completions/mean_length"),
        rows_name="prompts_per_step",
    )
    return run(cfg, stage, resume=resume)
