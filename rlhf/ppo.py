"""PPO with a learned reward model: sample, score, KL-penalised GAE advantages, clipped updates (InstructGPT recipe).

``rlhf ppo --config FILE key=value ...`` or :func:`train`. One iteration (one "step" for ``max_steps``,
``logging_steps``, ``save_steps``, ``eval_steps``) is:

1. rollout: ``rollout_batch_size`` prompts (the data order of :func:`rlhf.train.epoch_order`) -> one sampled response
   each, generated in chunks of ``generation_batch_size`` prompts, each chunk sampled with its own seed (a function
   of the run's seed, the iteration and the chunk's place in the global batch) -> no-grad log-probs of the policy
   ("old" log-probs) and of the reference, the per-token KL, the critic's values
   (:func:`rlhf.ppo_core.rollout`);
2. score: the reward model at the last real token, minus ``missing_eos_penalty`` for responses without EOS;
3. advantages: per-token rewards ``score - kl_coef * kl`` and GAE (:func:`rlhf.ppo_core.compute_advantages`);
4. update: ``ppo_epochs`` x shuffled mini-batches, each one optimizer step of the policy and one of the critic
   (:func:`rlhf.ppo_core.ppo_update`), then the learning-rate schedules and the KL controller advance.

On many processes (torchrun) each process generates and scores its contiguous share of the prompts; the rollout
batch is then gathered on every process (:func:`rlhf.ppo_core.gather_rollout`), so advantages are whitened over
the global batch and each mini-batch is the one a single process would use, every process running its share of
it. With the same ``generation_batch_size`` the samples, and so the run, do not depend on the number of
processes.

Models: the policy (LoRA-wrapped when ``lora_r > 0``); the reference (``ref_model``, else a frozen copy of the
initial policy, else with LoRA the adapter-disabled policy); the frozen reward model; the critic, a trainable
:class:`rlhf.models.RewardModel` started from ``value_model`` or the reward model (LoRA on its backbone too when
``lora_r > 0``). Dropout is switched off in the trained models, so each update starts at ratio 1.

The loop, data order, checkpoints and exact resume are the training core's (:func:`rlhf.train.run`); this module
supplies the models, the KL controller (saved in checkpoints) and the step function of one iteration. A checkpoint
holds the policy and the critic, both optimizers and schedules, the KL coefficient and the RNG states; the prompts
of iteration ``s``, its samples and the mini-batch shuffles are functions of ``(seed, s)``. A resumed run ends
bitwise equal to an uninterrupted one on CPU with the same thread count.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
from torch import nn

from . import distributed
from .collators import PromptCollator
from .config import PPOConfig
from .errors import UserError
from .generation import generate
from .models import (
    LMHead,
    apply_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)
from .ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    disable_dropout,
    gather_rollout,
    ppo_update,
    rollout,
    rollout_stats,
    score,
)
from .ptx import build_ptx
from .sft import build_policy, save_policy
from .train import (
    Stage,
    StepContext,
    autocast_context,
    build_device,
    load_splits,
    run,
    shard_eval_batches,
    start_stage,
)

NO_LIMIT = 2**31  # prompts are length-checked by max_prompt_length here, not by prepare's max_length


def load_prompts(cfg: PPOConfig, tokenizer, log=print) -> tuple[list[dict], list[dict] | None]:
    """Tokenised train and held-out prompts. Prompts longer than ``max_prompt_length`` tokens are an error with
    ``overlong=error`` and dropped otherwise (a prompt is never cut)."""
    train_rows, eval_rows = load_splits(dataclasses.replace(cfg, max_length=NO_LIMIT), tokenizer, "prompt")

    def fit(rows, split):
        kept = [row for row in rows if len(row["input_ids"]) <= cfg.max_prompt_length]
        if len(kept) < len(rows):
            message = f"{len(rows) - len(kept)} of {len(rows)} {split} prompts are longer than max_prompt_length"
            if cfg.overlong == "error":
                raise UserError(f"{message}={cfg.max_prompt_length} (overlong=error)")
            log(f"dropped {message}={cfg.max_prompt_length}")
        if rows and not kept:
            raise UserError(f"every {split} prompt is longer than max_prompt_length={cfg.max_prompt_length}")
        return kept

    return fit(train_rows, "train"), None if not eval_rows else fit(eval_rows, "eval")


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no trainable parameter."""
    return model.requires_grad_(False).eval()


