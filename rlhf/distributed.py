"""Training on many processes with torchrun and torch.distributed: FSDP2 sharding, global batches, reductions.

``torchrun --nproc_per_node N -m rlhf <stage> ...`` starts N copies of a stage; torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) is all this module reads. There is no launcher or
communication layer here: process groups, sharding and checkpoints are torch.distributed's own.

- ``distributed=auto`` (the default) is ``fsdp2`` under torchrun with more than one process, else ``none``.
  ``fsdp2``: trained models are sharded with ``fully_shard`` per decoder layer, then the root; frozen models
  (reference, reward model) too, unless ``shard_frozen=false`` keeps a full copy on every process. ``ddp``: the same
  FSDP2 machinery on a ``(world, 1)`` replicate x shard mesh, i.e. every process holds full parameters and
  gradients are all-reduced.
- Backend: nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. On CUDA with
  ``mixed_precision`` ``auto``/``bf16`` the sharded models gather bf16 parameters and reduce gradients in fp32
  (``MixedPrecisionPolicy``); the fp32 master weights and optimizer states stay sharded.
- Everything that touches a sharded model's parameters runs as one of its forwards: ``model(...)``,
  :func:`forward_call` (the fused LM-head adapter uses it), the critic's ``token_values``, or generation inside
  :func:`gathered`.
- Every process runs the same number of forwards of a sharded model (their all-gathers are collectives):
  training micro-batches are equal by construction and evaluation pads the shorter shards
  (:func:`shard_for_eval`).

Gradient scale: a loss is divided by the item count of the whole global update (see :mod:`rlhf.train`), so the
global gradient is the sum of the processes' gradients; FSDP2 averages them, so :func:`grad_scale` (the world size)
multiplies each loss before backward.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MODES = ("auto", "fsdp2", "ddp", "none")
TIMEOUT_MINUTES = 30  # a collective that waits longer than this fails instead of hanging forever


@dataclass(frozen=True)
class Context:
    """The processes of this run: ``mode`` (``fsdp2 | ddp | none``), this process's ``rank`` among ``world``,
    its ``local_rank`` on the node and ``device``; ``shard_frozen``: frozen models sharded too (fsdp2)."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    shard_frozen: bool = True
    bf16_params: bool = False  # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on the sharded models

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes the final model."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode in ("fsdp2", "ddp")


_CONTEXT = Context()


def context() -> Context:
    """The processes of the current run (one process, ``mode="none"``, until :func:`setup` says otherwise)."""
    return _CONTEXT


def launched_world() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(mode: str, world: int) -> str:
    """``auto`` -> ``fsdp2`` with more than one process, else ``none``; errors for impossible combinations."""
    from .errors import UserError

    if mode not in MODES:
        raise UserError(f"distributed={mode!r}: choose from {', '.join(MODES)}")
    if mode == "auto":
        return "fsdp2" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise UserError(
            f"distributed=none, but torchrun started {world} processes: each would train alone on the same data "
            "(use distributed=auto, fsdp2 or ddp)"
        )
    if mode != "none" and "RANK" not in os.environ:
        raise UserError(f"distributed={mode} needs the torchrun environment: torchrun --nproc_per_node N -m rlhf ...")
    return mode


