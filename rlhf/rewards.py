"""Reward functions for group-sampling RL: the built-in task's gold reward, a trained reward model, or a user's
Python function, combined by weights.

A spec names one function:

- ``gold``: the built-in tasks' programmatic reward (verifiable: a program, not a model): for a row with an
  ``answer`` column (the built-in ``builtin:prompt`` data) 1.0 when the completion is that answer (whitespace
  aside) and 0.0 otherwise; for any other row the reviews task's :func:`rlhf.task.gold_reward`;
- a directory: a saved :class:`rlhf.models.RewardModel` (its score of prompt + completion);
- ``module:function``: ``fn(prompts, completions, **columns) -> list[float | None]`` imported from ``module`` (on
  ``sys.path``, e.g. the working directory); ``prompts`` and ``completions`` are lists of strings and each extra
  column of the dataset is passed as a keyword list aligned with them. ``None`` marks a sample the function does
  not apply to.

The reward of a sample is the weighted sum of the functions that apply to it (0 when none does). A function that
raises, returns a list of the wrong length or a value that is neither a number nor None stops the run with a
:class:`rlhf.errors.UserError` naming it and the first bad row.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


@dataclass
class RewardFunction:
    name: str  # the spec, as in metric names rewards/<name>/mean
    weight: float
    fn: Callable[[list, list, dict, dict | None], list]  # (prompts, completions, columns, rollout batch) -> values


def _gold(prompts, completions, columns, batch):
    from .qa_task import is_correct
    from .task import gold_reward

    answers = columns.get("answer") or [None] * len(prompts)
    return [
        gold_reward(p, c) if a is None else float(is_correct(c, a))
        for p, c, a in zip(prompts, completions, answers, strict=True)
    ]


def _import(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()  # a module in the working directory, also under the `rlhf` script (whose sys.path lacks it)
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"reward function {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward function {spec!r}: module {module_name!r} has no function {attr!r}")
    return lambda prompts, completions, columns, batch: fn(prompts, completions, **columns)


def _reward_model(path: str, load: Callable) -> Callable:
    model = load(path)

    def score_fn(prompts, completions, columns, batch):
        from .ppo_core import score

        return score(model, batch).float().cpu().tolist()

    return score_fn


def parse_weights(text: str | None, n: int) -> list[float]:
    if text is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"reward_weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise UserError(f"reward_weights has {len(weights)} values for {n} reward functions")
    return weights


def build_reward_functions(specs: str, weights: str | None, load_reward_model: Callable) -> list[RewardFunction]:
    """The reward functions of the comma-separated ``specs`` (module docstring) with their ``weights``;
    ``load_reward_model(path)`` loads a reward model directory (frozen, on the run's device)."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise UserError("reward_funcs is empty: name at least one reward function")
    out = []
    for name, weight in zip(names, parse_weights(weights, len(names)), strict=True):
        if name == "gold":
            fn = _gold
        elif Path(name).is_dir():
            fn = _reward_model(name, load_reward_model)
        elif ":" in name:
            fn = _import(name)
        else:
            raise UserError(
                f"reward function {name!r} is neither 'gold', an existing reward model directory, nor module:function"
            )
        out.append(RewardFunction(name, weight, fn))
    return out


def _checked(rf: RewardFunction, values: object, n: int) -> list[float]:
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise UserError(f"reward function {rf.name!r} returned {got} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
            raise UserError(f"reward function {rf.name!r}: row {i} is {v!r}, not a number or None")
        else:
            out.append(float(v))
    return out


def _first_failing_row(rf: RewardFunction, prompts, completions, columns) -> int | None:
    """The first row on which ``rf`` raises when called on that row alone (None: each row alone passes)."""
    for i in range(len(prompts)):
        try:
            rf.fn(prompts[i : i + 1], completions[i : i + 1], {k: v[i : i + 1] for k, v in columns.items()}, None)
        except Exception:
            return i
    return None


def compute_rewards(
    functions: Sequence[RewardFunction], prompts: list[str], completions: list[str], columns: dict, batch: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(rewards (B,), {name: (B,) values, NaN where not applicable})``: the weighted sum over the functions that
    apply to each sample. ``columns``: the dataset's extra columns, lists aligned with ``prompts``."""
    per = {}
    for rf in functions:
        try:
            values = rf.fn(prompts, completions, columns, batch)
        except UserError:
            raise
        except Exception as err:  # a user's function: name it and the first row it fails on
            row = _first_failing_row(rf, prompts, completions, columns)
            where = (
                f" at row {row} (prompt {prompts[row]!r}, completion {completions[row]!r})" if row is not None else ""
            )
            raise UserError(f"reward function {rf.name!r} raised {type(err).__name__}: {err}{where}") from err
        per[rf.name] = torch.tensor(_checked(rf, values, len(prompts)), dtype=torch.float32)
    total = torch.zeros(len(prompts), dtype=torch.float32)
    for rf in functions:
        total += torch.nan_to_num(per[rf.name] * rf.weight, nan=0.0)
    return total, per


def gold_function(spec: str | None, rows: Sequence[dict] = ()) -> Callable[[str, str], float]:
    """A task's gold reward as ``gold(prompt, response) -> float``: the built-in reviews task's
    (:func:`rlhf.task.gold_reward`) when ``spec`` is None, else the user's ``module:function`` with the signature
    of a reward function (module docstring), called on one sample with its prompt row's other columns, found by the
    prompt text among ``rows``. A gold reward scores every sample: None, a non-number or an exception is a
    :class:`UserError` naming the function and the sample; so is a prompt text that two rows give different
    columns (the sample could not tell which to pass)."""
    if spec is None:
        from .task import gold_reward

        return gold_reward
    try:
        fn = _import(spec)
    except UserError as err:
        raise UserError(str(err).replace("reward function", "gold reward", 1)) from None
    columns_of: dict[str, dict] = {}
    for row in rows:
        columns = {k: v for k, v in row.items() if k != "prompt"}
        if columns_of.setdefault(row["prompt"], columns) != columns:
            raise UserError(f"gold reward {spec!r}: the prompt {row['prompt']!r} comes with different columns in "
                            "two rows, so its samples cannot be scored unambiguously")  # fmt: skip
    rf = RewardFunction(spec, 1.0, fn)

    def gold(prompt: str, response: str) -> float:
        columns = {k: [v] for k, v in columns_of.get(prompt, {}).items()}
        try:
            values = fn([prompt], [response], columns, None)
            (value,) = _checked(rf, values, 1)
        except UserError as err:
            raise UserError(str(err).replace("reward function", "gold reward", 1)) from None
        except Exception as err:
            raise UserError(f"gold reward {spec!r} raised {type(err).__name__}: {err} (prompt {prompt!r}, "
                            f"response {response!r})") from err  # fmt: skip
        if math.isnan(value):
            raise UserError(f"gold reward {spec!r} returned None for prompt {prompt!r}, response {response!r}: a "
                            "gold reward must score every sample")  # fmt: skip
        return value

    return gold
