"""The training core: one loop that every stage (SFT, reward model, DPO, PPO) runs on, as small functions.

A stage is a config, a :class:`Stage` (its trained models, its rows, a step function, a final export and an
optional evaluation) and a CLI entry. The loop owns what every stage shares: the data order, the optimizers and
schedules, logging, evaluation, atomic checkpoints and exact resume, progress and the end-of-stage summary.
:func:`accumulate_and_step` is the one place where micro-batches are accumulated and an optimizer steps, for the
supervised stages (:func:`supervised_step`) and for each PPO update alike.

Normalisers: a loss that averages takes its denominator from the caller: the number of items (tokens, sequences,
pairs) of the whole optimizer update, so the micro-batches' losses add up to the update's mean. Stats follow the
same rule: ``*/min`` and ``*/max`` reduce by min/max, ``num_*`` are counts summed over the run, everything else
is summed over micro-batches and averaged over the logging window.

Exact resume: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and step ``s`` always reads
rows ``[s * rows_per_step, (s + 1) * rows_per_step)`` of it, so the data position is a function of the step. A
checkpoint holds the trained weights, optimizers, schedules, the stage's other state, RNG states and that
position; a resumed run replays the same arithmetic bit for bit (on CPU, with the same thread count).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import save_config
from .data import check_source
from .errors import UserError, check_local_path
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


MODEL_OPTIONS = ("model", "tokenizer", "ref_model", "reward_model", "value_model")  # local paths checked up front
DATA_OPTIONS = ("dataset", "eval_dataset", "sft_dataset", "prompt_dataset", "eval_prompt_dataset", "preference_dataset")


def check_paths(cfg) -> None:
    """MissingPathError for the first model or dataset option that names a local path that does not exist."""
    for option in MODEL_OPTIONS + DATA_OPTIONS:
        value = getattr(cfg, option, None)
        if value is not None and option in MODEL_OPTIONS:
            check_local_path(str(value), option)
        elif value is not None:
            check_source(str(value), option)


def start_stage(cfg) -> torch.device:
    """What every stage does first: validate the config, check that the local paths it names exist (before any
    model is loaded or anything is written), seed, quiet the libraries' progress bars when ``progress`` is off;
    returns the device to train on."""
    from .models import resolve_device

    cfg.validate()
    check_paths(cfg)
    seed_everything(cfg.seed, cfg.num_threads)
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    return resolve_device(cfg.device)


def autocast_context(cfg, device: torch.device):
    """bf16 autocast on CUDA when ``mixed_precision`` is ``auto`` or ``bf16``; nothing on CPU with ``auto``."""
    mode = cfg.mixed_precision
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def total_steps(num_rows: int, per_step: int, cfg, what: str = "batch_size * grad_accum") -> int:
    """Optimizer steps (iterations) of the run: ``max_steps`` when > 0, else ``epochs`` full passes over the
    ``num_rows`` rows, ``per_step`` rows a step (a last partial step is dropped)."""
    per_epoch = num_rows // per_step
    if per_epoch == 0:
        raise UserError(f"the training split has {num_rows} rows, fewer than {what} = {per_step}")
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation seeded by ``(seed, epoch)`` only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=gen).tolist()


def step_rows(num_rows: int, per_step: int, seed: int, step: int) -> tuple[list[int], dict]:
    """Row indices read by step ``step`` (0-based, ``per_step`` rows a step) and its data position
    ``{epoch, offset}``."""
    epoch, offset = divmod(step, num_rows // per_step)
    order = epoch_order(num_rows, seed, epoch)
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


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
    """Clip the gradient norm (``max_grad_norm = 0``: no clipping), step, zero the gradients; returns the norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def accumulate_and_step(
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    micro_batches: Sequence[dict],
    loss_fn: Callable[[dict, float], tuple[torch.Tensor, dict]],
    normalizer: float,
    *,
    max_grad_norm: float,
    autocast=contextlib.nullcontext,
    norm_keys: dict[str, str] | None = None,
) -> dict:
    """One optimizer update of every model in ``models``: forward/backward over the micro-batches, clip, step.

    ``loss_fn(batch, normalizer) -> (loss, stats)`` returns a micro-batch's loss already divided by
    ``normalizer``, the item count (tokens, sequences, pairs) of the whole update, so that the micro-batch losses
    add up to the update's mean and gradient accumulation equals one large batch; its stats follow the same rule
    (module docstring). Each model's gradient norm before clipping is reported under ``norm_keys[name]``
    (default ``grad_norm``, then ``<name>/grad_norm``). This is the only place where the training layer steps an
    optimizer.
    """
    parts = []
    for batch in micro_batches:
        with autocast():
            loss, stats = loss_fn(batch, normalizer)
        loss.backward()
        parts.append(stats)
    stats = reduce_stats(parts)
    for i, (name, model) in enumerate(models.items()):
        key = (norm_keys or {}).get(name, "grad_norm" if i == 0 else f"{name}/grad_norm")
        stats[key] = clip_and_step(model, optimizers[name], max_grad_norm)
    return stats


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def micro_batches(rows: Sequence[dict], batch_size: int, collate, device) -> list[dict]:
    """``rows`` cut into collated micro-batches of ``batch_size`` rows, in order, on ``device``."""
    return [to_device(collate(list(rows[j : j + batch_size])), device) for j in range(0, len(rows), batch_size)]


