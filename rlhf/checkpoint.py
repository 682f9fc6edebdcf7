"""Crash-safe training checkpoints: weights, optimizer states, trainer state and RNG states, for exact resumption.

Training checkpoints (:func:`save_training_checkpoint`, what the training loop writes, on one process or many):
``{output_dir}/checkpoints/step-{step:08d}/`` holding

- ``weights/``: every trained model's parameters and optimizer tensors, written with
  ``torch.distributed.checkpoint`` in safetensors files (``HuggingFaceStorageWriter``): one file per process when
  sharded, each with its own shards, so a checkpoint written by N processes loads on M (the reader reshards);
- ``trainer_state.pt`` (rank 0): the loop's state (step, schedules, optimizer hyper-parameters, stage state,
  config), read back with ``weights_only=True``;
- ``rng/rank-NNNNN.pt``: each process's RNG states; restored when resuming on the same number of processes;
- ``COMPLETE``, written by rank 0 after every process has finished writing (a barrier), last.

A checkpoint is written into ``.tmp-step-{step:08d}``, fsynced, then renamed into place, so a crash at any point
(of any process) leaves every earlier complete checkpoint intact; ``latest_checkpoint`` only ever returns a
directory with ``COMPLETE``.

The single-model format (:func:`save_checkpoint`: ``model.safetensors`` with the full state_dict,
``trainer_state.pt`` with ``"rng"``, ``COMPLETE``) is what the loop wrote before it ran on many processes; those
checkpoints still resume on one process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_TMP_PREFIX = ".tmp-"


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch CPU (and CUDA, when available) RNG states as tensors and plain python values.

    Every value loads under ``torch.load(..., weights_only=True)``.
    """
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by `rng_state` (CUDA states only when CUDA is available here)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_step(path: str | Path) -> int | None:
    """``.../step-00000120`` -> 120; None for any other name."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of `output_dir`, oldest step first (temporary and incomplete ones are skipped)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


_SCALARS = (str, int, float, bool, type(None), bytes, complex, torch.dtype, torch.device)
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, set, torch.Size)


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ValueError naming the first value `torch.load(weights_only=True)` could not read back.

    Allowed: tensors, str/int/float/bool/None, torch dtypes and devices, and dicts/lists/tuples of these. Types are
    matched exactly: numpy scalars (``np.float64`` subclasses float), namedtuples and defaultdicts are rejected.
    """
    if type(obj) in _MAPPINGS:
        for key, value in obj.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in _SEQUENCES:
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not (isinstance(obj, torch.Tensor) or type(obj) in _SCALARS):
        raise ValueError(
            f"{where} is a {type(obj).__name__}; checkpoint state must hold tensors and plain python values"
        )


def _write_files(tmp: Path, step: int, model: torch.nn.Module, state: dict) -> None:
    """Write weights, state and finally COMPLETE into `tmp`, each fsynced."""
    save_model(model, str(tmp / MODEL_FILE))
    _fsync_file(tmp / MODEL_FILE)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / COMPLETE, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (same step, earlier run) is first moved aside, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, step: int, keep: int) -> None:
    """After saving `step`: remove temporary and incomplete dirs (left by crashes), checkpoints of later steps (an
    abandoned earlier run) and all but the newest `keep` checkpoints up to `step` (keep <= 0 keeps them all)."""
    root = Path(output_dir) / CHECKPOINTS
    for path in root.iterdir():
        is_step = checkpoint_step(path) is not None
        if path.is_dir() and (path.name.startswith(_TMP_PREFIX) or (is_step and not (path / COMPLETE).is_file())):
            shutil.rmtree(path, ignore_errors=True)
    done = list_checkpoints(output_dir)
    stale = [p for p in done if checkpoint_step(p) > step]
    older = [p for p in done if checkpoint_step(p) <= step]
    if keep > 0:
        stale += older[:-keep]
    for path in stale:
        (path / COMPLETE).unlink(missing_ok=True)  # invalid first, so a crash mid-delete leaves no half checkpoint
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, state: dict, keep: int = 2) -> Path:
    """Save ``model`` weights and ``state`` (plus ``"rng"``: `rng_state()`) as the checkpoint of ``step``.

    ``state`` must hold only tensors and plain python values (dict/list/tuple/str/int/float/bool/None), so that
    `load_checkpoint` reads it with ``weights_only=True``. Returns the checkpoint directory.
    """
    saved = {**state, "rng": rng_state()}  # captured first: nothing below draws random numbers
    check_plain(saved)
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_files(tmp, step, model, saved)
    _move_into_place(tmp, final)
    prune_checkpoints(output_dir, step, keep)
    return final


def _check_complete(path: str | Path, names: tuple[str, ...]) -> Path:
    """``path`` as a Path when it is a complete checkpoint holding ``names``; FileNotFoundError or ValueError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete (no {COMPLETE} marker): it was not fully written")
    for name in names:
        if not (path / name).exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {name}")
    return path


def _read_state(path: Path) -> dict:
    """The checkpoint's ``trainer_state.pt`` (``weights_only=True``); ValueError when it cannot be read."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {str(path)!r}: cannot read {STATE_FILE} ({first_line})") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load the weights at `path` into `model` (strict), restore the RNG states and return the saved state dict.

    Raises FileNotFoundError for a missing checkpoint or file, ValueError for an incomplete, corrupt or
    mismatched one.
    """
    path = _check_complete(path, (MODEL_FILE, STATE_FILE))
    try:
        load_model(model, str(path / MODEL_FILE), strict=True)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: cannot read {MODEL_FILE} ({e})") from None
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: {e}") from None
    state = _read_state(path)
    if "rng" in state:
        set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------------------------------------------- training


WEIGHTS_DIR = "weights"
RNG_DIR = "rng"


@contextlib.contextmanager
def _single_process_quiet(world: int):
    """On one process, silence torch.distributed.checkpoint's "no process group: one process" warning (that is
    the intent); with a process group, nothing changes."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def is_single_model(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint in the single-model format (:func:`save_checkpoint`)."""
    return (Path(path) / MODEL_FILE).is_file()