def build_models(cfg: PPOConfig, tokenizer, device) -> tuple[nn.Module, nn.Module | None, nn.Module, nn.Module]:
    """``(policy, ref, reward_model, critic)``; ``ref`` is None when the adapter-disabled policy is the reference."""
    load = dict(dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules)
    policy = build_policy(dataclasses.replace(cfg, lora_r=0), tokenizer, device)
    if cfg.ref_model is not None:
        ref = frozen(load_causal_lm(cfg.ref_model, tokenizer, **load))
    else:
        ref = None if cfg.lora_r > 0 else frozen(copy.deepcopy(policy))
    if cfg.lora_r > 0:
        policy = apply_lora(policy, **lora)
    reward_model = frozen(load_reward_model(cfg.reward_model, tokenizer, **load))
    if cfg.value_model is None:
        critic = copy.deepcopy(reward_model).requires_grad_(True)
    else:
        critic = load_reward_model(cfg.value_model, tokenizer, **load)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(critic.backbone)
    if cfg.lora_r > 0:
        critic.backbone = apply_lora(critic.backbone, **lora, task_type="FEATURE_EXTRACTION")
    for model in (policy, critic):
        disable_dropout(model)
        model.train()
    return policy, ref, reward_model, critic


def ratio_tolerance(cfg: PPOConfig, autocast) -> float:
    """The ratio-1 check's warning threshold: 1e-3 in full fp32; 5e-2 with bf16/fp16 weights or autocast, where the
    rollout's and the update's forwards (different batch shapes) round differently."""
    return 1e-3 if cfg.dtype == "float32" and autocast is contextlib.nullcontext else 5e-2


def kl_controller(cfg: PPOConfig) -> FixedKLController:
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


@torch.no_grad()
def evaluate(policy, reward_model, tokenizer, rows, cfg: PPOConfig, autocast=contextlib.nullcontext) -> dict:
    """Greedy responses to the held-out prompts: mean score (with the EOS penalty), response length, EOS rate
    (each process answers its share of the prompts).

    Greedy decoding draws no random numbers, and the RNG is forked anyway: evaluation never changes training.
    """
    device = next(policy.parameters()).device
    collate = PromptCollator(tokenizer.pad_token_id)
    sums = torch.zeros(3, dtype=torch.float64)  # scores, response lengths, EOS count
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for prompts, real in shard_eval_batches(rows, collate, cfg.eval_batch_size, device):
            batch = generate(policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, do_sample=False)
            with autocast():
                scores = score(reward_model, batch, missing_eos_penalty=cfg.missing_eos_penalty)
            if real:
                sums += torch.stack([scores.sum(), batch["response_mask"].sum(), batch["ended"].sum()]).double().cpu()
    total = distributed.all_reduce(sums) / len(rows)
    return {"scores": total[0].item(), "response_length": total[1].item(), "eos_rate": total[2].item()}