def eval_batches(rows: Sequence[dict], collate, batch_size: int, device):
    """Collated batches over ``rows`` in order, one at a time, on ``device``."""
    for i in range(0, len(rows), batch_size):
        yield to_device(collate(list(rows[i : i + batch_size])), device)


# ---------------------------------------------------------------------------------------------------- the loop


@dataclass
class StepContext:
    """What the loop hands a stage's step function."""

    step: int  # 0-based index of this step
    rows: list[dict]  # the rows this step reads, in order (the data order is the loop's)
    models: dict[str, torch.nn.Module]  # the stage's trained models
    optimizers: dict[str, torch.optim.Optimizer]  # one per trained model, same keys
    autocast: Callable  # autocast context factory of the run
    device: torch.device
    detailed: bool  # a logging step: the stage may compute costlier stats


@dataclass
class Stage:
    """A training stage as the loop sees it: trained models, data, and a step function.

    ``step(ctx) -> stats`` runs one optimizer step (SFT, RM, DPO: :func:`supervised_step`) or one iteration (PPO:
    rollout, scoring, advantages and several optimizer updates through :func:`accumulate_and_step`) on
    ``ctx.rows`` and returns detached python-float stats. The loop builds one AdamW optimizer and one schedule per
    trained model and steps every schedule once per step.
    """

    models: dict[str, torch.nn.Module]  # trained, checkpointed; the first one's learning rate is logged
    rows: Sequence[dict]  # training rows (prompts for RL)
    rows_per_step: int  # rows one step reads
    step: Callable[[StepContext], dict]
    save_final: Callable[[Path], None]  # writes the final model(s) into the given directory
    evaluate: Callable[[], dict] | None = None  # held-out metrics, run in eval mode without gradients
    state: dict[str, Any] = field(default_factory=dict)  # more objects with state_dict()/load_state_dict() (a KL
    # controller...) saved in checkpoints
    show: tuple[str, ...] = ("loss",)  # stats on the progress bar and in the end-of-stage summary
    rows_name: str = "batch_size * grad_accum"  # what rows_per_step is, for the error on too little data


def supervised_step(
    model_name: str,
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable[[torch.nn.Module, dict, float, bool], tuple[torch.Tensor, dict]],
    count_fn: Callable[[dict], int],
    cfg,
) -> Callable[[StepContext], dict]:
    """The step of a supervised stage: ``grad_accum`` micro-batches of ``batch_size`` rows, one optimizer step.

    ``loss_fn(model, batch, normalizer, detailed)``; ``count_fn(batch)``: the loss items (tokens, pairs) of a
    collated batch, summed over the step's micro-batches to give the normalizer.
    """

    def step(ctx: StepContext) -> dict:
        model = ctx.models[model_name]
        batches = micro_batches(ctx.rows, cfg.batch_size, collate, ctx.device)
        normalizer = max(sum(count_fn(b) for b in batches), 1)
        return accumulate_and_step(
            ctx.models,
            ctx.optimizers,
            batches,
            lambda batch, norm: loss_fn(model, batch, norm, ctx.detailed),
            normalizer,
            max_grad_norm=cfg.max_grad_norm,
            autocast=ctx.autocast,
        )

    return step


