"""Reward model training: Bradley-Terry on preference pairs, or K ranked responses per prompt.

``rlhf rm --config FILE key=value ...`` or :func:`train`. Every batch goes through
:func:`rlhf_kernels.ranked_reward_loss`: a preference pair is a ranking of K = 2 (chosen rank 0, rejected rank 1),
and a ranked row (:mod:`rlhf.ranked_data`) holds K responses with ranks (ties allowed) and optional scores.

- Loss per prompt (InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155): the mean over its ranked
  pairs (w better than l) of ``-log sigmoid(r_w - r_l - margin_wl)`` plus ``center_coef * (r_w + r_l)^2``, then
  the mean over the prompts of the optimizer step; for a pair this is ``-log sigmoid(r_c - r_r - margin) +
  center_coef * (r_c + r_r)^2`` (``margin``: the pair row's optional column, 0 when absent). ``rank_loss=
  plackett_luce``: the Plackett-Luce negative log-likelihood of each prompt's ranking instead.
- Margins of ranked rows: ``score_margin * (score_w - score_l)`` when the rows carry scores.
- Each response is scored by one forward pass of the reward model (one row of the micro-batch), whatever K, and
  all of a prompt's pairs are in the same micro-batch, hence the same optimizer step.
- Metrics: ``accuracy`` (pairwise accuracy: pairs scored in the label order), ``kendall_tau`` (Kendall tau-b of
  the model's order against the labels, averaged over prompts), ``margin`` (mean ``r_w - r_l`` over pairs),
  ``reward/*``. Held-out values are exact over all pairs and prompts; a training step's values weight each
  micro-batch by its prompts.
"""

from __future__ import annotations

import torch

import rlhf_kernels
from rlhf_kernels.ops.ranked_reward_loss import ranked_pairs

from . import distributed
from .collators import PreferenceCollator
from .config import RewardConfig
from .errors import UserError
from .models import RewardModel, apply_lora, load_reward_model, load_tokenizer
from .ranked_data import RankedCollator, is_ranked
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


def count_prompts(batch: dict) -> int:
    """The prompts of a collated batch that have at least one ranked pair (every pair row has one)."""
    if "ranks" not in batch:
        return int(batch["margin"].shape[0])
    return int(ranked_pairs(batch["ranks"]).any(-1).any(-1).sum())


def batch_rankings(rewards: torch.Tensor, batch: dict, score_margin: float):
    """``(rewards (P, K), ranks (P, K), margins (P, K) | None)`` of a batch from its ``(N,)`` rewards: pair batches
    (2B rows, chosen first) become K = 2 rankings with the pair margin on the chosen side; ranked batches place
    each response at its ``slot``."""
    if "ranks" not in batch:
        pairs = batch["margin"].shape[0]
        table = torch.stack((rewards[:pairs], rewards[pairs:]), 1)
        ranks = torch.tensor([[0, 1]], device=rewards.device).expand(pairs, 2)
        margin = batch["margin"].to(rewards.dtype)
        return table, ranks, torch.stack((margin, torch.zeros_like(margin)), 1)
    ranks = batch["ranks"]
    table = rewards.new_zeros(ranks.numel()).index_copy(0, batch["slot"], rewards).view(ranks.shape)
    margins = None
    if score_margin > 0:
        if not bool(batch["has_scores"].all()):
            raise UserError("score_margin > 0 needs a 'scores' column in every ranked row")
        margins = score_margin * batch["scores"].to(rewards.dtype)
    return table, ranks, margins


