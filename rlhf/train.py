"""The optimisation loop shared by the supervised stages (SFT, reward model), as small functions.

A stage gives a ``loss_fn(model, batch, denom, detailed) -> (loss, stats)`` whose loss is already divided by
``denom``, the number of items (tokens, pairs) in the whole optimizer step, so the micro-batches' losses add up to
the step's mean. Stats follow the same rule: ``*/min`` and ``*/max`` reduce by min/max, ``num_*`` are counts
summed over the run, everything else is summed over micro-batches and averaged over the logging window.

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and an optimizer step ``s``
always reads rows ``[s * rows_per_step, (s + 1) * rows_per_step)`` of it, so the data position is a function of the
step. A checkpoint holds weights, optimizer, scheduler, RNG states and that position; a resumed run replays the
same arithmetic bit for bit (on CPU, with the same thread count).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import save_config
from .metrics import MetricsLogger, plot_metrics


def seed_everything(seed: int, num_threads: int = 0) -> None:
    """Seed python, numpy and torch; fix the thread count when asked (bitwise CPU reproducibility needs it)."""
    import random

    import numpy as np

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(cfg, device: torch.device):
    """bf16 autocast on CUDA when ``mixed_precision`` is ``auto`` or ``bf16``; nothing on CPU with ``auto``."""
    mode = cfg.mixed_precision
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def rows_per_step(cfg) -> int:
    return cfg.batch_size * cfg.grad_accum


def total_steps(num_rows: int, cfg) -> int:
    """Optimizer steps of the run: ``max_steps`` when > 0, else ``epochs`` full passes (last partial step dropped)."""
    per_epoch = num_rows // rows_per_step(cfg)
    if per_epoch == 0:
        raise ValueError(
            f"the training split has {num_rows} rows, fewer than batch_size * grad_accum = {rows_per_step(cfg)}"
        )
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation seeded by ``(seed, epoch)`` only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=gen).tolist()


def step_rows(num_rows: int, cfg, step: int) -> tuple[list[int], dict]:
    """Row indices read by optimizer step ``step`` (0-based) and its data position ``{epoch, offset}``."""
    per_step = rows_per_step(cfg)
    per_epoch = num_rows // per_step
    epoch, offset = divmod(step, per_epoch)
    order = epoch_order(num_rows, cfg.seed, epoch)
    return order[offset * per_step : (offset + 1) * per_step], {"epoch": epoch, "offset": offset * per_step}


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; matrices decay, biases and norm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=False
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, steps: int):
    """Warmup (``warmup_ratio`` of the steps) then constant, linear or cosine decay (``transformers`` schedules)."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.schedule]
    return get_scheduler(
        name, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * steps), num_training_steps=steps
    )


def reduce_stats(parts: Sequence[dict]) -> dict:
    """Combine per-micro-batch (or per-step) stats by the key rules in the module docstring."""
    out: dict = {}
    for stats in parts:
        for key, value in stats.items():
            value = float(value)
            if key not in out:
                out[key] = value
            elif key.endswith("/min"):
                out[key] = min(out[key], value)
            elif key.endswith("/max"):
                out[key] = max(out[key], value)
            else:
                out[key] += value
    return out


def window_mean(steps: Sequence[dict]) -> dict:
    """Average a logging window of per-step stats (min/max kept, ``num_*`` taken from the last step)."""
    out = {}
    for key in dict.fromkeys(k for s in steps for k in s):
        values = [s[key] for s in steps if key in s]
        if key.endswith("/min"):
            out[key] = min(values)
        elif key.endswith("/max"):
            out[key] = max(values)
        elif key.startswith("num_"):
            out[key] = values[-1]
        else:
            out[key] = sum(values) / len(values)
    return out


def optimizer_step(model, optimizer, scheduler, micro_batches, loss_fn, denom, cfg, autocast, detailed) -> dict:
    """Forward/backward over the micro-batches of one step, clip, step. Returns the step's stats."""
    parts = []
    for batch in micro_batches:
        with autocast():
            loss, stats = loss_fn(model, batch, denom, detailed)
        loss.backward()
        parts.append(stats)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    stats = reduce_stats(parts)
    stats["grad_norm"] = float(grad_norm)
    stats["learning_rate"] = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def step_batches(rows: Sequence[dict], indices: list[int], cfg, collate, device) -> list[dict]:
    """The ``grad_accum`` collated micro-batches of one optimizer step, on ``device``."""
    return [
        to_device(collate([rows[i] for i in indices[j : j + cfg.batch_size]]), device)
        for j in range(0, len(indices), cfg.batch_size)
    ]


