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

Many processes (torchrun, :mod:`rlhf.distributed`): ``rows_per_step`` is the global batch. Process ``r`` of ``W``
reads the ``r``-th contiguous ``1/W`` of the step's rows, so a step's examples, and which micro-batch each one is
in, do not depend on ``W``: one process with ``grad_accum=2`` and two with ``grad_accum=1`` compute the same
update. Normalisers are global (summed over the processes), stats are reduced over the processes in
:func:`accumulate_and_step`, and a step function returns the stats of the whole step. Rank 0 logs, shows progress
and writes the final model; checkpoints are written by every process (sharded) and resume on any process count.
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

from . import distributed
from .checkpoint import (
    is_single_model,
    latest_checkpoint,
    load_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
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
DATA_OPTIONS = ("dataset", "eval_dataset", "sft_dataset", "prompt_dataset", "eval_prompt_dataset",
                "preference_dataset", "ptx_dataset")  # fmt: skip


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
    model is loaded or anything is written), join the torchrun process group when there is one
    (:func:`rlhf.distributed.setup`), seed, quiet the libraries' progress bars when ``progress`` is off (and on
    every process but rank 0); returns the device to train on."""
    cfg.validate()
    check_paths(cfg)
    ctx = distributed.setup(cfg)
    seed_everything(cfg.seed, cfg.num_threads)
    if not cfg.progress or not ctx.main:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    return ctx.device


def supervised_batch(cfg) -> tuple[int, str]:
    """``(rows per optimizer step, its formula)`` of a supervised stage: ``batch_size * grad_accum`` rows per
    process, times the number of processes."""
    world = distributed.context().world
    name = "batch_size * grad_accum" + (f" * {world} processes" if world > 1 else "")
    return cfg.batch_size * cfg.grad_accum * world, name


def eval_totals(parts: Sequence[dict]) -> dict:
    """The evaluation stats of every process's batches: :func:`reduce_stats` here, then over the processes."""
    return distributed.reduce_stats(reduce_stats(parts))


def build_device(device: torch.device) -> torch.device:
    """Where a stage loads its models: CPU when they will be sharded (:func:`rlhf.distributed.shard` moves each
    process's shards to ``device``), else ``device``."""
    return torch.device("cpu") if distributed.context().sharded else device


def log(message: str) -> None:
    """Print on rank 0 only."""
    if distributed.context().main:
        print(message)


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
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded: the norm of all shards


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

    On many processes each runs its own micro-batches, ``normalizer`` is the global count, the losses are
    multiplied by :func:`rlhf.distributed.grad_scale` before backward (FSDP2 averages gradients) and the returned
    stats are reduced over the processes (:func:`rlhf.distributed.reduce_stats`).
    """
    scale = distributed.grad_scale(list(models.values()))
    parts = []
    for batch in micro_batches:
        with autocast():
            loss, stats = loss_fn(batch, normalizer)
        (loss * scale if scale != 1 else loss).backward()
        parts.append(stats)
    stats = distributed.reduce_stats(reduce_stats(parts))
    for i, (name, model) in enumerate(models.items()):
        key = (norm_keys or {}).get(name, "grad_norm" if i == 0 else f"{name}/grad_norm")
        stats[key] = clip_and_step(model, optimizers[name], max_grad_norm)
    return stats


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def micro_batches(rows: Sequence[dict], batch_size: int, collate, device) -> list[dict]:
    """``rows`` cut into collated micro-batches of ``batch_size`` rows, in order, on ``device``."""
    return [to_device(collate(list(rows[j : j + batch_size])), device) for j in range(0, len(rows), batch_size)]


def shard_eval_batches(rows: Sequence[dict], collate, batch_size: int, device):
    """This process's share of ``rows`` as collated batches ``(batch, real)`` on ``device``: every process
    yields as many (:func:`rlhf.distributed.shard_for_eval`); the stats of ``real=False`` batches are dropped,
    and the callers sum the rest over the processes (:func:`rlhf.distributed.reduce_stats`)."""
    for part, real in distributed.shard_for_eval(rows, batch_size):
        yield to_device(collate(list(part)), device), real


# ---------------------------------------------------------------------------------------------------- the loop


@dataclass
class StepContext:
    """What the loop hands a stage's step function."""

    step: int  # 0-based index of this step
    rows: list[dict]  # the rows this process reads in this step, in order (the data order is the loop's)
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
    rows_per_step: int  # rows one step reads, over all processes (each reads its contiguous 1/W)
    step: Callable[[StepContext], dict]  # returns the stats of the whole step (over all processes)
    save_final: Callable[[Path, dict], None]  # (directory, unsharded models by name): writes the final model(s);
    # run on rank 0 only
    evaluate: Callable[[], dict] | None = None  # held-out metrics, run in eval mode without gradients, on every
    # process (each evaluates its share and reduces)
    plain_models: Callable[[], dict] | None = None  # builds unsharded CPU copies of ``models`` (same names and
    # parameter names): on many processes rank 0 loads the gathered weights into them for ``save_final``
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
        normalizer = max(int(distributed.all_reduce([sum(count_fn(b) for b in batches)]).item()), 1)
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