def reward_loss(
    model: RewardModel,
    batch: dict,
    normalizer: float,
    detailed: bool = False,
    *,
    center_coef: float = 0.0,
    rank_loss: str = "pairwise",
    score_margin: float = 0.0,
    sums: bool = False,
):
    """``(loss, stats)`` of a batch: every response scored once, the prompt losses summed and divided by
    ``normalizer`` (the step's prompts with a pair). Stats: the batch means of :func:`rlhf_kernels.ranked_reward_loss`
    scaled by this batch's prompts / ``normalizer`` (so micro-batches add up); with ``sums``, also the sums that
    give exact held-out values (``sum/*``). ``detailed`` is accepted for the shared loop and unused."""
    rewards = model(batch["input_ids"], batch["attention_mask"])  # (N,): one forward row per response
    table, ranks, margins = batch_rankings(rewards, batch, score_margin)
    loss, stats = rlhf_kernels.ranked_reward_loss(
        table, ranks, mode=rank_loss, margins=margins, center_coef=center_coef, normalizer=normalizer
    )
    r = table.detach()
    pairs = ranked_pairs(ranks)
    margin_sum = torch.where(pairs, r[:, :, None] - r[:, None, :], 0.0).sum()
    prompts, num_pairs = stats["num_prompts"], stats["num_pairs"].clamp_min(1)
    scale = prompts / normalizer
    out = {
        "loss": loss.detach(),
        "accuracy": stats["accuracy"] * scale,
        "kendall_tau": stats["kendall_tau"] * scale,
        "margin": margin_sum / num_pairs * scale,
        "reward/mean": stats["reward/mean"] * scale,
        "reward/min": stats["reward/min"],
        "reward/max": stats["reward/max"],
        "num_pairs": stats["num_pairs"],
        "num_prompts": prompts,
    }
    if sums:
        out["sum/correct"] = stats["accuracy"] * stats["num_pairs"]
        out["sum/tau"] = stats["kendall_tau"] * stats["num_tau_prompts"]
        out["sum/tau_prompts"] = stats["num_tau_prompts"]
        out["sum/margin"] = margin_sum
        out["sum/reward"] = r[ranks >= 0].sum()
        out["sum/responses"] = (ranks >= 0).sum()
    return loss, out


def evaluate(model: RewardModel, rows, collate, cfg: RewardConfig, autocast) -> dict:
    """Held-out loss (mean over prompts), pairwise accuracy and margin (over all pairs), Kendall tau (over the
    prompts where it is defined) and reward statistics (over all responses); each process scores its share."""
    parts = []
    for batch, real in shard_eval_batches(rows, collate, cfg.eval_batch_size, next(model.parameters()).device):
        with autocast():  # normalizer 1: the loss is the sum of the batch's prompt losses
            _, stats = reward_loss(model, batch, 1, sums=True, **loss_options(cfg))
        parts.append(stats if real else distributed.neutral_stats(stats))
    t = eval_totals(parts)
    prompts, pairs = max(t["num_prompts"], 1), max(t["num_pairs"], 1)
    return {
        "loss": t["loss"] / prompts,
        "accuracy": t["sum/correct"] / pairs,
        "kendall_tau": t["sum/tau"] / max(t["sum/tau_prompts"], 1),
        "margin": t["sum/margin"] / pairs,
        "reward/mean": t["sum/reward"] / max(t["sum/responses"], 1),
        "reward/min": t["reward/min"],
        "reward/max": t["reward/max"],
        "num_pairs": t["num_pairs"],
        "num_prompts": t["num_prompts"],
    }


def loss_options(cfg: RewardConfig) -> dict:
    return {"center_coef": cfg.center_coef, "rank_loss": cfg.rank_loss, "score_margin": cfg.score_margin}


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
    for rows in (train_rows, eval_rows or []):  # pairs or rankings, each split its own (a pair is K = 2)
        if cfg.score_margin > 0 and is_ranked(rows) and not all(r["scores"] is not None for r in rows):
            raise UserError("score_margin > 0 needs ranked rows with a 'scores' column (prompt, responses, scores)")
    if cfg.score_margin > 0 and not is_ranked(train_rows):
        raise UserError("score_margin > 0 needs ranked rows with a 'scores' column (pairs take a 'margin' column)")
    collate, eval_collate = (
        (RankedCollator if is_ranked(rows) else PreferenceCollator)(tokenizer.pad_token_id)
        for rows in (train_rows, eval_rows or [])
    )
    options = loss_options(cfg)

    def loss_fn(model, batch, normalizer, detailed):
        return reward_loss(model, batch, normalizer, detailed, **options)

    def evaluate_fn():
        return evaluate(model, eval_rows, eval_collate, cfg, autocast_context(cfg, device))

    def save_final(path, models):
        models["model"].save_pretrained(path)
        tokenizer.save_pretrained(path)

    rows_per_step, rows_name = supervised_batch(cfg)
    stage = Stage(
        models={"model": model},
        rows=train_rows,
        rows_per_step=rows_per_step,
        step=supervised_step("model", collate, loss_fn, count_prompts, cfg),
        save_final=save_final,
        evaluate=evaluate_fn if eval_rows else None,
        show=("loss", "accuracy"),
        plain_models=lambda: {"model": build_reward_model(cfg, tokenizer, "cpu")},
        rows_name=rows_name,
    )
    return run(cfg, stage, resume=resume)