def eval_batches(rows: Sequence[dict], collate, batch_size: int, device):
    """Collated batches over ``rows`` in order, one at a time, on ``device``."""
    for i in range(0, len(rows), batch_size):
        yield to_device(collate(list(rows[i : i + batch_size])), device)


def run(
    cfg,
    model: torch.nn.Module,
    train_rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable,
    count_fn: Callable[[dict], int],
    evaluate: Callable[[torch.nn.Module], dict] | None,
    save_final: Callable[[Path], None],
    *,
    resume: bool = False,
) -> dict:
    """Train ``model`` for the configured steps with checkpoints, logging, evaluation and final export.

    ``count_fn(batch)`` is the number of loss items in a collated batch (the ``denom`` of its step).
    Returns the last logged train metrics and the final evaluation (keys ``eval/...``).
    """
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    autocast = autocast_context(cfg, device)
    steps = total_steps(len(train_rows), cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)

    start, totals = 0, {}
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model)  # restores the RNG states too
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, totals = state["step"], dict(state["totals"])
        print(f"resumed from {ckpt} (step {start} of {steps})")
    elif resume:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0")
    save_config(cfg, out_dir / "config.yaml")
    logger = MetricsLogger(out_dir, resume_step=start if ckpt is not None else 0, tensorboard=cfg.tensorboard)

    model.train()
    window, last_logged, t0 = [], {}, time.perf_counter()
    bar = tqdm(total=steps, initial=start, disable=not cfg.progress, desc=Path(cfg.output_dir).name, leave=True)
    for step in range(start, steps):
        indices, _ = step_rows(len(train_rows), cfg, step)
        batches = step_batches(train_rows, indices, cfg, collate, device)
        denom = max(sum(count_fn(b) for b in batches), 1)
        detailed = (step + 1) % cfg.logging_steps == 0 or step + 1 == steps
        stats = optimizer_step(model, optimizer, scheduler, batches, loss_fn, denom, cfg, autocast, detailed)
        for key in [k for k in stats if k.startswith("num_")]:
            totals[key] = totals.get(key, 0) + stats[key]
            stats[key] = totals[key]
        window.append(stats)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if detailed:
            last_logged = window_mean(window)
            last_logged["seconds_per_step"] = (time.perf_counter() - t0) / len(window)
            logger.log(step + 1, last_logged)
            window, t0 = [], time.perf_counter()
        if evaluate is not None and cfg.eval_steps > 0 and (step + 1) % cfg.eval_steps == 0 and step + 1 < steps:
            logger.log(step + 1, run_eval(model, evaluate), split="eval")
        if (cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0) or step + 1 == steps:
            next_position = step_rows(len(train_rows), cfg, step + 1)[1]
            state = {
                "step": step + 1,
                "data_position": next_position,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "totals": totals,
                "config": asdict(cfg),
            }
            save_checkpoint(out_dir, step + 1, model, state, keep=cfg.keep_checkpoints)
    bar.close()

    final = {f"train/{k}": v for k, v in last_logged.items()}
    if evaluate is not None:
        metrics = run_eval(model, evaluate)
        logger.log(steps, metrics, split="eval")
        final.update({f"eval/{k}": v for k, v in metrics.items()})
    logger.close()
    save_final(out_dir / "final")
    if cfg.plots:
        plot_metrics(out_dir / "metrics.csv", out_dir / "plots")
    return final


def load_splits(cfg, tokenizer, kind: str) -> tuple[list[dict], list[dict] | None]:
    """Tokenised train and held-out rows: ``eval_dataset``/``eval_split`` when given, else an ``eval_fraction``."""
    from .data import load_rows, prepare, split_holdout

    train_ds = load_rows(cfg.dataset, cfg.split, config_name=cfg.dataset_config)
    if cfg.eval_dataset is not None or cfg.eval_split is not None:
        eval_ds = load_rows(
            cfg.eval_dataset or cfg.dataset, cfg.eval_split or cfg.split, config_name=cfg.dataset_config
        )
    elif cfg.eval_fraction > 0:
        train_ds, eval_ds = split_holdout(train_ds, cfg.eval_fraction, cfg.seed)
    else:
        eval_ds = None
    train_rows = prepare(train_ds, tokenizer, kind, cfg.max_length, cfg.overlong)
    eval_rows = None if eval_ds is None else prepare(eval_ds, tokenizer, kind, cfg.max_length, cfg.overlong)
    return train_rows, eval_rows


def run_eval(model: torch.nn.Module, evaluate: Callable) -> dict:
    """Run ``evaluate(model)`` in eval mode without gradients, then return to train mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    model.train(was_training)
    return metrics
