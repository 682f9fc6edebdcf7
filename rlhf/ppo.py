"""PPO with a learned reward model: sample, score, KL-penalised GAE advantages, clipped updates (InstructGPT recipe).

``rlhf ppo --config FILE key=value ...`` or :func:`train`. One iteration (one "step" for ``max_steps``,
``logging_steps``, ``save_steps``, ``eval_steps``) is:

1. rollout: ``rollout_batch_size`` prompts (the data order of :func:`rlhf.train.epoch_order`) -> one sampled response
   each -> no-grad log-probs of the policy ("old" log-probs) and of the reference, the per-token KL, the critic's
   values (:func:`rlhf.ppo_core.rollout`);
2. score: the reward model at the last real token, minus ``missing_eos_penalty`` for responses without EOS;
3. advantages: per-token rewards ``score - kl_coef * kl`` and GAE (:func:`rlhf.ppo_core.compute_advantages`);
4. update: ``ppo_epochs`` x shuffled mini-batches, each one optimizer step of the policy and one of the critic
   (:func:`rlhf.ppo_core.ppo_update`), then the learning-rate schedules and the KL controller advance.

Models: the policy (LoRA-wrapped when ``lora_r > 0``); the reference (``ref_model``, else a frozen copy of the
initial policy, else with LoRA the adapter-disabled policy); the frozen reward model; the critic, a trainable
:class:`rlhf.models.RewardModel` started from ``value_model`` or the reward model (LoRA on its backbone too when
``lora_r > 0``). Dropout is switched off in the trained models, so each update starts at ratio 1.

Exact resume: a checkpoint holds the policy and the critic (one ``nn.ModuleDict``), both optimizers and schedules,
the KL coefficient and the RNG states (sampling draws from the global torch RNG); the prompts of iteration ``s``
and the mini-batch shuffles are functions of ``(seed, s)``. A resumed run ends bitwise equal to an uninterrupted
one on CPU with the same thread count.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .collators import PromptCollator
from .config import PPOConfig, save_config
from .generation import generate
from .metrics import MetricsLogger, plot_metrics
from .models import (
    apply_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_device,
)
from .ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    disable_dropout,
    ppo_update,
    rollout,
    rollout_stats,
    score,
)
from .sft import build_policy, save_policy
from .train import (
    autocast_context,
    build_optimizer,
    build_scheduler,
    epoch_order,
    eval_batches,
    load_splits,
    seed_everything,
    to_device,
    window_mean,
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
                raise ValueError(f"{message}={cfg.max_prompt_length}")
            log(f"dropped {message}={cfg.max_prompt_length}")
        if rows and not kept:
            raise ValueError(f"every {split} prompt is longer than max_prompt_length={cfg.max_prompt_length}")
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


def total_iterations(num_prompts: int, cfg: PPOConfig) -> int:
    """PPO iterations of the run: ``max_steps`` when > 0, else ``epochs`` passes over the prompts."""
    per_epoch = num_prompts // cfg.rollout_batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_prompts} training prompts, fewer than rollout_batch_size={cfg.rollout_batch_size}")
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch


def iteration_prompts(num_prompts: int, cfg: PPOConfig, step: int) -> tuple[list[int], dict]:
    """Prompt indices of iteration ``step`` (0-based) and its data position ``{epoch, offset}``."""
    n = cfg.rollout_batch_size
    epoch, offset = divmod(step, num_prompts // n)
    order = epoch_order(num_prompts, cfg.seed, epoch)
    return order[offset * n : (offset + 1) * n], {"epoch": epoch, "offset": offset * n}


@torch.no_grad()
def evaluate(policy, reward_model, tokenizer, rows, cfg: PPOConfig, autocast=contextlib.nullcontext) -> dict:
    """Greedy responses to the held-out prompts: mean score (with the EOS penalty), response length, EOS rate.

    Greedy decoding draws no random numbers, and the RNG is forked anyway: evaluation never changes training.
    """
    device = next(policy.parameters()).device
    collate = PromptCollator(tokenizer.pad_token_id)
    scores, lengths, ended = [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for prompts in eval_batches(rows, collate, cfg.eval_batch_size, device):
            batch = generate(policy, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, do_sample=False)
            with autocast():
                scores.append(score(reward_model, batch, missing_eos_penalty=cfg.missing_eos_penalty))
            lengths.append(batch["response_mask"].sum(-1).float())
            ended.append(batch["ended"].float())
    return {
        "scores": torch.cat(scores).mean().item(),
        "response_length": torch.cat(lengths).mean().item(),
        "eos_rate": torch.cat(ended).mean().item(),
    }


def iteration(step, prompts, models: dict, optimizers: dict, kl_ctl, tokenizer, cfg: PPOConfig, autocast) -> dict:
    """One PPO iteration on ``prompts``: rollout, score, advantages, update. Returns its metrics."""
    policy, critic = models["policy"], models["critic"]
    batch = rollout(policy, models["ref"], critic, tokenizer, prompts, cfg, autocast)
    with autocast():
        batch["scores"] = score(
            models["reward"], batch, missing_eos_penalty=cfg.missing_eos_penalty, batch_size=cfg.batch_size
        )
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
            policy,
            critic,
            optimizers,
            batch,
            cfg,
            seed=cfg.seed * 1_000_003 + step,
            autocast=autocast,
            ratio_tolerance=ratio_tolerance(cfg, autocast),
        )
    )
    kl_ctl.update(stats["objective/kl"], batch["input_ids"].shape[0])
    return stats


def train(cfg: PPOConfig, resume: bool = False) -> dict:
    """Run PPO as configured; returns the last logged train metrics and the final evaluation (``eval/...``)."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed, cfg.num_threads)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_prompts(cfg, tokenizer)
    policy, ref, reward_model, critic = build_models(cfg, tokenizer, device)
    models = {"policy": policy, "ref": ref, "reward": reward_model, "critic": critic}
    trained = nn.ModuleDict({"policy": policy, "critic": critic})  # what a checkpoint holds
    collate = PromptCollator(tokenizer.pad_token_id)
    autocast = autocast_context(cfg, device)
    steps = total_iterations(len(train_rows), cfg)
    optimizers = {name: build_optimizer(trained[name], cfg) for name in trained}
    schedulers = {name: build_scheduler(opt, cfg, steps) for name, opt in optimizers.items()}
    kl_ctl = kl_controller(cfg)

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, trained)  # restores the RNG states too
        for name in trained:
            optimizers[name].load_state_dict(state["optimizers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        kl_ctl.load_state_dict(state["kl_controller"])
        start = state["step"]
        print(f"resumed from {ckpt} (step {start} of {steps})")
    elif resume:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0")
    save_config(cfg, out_dir / "config.yaml")
    logger = MetricsLogger(out_dir, resume_step=start if ckpt is not None else 0, tensorboard=cfg.tensorboard)

    def run_eval():
        return evaluate(policy, reward_model, tokenizer, eval_rows, cfg, autocast)

    window, last_logged, t0 = [], {}, time.perf_counter()
    bar = tqdm(total=steps, initial=start, disable=not cfg.progress, desc=out_dir.name, leave=True)
    for step in range(start, steps):
        indices, _ = iteration_prompts(len(train_rows), cfg, step)
        prompts = to_device(collate([train_rows[i] for i in indices]), device)
        learning_rate = schedulers["policy"].get_last_lr()[0]
        stats = iteration(step, prompts, models, optimizers, kl_ctl, tokenizer, cfg, autocast)
        for scheduler in schedulers.values():
            scheduler.step()
        stats.update(learning_rate=learning_rate, num_episodes=(step + 1) * cfg.rollout_batch_size)
        window.append(stats)
        bar.update(1)
        bar.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == steps:
            last_logged = window_mean(window)
            last_logged["seconds_per_step"] = (time.perf_counter() - t0) / len(window)
            logger.log(step + 1, last_logged)
            window, t0 = [], time.perf_counter()
        if eval_rows and cfg.eval_steps > 0 and (step + 1) % cfg.eval_steps == 0 and step + 1 < steps:
            logger.log(step + 1, run_eval(), split="eval")
        if (cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0) or step + 1 == steps:
            state = {
                "step": step + 1,
                "data_position": iteration_prompts(len(train_rows), cfg, step + 1)[1],
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "schedulers": {name: sch.state_dict() for name, sch in schedulers.items()},
                "kl_controller": kl_ctl.state_dict(),
                "config": dataclasses.asdict(cfg),
            }
            save_checkpoint(out_dir, step + 1, trained, state, keep=cfg.keep_checkpoints)
    bar.close()

    final = {f"train/{k}": v for k, v in last_logged.items()}
    if eval_rows:
        metrics = run_eval()
        logger.log(steps, metrics, split="eval")
        final.update({f"eval/{k}": v for k, v in metrics.items()})
    logger.close()
    save_policy(policy, tokenizer, out_dir / "final")
    critic.save_pretrained(out_dir / "final" / "value_model")
    if cfg.plots:
        plot_metrics(out_dir / "metrics.csv", out_dir / "plots")
    return final