def iteration(
    step, rows, models: dict, kl_ctl, tokenizer, cfg: PPOConfig, ctx: StepContext, head: LMHead, collate, ptx=None
) -> dict:
    """One PPO iteration on this process's prompt ``rows``: rollout and scoring (each process its share), then on
    the gathered global batch advantages and the update (each process its share of every mini-batch). Returns its
    metrics, the same on every process.

    ``models``: ``policy, ref, reward, critic``; the trained two (``ctx.models``) are updated with
    ``ctx.optimizers``.
    """
    policy, critic = models["policy"], models["critic"]
    first = distributed.context().rank * len(rows)  # this process's first prompt in the global batch
    local = rollout(
        policy,
        models["ref"],
        critic,
        models["reward"],
        tokenizer,
        rows,
        collate,
        cfg,
        head,
        step=step,
        first=first,
        autocast=ctx.autocast,
    )
    batch = gather_rollout(local, tokenizer.pad_token_id)
    kl_coef = kl_ctl.value
    batch["rewards"], batch["advantages"], batch["returns"] = compute_advantages(
        batch["scores"],
        batch["kl"],
        batch["values"],
        batch["response_mask"],
        kl_coef=kl_coef,
        gamma=cfg.gamma,
        lam=cfg.lam,
        whiten=cfg.whiten_advantages,
        backend=cfg.backend,
    )
    stats = rollout_stats(batch, kl_coef)
    stats.update(
        ppo_update(
            ctx.models,
            ctx.optimizers,
            batch,
            cfg,
            head,
            seed=cfg.seed * 1_000_003 + step,
            autocast=ctx.autocast,
            ratio_tolerance=ratio_tolerance(cfg, ctx.autocast),
            ptx=ptx,
            first_update=step * cfg.ppo_epochs * -(-cfg.rollout_batch_size // cfg.mini_batch_size),
        )
    )
    kl_ctl.update(stats["objective/kl"], batch["input_ids"].shape[0])
    return stats


def check_processes(cfg: PPOConfig, world: int) -> None:
    """The global rollout and mini-batches must split evenly over the processes (then a shorter last mini-batch
    does too)."""
    for name in ("rollout_batch_size", "mini_batch_size"):
        if getattr(cfg, name) % world:
            raise UserError(f"{name}={getattr(cfg, name)} does not split evenly over {world} processes")


def train(cfg: PPOConfig, resume: bool = False) -> dict:
    """Run PPO as configured; returns the last logged train metrics and the final evaluation (``eval/...``)."""
    device = start_stage(cfg)
    check_processes(cfg, distributed.context().world)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_prompts(cfg, tokenizer)
    policy, ref, reward_model, critic = build_models(cfg, tokenizer, build_device(device))
    policy, critic = distributed.shard(policy), distributed.shard(critic)
    reward_model = distributed.place_frozen(reward_model)
    ref = None if ref is None else distributed.place_frozen(ref)
    models = {"policy": policy, "ref": ref, "reward": reward_model, "critic": critic}
    collate = PromptCollator(tokenizer.pad_token_id)
    head = LMHead.from_config(cfg, temperature=cfg.temperature)
    kl_ctl = kl_controller(cfg)
    ptx = build_ptx(cfg, tokenizer)

    def step(ctx: StepContext) -> dict:
        stats = iteration(ctx.step, ctx.rows, models, kl_ctl, tokenizer, cfg, ctx, head, collate, ptx)
        stats["num_episodes"] = cfg.rollout_batch_size
        return stats

    def evaluate_fn() -> dict:
        return evaluate(policy, reward_model, tokenizer, eval_rows, cfg, autocast_context(cfg, device))

    def save_final(path, trained) -> None:
        save_policy(trained["policy"], tokenizer, path)
        trained["critic"].save_pretrained(path / "value_model")

    def plain_models() -> dict:
        plain_policy, _, _, plain_critic = build_models(cfg, tokenizer, torch.device("cpu"))
        return {"policy": plain_policy, "critic": plain_critic}

    stage = Stage(
        models={"policy": policy, "critic": critic},
        rows=train_rows,
        rows_per_step=cfg.rollout_batch_size,
        step=step,
        save_final=save_final,
        evaluate=evaluate_fn if eval_rows else None,
        state={"kl_controller": kl_ctl},
        plain_models=plain_models,
        show=("objective/scores", "objective/kl"),
        rows_name="rollout_batch_size",
    )
    return run(cfg, stage, resume=resume)