def _training_tensors(models: dict, optimizers: dict) -> tuple[dict, dict]:
    """``(tensors, parts)``: a flat name -> tensor dict of every model's state and optimizer state (the tensors
    are the live ones, so loading into them loads the models), and per model its ``(model_sd, optim_sd)``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tensors, parts = {}, {}
    for name, model in models.items():
        model_sd, optim_sd = get_state_dict(model, optimizers[name])
        parts[name] = (model_sd, optim_sd)
        for key, value in model_sd.items():
            tensors[f"{name}/{key}"] = value
        for fqn, param_state in optim_sd["state"].items():
            for key, value in param_state.items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"optimizer state {name}/{fqn}/{key} is not a tensor ({type(value).__name__})")
                tensors[f"optim/{name}/{fqn}/{key}"] = value
    return tensors, parts


def save_training_checkpoint(
    output_dir: str | Path, step: int, models: dict, optimizers: dict, state: dict, keep: int = 2
) -> Path:
    """Every process calls this: the training checkpoint of ``step`` (module docstring) of ``models`` (name ->
    module, sharded or not) and their ``optimizers`` (same names), plus ``state`` (plain values, written by rank
    0). Returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp

    from . import distributed

    ctx = distributed.context()
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    rng = rng_state()  # captured first: nothing below draws random numbers
    tensors, parts = _training_tensors(models, optimizers)
    saved = {
        **state,
        "optimizer_groups": {name: optim_sd["param_groups"] for name, (_, optim_sd) in parts.items()},
        "world_size": ctx.world,
    }
    check_plain(saved)
    if ctx.main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / RNG_DIR).mkdir(parents=True)
    distributed.barrier()
    writer = dcp.HuggingFaceStorageWriter(str(tmp / WEIGHTS_DIR), save_distributed=ctx.world > 1)
    with _single_process_quiet(ctx.world):
        dcp.save(tensors, storage_writer=writer, no_dist=ctx.world == 1)
    with open(tmp / RNG_DIR / f"rank-{ctx.rank:05d}.pt", "wb") as f:
        torch.save(rng, f)
        f.flush()
        os.fsync(f.fileno())
    if ctx.main:
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(saved, f)
            f.flush()
            os.fsync(f.fileno())
    distributed.barrier()  # every process has written its part
    if ctx.main:
        for path in (tmp / WEIGHTS_DIR).iterdir():
            _fsync_file(path)
        _fsync_dir(tmp / WEIGHTS_DIR)
        _fsync_dir(tmp / RNG_DIR)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
        prune_checkpoints(output_dir, step, keep)
    distributed.barrier()
    return final


def load_training_checkpoint(path: str | Path, models: dict, optimizers: dict) -> dict:
    """Every process calls this: load a :func:`save_training_checkpoint` directory into ``models`` and
    ``optimizers`` (resharded to this run's processes), restore this process's RNG states when the checkpoint
    was written by as many processes, and return the saved state with ``"rng_restored"`` set accordingly.

    Raises FileNotFoundError for a missing checkpoint or file, ValueError for an incomplete, corrupt or
    mismatched one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from . import distributed

    path = _check_complete(path, (WEIGHTS_DIR, STATE_FILE))
    state = _read_state(path)
    tensors, parts = _training_tensors(models, optimizers)
    try:
        reader = dcp.HuggingFaceStorageReader(str(path / WEIGHTS_DIR))
        with _single_process_quiet(distributed.context().world):
            dcp.load(tensors, storage_reader=reader, no_dist=distributed.context().world == 1)
    except Exception as e:  # DCP wraps every reader error (per rank) in CheckpointException
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = f"checkpoint {str(path)!r} does not match the models or cannot be read: {first_line}"
        raise ValueError(message) from None
    for name, (model_sd, optim_sd) in parts.items():
        optim_sd = {**optim_sd, "param_groups": state["optimizer_groups"][name]}
        set_state_dict(models[name], optimizers[name], model_state_dict=model_sd, optim_state_dict=optim_sd)
    ctx = distributed.context()
    rng_file = path / RNG_DIR / f"rank-{ctx.rank:05d}.pt"
    state["rng_restored"] = state.get("world_size") == ctx.world and rng_file.is_file()
    if state["rng_restored"]:
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def read_weights(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The full (unsharded) weights of every model in a training checkpoint, ``{model name: state_dict}`` on CPU,
    read in this process alone (whatever number of processes wrote it). Single-model-format checkpoints give
    ``{"model": state_dict}``."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if is_single_model(path):
        from safetensors.torch import load_file

        return {"model": load_file(str(path / MODEL_FILE))}
    reader = dcp.HuggingFaceStorageReader(str(path / WEIGHTS_DIR))
    metadata = reader.read_metadata()
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if not key.startswith("optim/")
    }
    with warnings.catch_warnings():  # "no process group: loading in one process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, fqn = key.split("/", 1)
        out.setdefault(name, {})[fqn] = value
    return out