class _NoLogger:
    """The metrics logger of processes other than rank 0."""

    def log(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def resume_from(ckpt: Path, stage: Stage, optimizers: dict, schedulers: dict, cfg) -> tuple[int, dict]:
    """Load checkpoint ``ckpt`` into the stage's models, the optimizers, schedules and stage state; returns
    ``(step, totals)``. Checkpoints of the single-model format resume on one process only."""
    models = stage.models
    if is_single_model(ckpt):
        if distributed.context().world > 1:
            raise UserError(f"{ckpt} was written before runs could span processes: resume it on one process")
        state = upgrade_state(load_checkpoint(ckpt, _checkpointed(models)), list(models))  # restores RNG states
        for name in models:
            optimizers[name].load_state_dict(state["optimizers"][name])
    else:
        state = load_training_checkpoint(ckpt, models, optimizers)
        if not state["rng_restored"]:  # another process count: random streams restart from (seed, step)
            seed_everything(cfg.seed + state["step"], cfg.num_threads)
            log(
                f"{ckpt.parent.parent.name}: {ckpt} was written on {state.get('world_size')} process(es), this run "
                f"has {distributed.context().world}: data order, weights and optimizer states resume exactly; the "
                "random streams (dropout) restart from the seed and step"
            )
    for name in models:
        schedulers[name].load_state_dict(state["schedulers"][name])
    for name, obj in stage.state.items():
        obj.load_state_dict(state[name])
    return state["step"], dict(state["totals"])


def export_final(stage: Stage, path: Path) -> None:
    """``stage.save_final`` on rank 0 with unsharded models: the trained ones themselves on one process, else
    copies from ``stage.plain_models()`` holding the gathered weights (every process takes part in the gather)."""
    models = stage.models
    if not any(distributed.is_sharded(m) for m in models.values()):
        if distributed.context().main:
            stage.save_final(path, models)
        distributed.barrier()
        return
    if stage.plain_models is None:
        raise ValueError("a stage with sharded models needs plain_models to write its final model")
    states = {name: distributed.full_state_dict(model) for name, model in models.items()}
    if distributed.context().main:
        plain = stage.plain_models()
        for name, model in plain.items():
            model.load_state_dict(states[name])
        stage.save_final(path, plain)
    distributed.barrier()


def run(cfg, stage: Stage, *, resume: bool = False) -> dict:
    """Train ``stage`` for the configured steps: data order, steps, schedules, logging, evaluation, checkpoints,
    exact resume, progress, final export and plots. Returns the last logged train metrics (``train/...``) and
    the final evaluation (``eval/...``), the same on every process."""
    from tqdm.auto import tqdm

    dist_ctx = distributed.context()
    out_dir = Path(cfg.output_dir)
    steps = total_steps(len(stage.rows), stage.rows_per_step, cfg, stage.rows_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = stage.models
    device = next(next(iter(models.values())).parameters()).device
    autocast = autocast_context(cfg, device)
    optimizers = {name: build_optimizer(model, cfg) for name, model in models.items()}
    schedulers = {name: build_scheduler(opt, cfg, steps) for name, opt in optimizers.items()}

    start, totals = 0, {}
    found = latest_checkpoint(out_dir) if resume else None
    found = distributed.broadcast_object(None if found is None else str(found))  # rank 0 decides
    if found is not None:
        start, totals = resume_from(Path(found), stage, optimizers, schedulers, cfg)
        log(f"{out_dir.name}: resumed from {found} (step {start} of {steps})")
    if dist_ctx.main:
        save_config(cfg, out_dir / "config.yaml")
    logger = MetricsLogger(out_dir, resume_step=start, tensorboard=cfg.tensorboard) if dist_ctx.main else _NoLogger()

    def evaluate() -> dict:
        return run_eval(list(models.values()), stage.evaluate)

    for model in models.values():
        model.train()
    window, last_logged, t0, t_start = [], {}, time.perf_counter(), time.perf_counter()
    first = next(iter(schedulers.values()))
    show_bar = cfg.progress and dist_ctx.main
    bar = tqdm(total=steps, initial=start, disable=not show_bar, desc=out_dir.name, leave=True)
    for step in range(start, steps):
        indices, _ = step_rows(len(stage.rows), stage.rows_per_step, cfg.seed, step)
        mine = indices[distributed.rank_slice(len(indices))]
        detailed = (step + 1) % cfg.logging_steps == 0 or step + 1 == steps
        ctx = StepContext(step, [stage.rows[i] for i in mine], models, optimizers, autocast, device, detailed)
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
                "schedulers": {name: sch.state_dict() for name, sch in schedulers.items()},
                "totals": totals,
                "config": asdict(cfg),
                **{name: obj.state_dict() for name, obj in stage.state.items()},
            }
            save_training_checkpoint(out_dir, step + 1, models, optimizers, state, keep=cfg.keep_checkpoints)
    bar.close()

    final = {f"train/{k}": v for k, v in last_logged.items()}
    if stage.evaluate is not None:
        metrics = evaluate()
        logger.log(steps, metrics, split="eval")
        final.update({f"eval/{k}": v for k, v in metrics.items()})
    logger.close()
    export_final(stage, out_dir / "final")
    if cfg.plots and dist_ctx.main:
        plot_metrics(out_dir / "metrics.csv", out_dir / "plots")
    log(summary_line(out_dir, final, stage.show, steps - start, time.perf_counter() - t_start))
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
