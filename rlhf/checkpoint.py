"""Crash-safe training checkpoints: weights, trainer state and RNG states, for bitwise-exact resumption.

Layout: ``{output_dir}/checkpoints/step-{step:08d}/`` holding ``model.safetensors`` (the full state_dict),
``trainer_state.pt`` (the caller's dict plus ``"rng"``) and ``COMPLETE`` (written last). A checkpoint is written
into ``.tmp-step-{step:08d}-{pid}``, fsynced, then renamed into place, so a crash at any point leaves every earlier
complete checkpoint intact; ``latest_checkpoint`` only ever returns a directory with ``COMPLETE``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
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


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Load the weights at `path` into `model` (strict), restore the RNG states and return the saved state dict.

    Raises FileNotFoundError for a missing checkpoint or file, ValueError for an incomplete, corrupt or
    mismatched one.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete (no {COMPLETE} marker): it was not fully written")
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {name}")
    try:
        load_model(model, str(path / MODEL_FILE), strict=True)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: cannot read {MODEL_FILE} ({e})") from None
    except RuntimeError as e:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: {e}") from None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {str(path)!r}: cannot read {STATE_FILE} ({first_line})") from None
    if "rng" in state:
        set_rng_state(state["rng"])
    return state
