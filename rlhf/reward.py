"""Reward model training: the Bradley-Terry loss on preference pairs.

``rlhf rm --config FILE key=value ...`` or :func:`train`. With rewards ``r_c, r_r`` of the chosen and rejected
responses, the loss per pair is ``-log sigmoid(r_c - r_r - margin)`` (``margin`` an optional per-row column,
0 when absent) plus ``center_coef * (r_c + r_r)^2``, which keeps the rewards centred on 0; both are averaged
over the pairs of the optimizer step. See Ouyang et al. 2022, https://arxiv.org/abs/2203.02155.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed
from .collators import PreferenceCollator
from .config import RewardConfig
from .models import RewardModel, apply_lora, load_reward_model, load_tokenizer
from .train import (
    Stage,
    autocast_context,
    build_device,
    eval_totals,
    load_splits,
    run,
    shard_eval_batches,
    start_stage,
    supervised_batch,
    supervised_step,
)


def count_pairs(batch: dict) -> int:
    return int(batch["margin"].shape[0])


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, center_coef: float):
    """Per-pair loss ``(B,)``: ``-log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2``."""
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected).square()


def reward_loss(
    model: RewardModel, batch: dict, normalizer: float, detailed: bool = False, *, center_coef: float = 0.0
):
    """``(loss, stats)`` for a batch of ``B`` pairs stacked as ``2B`` rows (chosen first, then rejected).

    ``batch``: ``input_ids, attention_mask (2B, T)``, ``margin (B,)``. The loss is summed over the pairs and
    divided by ``normalizer`` (the step's pair count). ``detailed`` is accepted for the shared loop and unused.
    """
    rewards = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
    pairs = batch["margin"].shape[0]
    chosen, rejected = rewards[:pairs], rewards[pairs:]
    loss = bradley_terry_loss(chosen, rejected, batch["margin"].float(), center_coef).sum() / normalizer
    r = rewards.detach()
    stats = {
        "loss": loss.detach(),
        "accuracy": (chosen.detach() > rejected.detach()).float().sum() / normalizer,
        "margin": (chosen.detach() - rejected.detach()).sum() / normalizer,
        "reward/mean": r.sum() / (2 * normalizer),
        "reward/min": r.min(),
        "reward/max": r.max(),
        "num_pairs": torch.tensor(pairs),
    }
    return loss, stats


def evaluate(model: RewardModel, rows, collate, cfg: RewardConfig, autocast) -> dict:
    """Held-out loss, accuracy, margin and reward statistics, averaged over all pairs (each process scores its
    share)."""
    parts = []
    for batch, real in shard_eval_batches(rows, collate, cfg.eval_batch_size, next(model.parameters()).device):
        with autocast():
            _, stats = reward_loss(model, batch, 1, center_coef=cfg.center_coef)  # sums over the batch's pairs
        parts.append(stats if real else distributed.neutral_stats(stats))
    totals = eval_totals(parts)
    keep = ("reward/min", "reward/max", "num_pairs")
    return {k: v if k in keep else v / len(rows) for k, v in totals.items()}


def build_reward_model(cfg: RewardConfig, tokenizer, device) -> RewardModel:
    """A reward model on the configured backbone; with ``lora_r > 0`` the backbone gets adapters, the head trains."""
    model = load_reward_model(
        cfg.model,
        tokenizer,
        dtype=cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
    )
    if cfg.lora_r > 0:
        model.backbone = apply_lora(
            model.backbone,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="FEATURE_EXTRACTION",
        )
    return model


def train(cfg: RewardConfig, resume: bool = False) -> dict:
    """Train a reward model as configured; returns the final train and eval metrics (``eval/accuracy`` ...)."""
    device = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_splits(cfg, tokenizer, "preference")
    model = distributed.shard(build_reward_model(cfg, tokenizer, build_device(device)))
    collate = PreferenceCollator(tokenizer.pad_token_id)

    def loss_fn(model, batch, normalizer, detailed):
        return reward_loss(model, batch, normalizer, detailed, center_coef=cfg.center_coef)

    def evaluate_fn():
        return evaluate(model, eval_rows, collate, cfg, autocast_context(cfg, device))

    def save_final(path, models):
        models["model"].save_pretrained(path)
        tokenizer.save_pretrained(path)

    rows_per_step, rows_name = supervised_batch(cfg)
    stage = Stage(
        models={"model": model},
        rows=train_rows,
        rows_per_step=rows_per_step,
        step=supervised_step("model", collate, loss_fn, count_pairs, cfg),
        save_final=save_final,
        evaluate=evaluate_fn if eval_rows else None,
        show=("loss", "accuracy"),
        plain_models=lambda: {"model": build_reward_model(cfg, tokenizer, "cpu")},
        rows_name=rows_name,
    )
    return run(cfg, stage, resume=resume)