def _checkpointed(models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """What a checkpoint's weights file holds: the model itself when there is one, else a ``ModuleDict``."""
    if len(models) == 1:
        return next(iter(models.values()))
    return torch.nn.ModuleDict(models)


def upgrade_state(state: dict, names: list[str]) -> dict:
    """A checkpoint's state in today's layout. Checkpoints written before the training core held one stage's
    optimizer and schedule under ``optimizer`` / ``scheduler`` (SFT, RM, DPO) and PPO's no ``totals``."""
    state = dict(state)
    if "optimizer" in state and len(names) == 1:
        state["optimizers"] = {names[0]: state.pop("optimizer")}
        state["schedulers"] = {names[0]: state.pop("scheduler")}
    state.setdefault("totals", {})
    return state


def run(cfg, stage: Stage, *, resume: bool = False) -> dict:
    """Train ``stage`` for the configured steps: data order, steps, schedules, logging, evaluation, checkpoints,
    exact resume, progress, final export and plots. Returns the last logged train metrics (``train/...``) and
    the final evaluation (``eval/...``)."""
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    steps = total_steps(len(stage.rows), stage.rows_per_step, cfg, stage.rows_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = stage.models
    device = next(next(iter(models.values())).parameters()).device
    autocast = autocast_context(cfg, device)
    optimizers = {name: build_optimizer(model, cfg) for name, model in models.items()}
    schedulers = {name: build_scheduler(opt, cfg, steps) for name, opt in optimizers.items()}
    trained = _checkpointed(models)

    start, totals = 0, {}
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        state = upgrade_state(load_checkpoint(ckpt, trained), list(models))  # restores the RNG states too
        for name in models:
            optimizers[name].load_state_dict(state["optimizers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        for name, obj in stage.state.items():
            obj.load_state_dict(state[name])
        start, totals = state["step"], dict(state["totals"])
        print(f"{out_dir.name}: resumed from {ckpt} (step {start} of {steps})")
    save_config(cfg, out_dir / "config.yaml")
    logger = MetricsLogger(out_dir, resume_step=start, tensorboard=cfg.tensorboard)

    def evaluate() -> dict:
        return run_eval(list(models.values()), stage.evaluate)

    for model in models.values():
        model.train()
    window, last_logged, t0, t_start = [], {}, time.perf_counter(), time.perf_counter()
    first = next(iter(schedulers.values()))
    bar = tqdm(total=steps, initial=start, disable=not cfg.progress, desc=out_dir.name, leave=True)
    for step in range(start, steps):
        indices, _ = step_rows(len(stage.rows), stage.rows_per_step, cfg.seed, step)
        detailed = (step + 1) % cfg.logging_steps == 0 or step + 1 == steps
        ctx = StepContext(step, [stage.rows[i] for i in indices], models, optimizers, autocast, device, detailed)
        learning_rate = first.get_last_lr()[0]
        stats = stage.step(ctx)
        for scheduler in schedulers.values():
            scheduler.step()
        stats["learning_rate"] = learning_rate
        for key in [k for k in stats if k.startswith("num_")]:
            totals[key] = totals.get(key, 0) + stats[key]
            stats[key] = totals[key]
        window.append(stats)
        bar.update(1)
        bar.set_postfix({k: f"{stats[k]:.4g}" for k in stage.show if k in stats})
        if detailed:
            last_logged = window_mean(window)
            last_logged["seconds_per_step"] = (time.perf_counter() - t0) / len(window)
            logger.log(step + 1, last_logged)
            window, t0 = [], time.perf_counter()
        if stage.evaluate is not None and cfg.eval_steps > 0 and (step + 1) % cfg.eval_steps == 0 and step + 1 < steps:
            logger.log(step + 1, evaluate(), split="eval")
        if (cfg.save_steps > 0 and (step + 1) % cfg.save_steps == 0) or step + 1 == steps:
            state = {
                "step": step + 1,
                "data_position": step_rows(len(stage.rows), stage.rows_per_step, cfg.seed, step + 1)[1],
                "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                "schedulers": {name: sch.state_dict() for name, sch in schedulers.items()},
                "totals": totals,
                "config": asdict(cfg),
                **{name: obj.state_dict() for name, obj in stage.state.items()},
            }
            save_checkpoint(out_dir, step + 1, trained, state, keep=cfg.keep_checkpoints)
    bar.close()

    final = {f"train/{k}": v for k, v in last_logged.items()}
    if stage.evaluate is not None:
        metrics = evaluate()
        logger.log(steps, metrics, split="eval")
        final.update({f"eval/{k}": v for k, v in metrics.items()})
    logger.close()
    stage.save_final(out_dir / "final")
    if cfg.plots:
        plot_metrics(out_dir / "metrics.csv", out_dir / "plots")
    print(summary_line(out_dir, final, stage.show, steps - start, time.perf_counter() - t_start))
    return final


def summary_line(out_dir: Path, final: dict, show: Sequence[str], steps: int, seconds: float) -> str:
    """One line at the end of a stage: the steps run, the shown stats (train, then held-out), the final model."""
    keys = [f"train/{k}" for k in show] + [f"eval/{k}" for k in dict.fromkeys(("loss", *show))]
    shown = [f"{k.removeprefix('train/')} {final[k]:.4g}" for k in keys if k in final]
    minutes, secs = divmod(round(seconds), 60)
    return (
        f"{out_dir.name}: {steps} steps in {minutes}m{secs:02d}s; {', '.join(shown)}; final model: {out_dir / 'final'}"
    )


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


def run_eval(models: Sequence[torch.nn.Module], evaluate: Callable[[], dict]) -> dict:
    """Run ``evaluate()`` with ``models`` in eval mode and without gradients, then restore their modes."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    with torch.no_grad():
        metrics = evaluate()
    for model, mode in zip(models, modes, strict=True):
        model.train(mode)
    return metrics