def setup(cfg) -> Context:
    """Join the process group of this torchrun job (once per process) and pick this process's device.

    ``cfg``: a stage config (``distributed``, ``shard_frozen``, ``device``, ``mixed_precision``). Without torchrun
    (or ``distributed=none`` on one process) nothing is initialised and the device is ``cfg.device``'s.
    """
    global _CONTEXT
    from .models import resolve_device

    world = launched_world()
    mode = resolve_mode(getattr(cfg, "distributed", "auto"), world)
    if mode == "none":
        _CONTEXT = Context(device=resolve_device(cfg.device))
        return _CONTEXT
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES), **kwargs)
    bf16 = device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
    _CONTEXT = Context(mode, rank, world, local_rank, device, getattr(cfg, "shard_frozen", True), bf16)
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (at the end of the CLI command); a no-op on one process."""
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = Context(device=_CONTEXT.device)


# ---------------------------------------------------------------------------------------------------- sharding


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes, LoRA and reward-model
    wrappers looked through), outermost first; FSDP2 shards each as one unit."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _call_in_forward(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def shard(model: nn.Module, ctx: Context | None = None) -> nn.Module:
    """``model`` sharded with FSDP2 as the run is configured (per decoder layer, then the root); unchanged on one
    process. ``forward_call`` and ``token_values`` become forwards of the root (parameters gathered for them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    ctx = ctx or _CONTEXT
    if not ctx.sharded:
        return model.to(ctx.device)
    check_identical(model)
    if ctx.mode == "ddp":
        mesh = init_device_mesh(ctx.device.type, (ctx.world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(ctx.device.type, (ctx.world,), mesh_dim_names=("shard",))
    options: dict[str, Any] = {"mesh": mesh}
    if ctx.bf16_params:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    model._rlhf_forward_call = _call_in_forward
    register_fsdp_forward_method(model, "_rlhf_forward_call")
    if hasattr(model, "token_values"):
        register_fsdp_forward_method(model, "token_values")
    return model


def check_identical(model: nn.Module) -> None:
    """Every process must start from the same weights (each keeps its own shard of its own copy): compare a
    fingerprint of all parameters and buffers over the processes; RuntimeError when they differ (an unseeded
    initialisation, a different checkpoint on one node...)."""
    local = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):  # one fp64 copy at a time
            values = tensor.detach().double()
            local += torch.stack([values.sum(), values.square().sum()]).cpu()
    high, low = all_reduce(local, "max"), all_reduce(local, "min")
    if not torch.equal(high, low):
        raise RuntimeError(
            f"{type(model).__name__} differs between the processes before sharding (parameter sums "
            f"{low.tolist()} .. {high.tolist()}): every process must build the same model (same seed, same files)"
        )


def place_frozen(model: nn.Module, ctx: Context | None = None) -> nn.Module:
    """A frozen model (reference, reward model): sharded like the trained ones, or with ``shard_frozen=false`` a
    full copy on this process's device."""
    ctx = ctx or _CONTEXT
    if ctx.sharded and ctx.shard_frozen:
        return shard(model, ctx)
    return model.to(ctx.device)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def forward_call(model: nn.Module, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` run as a forward of ``model``: for a sharded model its parameters (the LM head's
    included) are gathered during the call and its gradients reduce-scattered in backward. Without gradients the
    root's gathered parameters are freed afterwards. On an unsharded model this is just the call.

    Everything that reads a sharded model's weights outside ``model(...)`` goes through here, and one loss
    computation is one call (two calls on the same root under autograd would reduce its gradients early).
    """
    if not is_sharded(model):
        return fn(*args, **kwargs)
    out = model._rlhf_forward_call(fn, *args, **kwargs)
    if not torch.is_grad_enabled():
        model.reshard()
    return out


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Keep every parameter of a sharded ``model`` gathered for the duration (generation: many short forwards,
    each of which would otherwise all-gather every layer; also lets processes run different numbers of
    forwards). Freed again on exit. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        if unit is not model:
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            if unit is not model:
                unit.set_reshard_after_forward(True, recurse=False)


def grad_scale(models: Sequence[nn.Module]) -> int:
    """What a loss is multiplied by before backward: the world size when the models are sharded (FSDP2 averages
    the processes' gradients, the losses are already divided by the global item count), else 1."""
    return _CONTEXT.world if any(is_sharded(m) for m in models) else 1


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``model`` on CPU, on rank 0 (``{}`` elsewhere); every process calls it."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if _CONTEXT.main else {}


# ---------------------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: Sequence[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` (floats or a tensor) reduced over the processes (``sum | max | min``) as float64 on CPU (the
    values themselves on one process). Runs on the process group's device."""
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().clone().cpu()
    if not dist.is_initialized() or _CONTEXT.world == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    device = _CONTEXT.device if _CONTEXT.device.type == "cuda" else torch.device("cpu")
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=ops[op])
    return on_device.cpu()


REPLICATED_SUFFIXES = ("grad_norm",)  # the same on every process already (computed from all shards)


def reduce_stats(stats: dict, replicated: Sequence[str] = ()) -> dict:
    """Stats of one process -> the run's: ``*/min`` by min, ``*/max`` by max, keys ending in ``grad_norm`` and
    those in ``replicated`` as they are, every other key summed (a micro-batch's stats are its share of the whole
    update's normaliser). Every process must pass the same keys."""
    if _CONTEXT.world == 1:
        return {k: float(v) for k, v in stats.items()}
    keys = list(stats)  # the same order on every process (the same code made them)
    summed = [k for k in keys if not k.endswith(("/min", "/max")) and not _kept(k, replicated)]
    maxed = [k for k in keys if k.endswith("/max")]
    mined = [k for k in keys if k.endswith("/min")]
    out = {k: float(stats[k]) for k in keys}
    for names, op in ((summed, "sum"), (maxed, "max"), (mined, "min")):
        if names:
            for key, value in zip(names, all_reduce([float(stats[k]) for k in names], op).tolist(), strict=True):
                out[key] = value
    return out


def neutral_stats(stats: dict) -> dict:
    """Stats with the keys of ``stats`` that change nothing when reduced with others: 0 for summed keys, +inf for
    ``*/min``, -inf for ``*/max`` (for the padding batches of :func:`shard_for_eval`)."""
    out = {}
    for key in stats:
        out[key] = float("inf") if key.endswith("/min") else float("-inf") if key.endswith("/max") else 0.0
    return out


def _kept(key: str, replicated: Sequence[str]) -> bool:
    return key in replicated or key.endswith(REPLICATED_SUFFIXES)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (the same shape on all) concatenated along dim 0 in rank order."""
    if not dist.is_initialized() or _CONTEXT.world == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    local = (tensor.to(torch.uint8) if is_bool else tensor).contiguous()
    if _CONTEXT.device.type == "cuda":
        local = local.to(_CONTEXT.device)
    parts = [torch.empty_like(local) for _ in range(_CONTEXT.world)]
    dist.all_gather(parts, local)
    out = torch.cat(parts).to(tensor.device)
    return out.bool() if is_bool else out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order."""
    if not dist.is_initialized() or _CONTEXT.world == 1:
        return [obj]
    out: list[Any] = [None] * _CONTEXT.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not dist.is_initialized() or _CONTEXT.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------------- data


def rank_slice(n: int, ctx: Context | None = None) -> slice:
    """This process's contiguous share of ``n`` items that split evenly over the processes."""
    ctx = ctx or _CONTEXT
    if n % ctx.world:
        raise ValueError(f"{n} items do not split evenly over {ctx.world} processes")
    size = n // ctx.world
    return slice(ctx.rank * size, (ctx.rank + 1) * size)


def shard_for_eval(rows: Sequence, batch_size: int, ctx: Context | None = None) -> list[tuple[list, bool]]:
    """This process's evaluation batches of ``rows``: ``[(rows, real)]``, the same number on every process.

    Rows are split into contiguous shards of ``ceil(n / world)``; a process whose shard runs out early repeats
    its first batch (or the first row) with ``real=False``, so every process runs as many forwards (the shards'
    all-gathers are collectives); callers drop the stats of unreal batches.
    """
    ctx = ctx or _CONTEXT
    n = len(rows)
    per = -(-n // ctx.world)
    mine = list(rows[ctx.rank * per : (ctx.rank + 1) * per])
    count = -(-per // batch_size)
    batches = [(mine[i : i + batch_size], True) for i in range(0, len(mine), batch_size)]
    filler = batches[0][0] if batches else list(rows[:1])
    while len(batches) < count:
        batches.append((filler, False))
    return batches
