"""Supervised fine-tuning: mean negative log-likelihood of the response tokens, through the fused log-prob head.

``rlhf sft --config FILE key=value ...`` or :func:`train`. The loss of an optimizer step is the mean over every
response token of all its micro-batches (prompt and padding carry ``labels = -100``), so gradient accumulation
gives the same update as one large batch.
"""

from __future__ import annotations

from . import distributed
from .collators import SFTCollator
from .config import SFTConfig
from .models import IGNORE_INDEX, LMHead, apply_lora, load_causal_lm, load_tokenizer
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


def count_tokens(batch: dict) -> int:
    """Number of response tokens the loss averages over (targets are ``labels[:, 1:]``)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sft_loss(model, batch: dict, normalizer: float, detailed: bool, *, head: LMHead):
    """``(loss, stats)``: summed NLL of the response tokens divided by ``normalizer`` (the step's token count).

    ``batch``: ``input_ids, attention_mask, labels (B, T)``. ``detailed`` adds ``mean_token_accuracy`` (an extra
    no-grad argmax over the LM head on the response tokens, in the same forward call).
    """
    logprobs, entropy, *correct = head.logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        return_entropy=True,
        return_correct=detailed,
    )  # (B, T-1) each, then the argmax count when detailed
    targets = batch["labels"][:, 1:]
    loss = -logprobs.sum() / normalizer
    stats = {
        "loss": loss.detach(),
        "entropy": entropy.detach().sum() / normalizer,
        "num_tokens": (targets != IGNORE_INDEX).sum(),
    }
    if detailed:
        stats["mean_token_accuracy"] = correct[0] / normalizer
    return loss, stats


def evaluate(model, rows, collate, cfg, autocast, head: LMHead) -> dict:
    """Token-weighted loss, accuracy and entropy over the held-out rows (each process evaluates its share)."""
    parts = []
    for batch, real in shard_eval_batches(rows, collate, cfg.eval_batch_size, next(model.parameters()).device):
        with autocast():  # normalizer 1: sums over the batch's tokens, divided once at the end
            _, stats = sft_loss(model, batch, 1, True, head=head)
        parts.append(stats if real else distributed.neutral_stats(stats))
    totals = eval_totals(parts)
    tokens = max(totals["num_tokens"], 1)
    return {k: v if k == "num_tokens" else v / tokens for k, v in totals.items()}


def build_policy(cfg: SFTConfig, tokenizer, device):
    """The model to fine-tune (LoRA-wrapped when ``lora_r > 0``)."""
    model = load_causal_lm(
        cfg.model,
        tokenizer,
        dtype=cfg.dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
    )
    if cfg.lora_r > 0:
        model = apply_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules
        )
    return model


def save_policy(model, tokenizer, path) -> None:
    """``save_pretrained`` of the fine-tuned model (LoRA merged into a copy) and its tokenizer."""
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def train(cfg: SFTConfig, resume: bool = False) -> dict:
    """Run SFT as configured; returns the final train and eval metrics."""
    device = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_splits(cfg, tokenizer, "sft")
    model = distributed.shard(build_policy(cfg, tokenizer, build_device(device)))
    collate = SFTCollator(tokenizer.pad_token_id)
    head = LMHead.from_config(cfg)

    def loss_fn(model, batch, normalizer, detailed):
        return sft_loss(model, batch, normalizer, detailed, head=head)

    def evaluate_fn():
        return evaluate(model, eval_rows, collate, cfg, autocast_context(cfg, device), head)

    rows_per_step, rows_name = supervised_batch(cfg)
    stage = Stage(
        models={"model": model},
        rows=train_rows,
        rows_per_step=rows_per_step,
        step=supervised_step("model", collate, loss_fn, count_tokens, cfg),
        save_final=lambda path, trained: save_policy(trained["model"], tokenizer, path),
        evaluate=evaluate_fn if eval_rows else None,
        plain_models=lambda: {"model": build_policy(cfg, tokenizer, "cpu")},
        rows_name=rows_name,
    )
    return run(cfg, stage, resume=resume)
