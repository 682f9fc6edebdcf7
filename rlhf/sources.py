"""Loading data sets for the training layer: local files (JSON Lines, JSON, Parquet, CSV), directories, hub data
sets and the built-in data, with the place of every row as the user counts it (file and line or row), so that
:mod:`rlhf.data` can name it in its errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import MissingPathError, UserError, looks_local

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN = "builtin:"
KINDS = ("sft", "preference", "prompt")  # the kinds of data: builtin:<kind>, and the stages' formats


@dataclass(frozen=True)
class Origin:
    """Where the rows of a loaded dataset come from, so that an error names a row as the user counts it.

    source: the dataset as the user named it (None: an in-memory dataset). spans: the (split, rows) parts that were
    concatenated, in order (empty: position i is row i). positions: the positions of that concatenation that were
    kept, e.g. by `split_holdout` (None: all). jsonl: the JSON Lines file whose non-blank lines are the rows.
    """

    source: str | None = None
    spans: tuple[tuple[str, range], ...] = ()
    positions: Sequence[int] | None = None
    jsonl: Path | None = None

    def select(self, positions: Sequence[int]) -> Origin:
        """The origin of `ds.select(positions)`."""
        if self.positions is not None:
            positions = [self.positions[p] for p in positions]
        return replace(self, positions=positions)

    def where(self, index: int) -> str:
        """Position `index` as the user counts it: "a.jsonl, line 3", "a.parquet, row 2", "dir split 'test', row 0"."""
        position = index if self.positions is None else self.positions[index]
        split, row = None, position
        for name, rows in self.spans:
            if position < len(rows):
                split, row = name, rows[position]
                break
            position -= len(rows)
        dataset = [self.source] if self.source else []
        if split is not None and (len(self.spans) > 1 or split != "train"):
            dataset.append(f"split {split!r}")
        line = _jsonl_line(self.jsonl, row) if self.jsonl is not None else None
        place = f"row {row}" if line is None else f"line {line}"
        return ", ".join([" ".join(dataset), place] if dataset else [place])


_ORIGIN = "_rlhf_origin"  # the attribute that carries a Dataset's Origin (a select() returns a Dataset without it)


def origin_of(ds) -> Origin | None:
    """The :class:`Origin` attached to `ds` by `load_rows`/`split_holdout` (None for a list or another Dataset)."""
    return getattr(ds, _ORIGIN, None)


def _with_origin(ds, origin: Origin):
    setattr(ds, _ORIGIN, origin)
    return ds


def _jsonl_line(path: Path, row: int) -> int | None:
    """The 1-based line of row `row` (0-based) of a JSON Lines file, whose blank lines hold no row."""
    with open(path, "rb") as f:
        count = 0
        for number, line in enumerate(f, 1):
            if line.strip():
                if count == row:
                    return number
                count += 1
    return None


def _is_json_lines(path: Path) -> bool:
    """True for a .jsonl file, or a .json file whose first non-blank line is a JSON object on its own."""
    if path.suffix.lower() == ".jsonl":
        return True
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _bad_json(path: Path) -> tuple[int, str] | None:
    """(1-based line, what is wrong) of the first line of a JSON Lines file that is not one JSON object, or where
    a .json document fails to parse; None when the file parses."""
    if not _is_json_lines(path):
        try:
            json.loads(path.read_bytes())
        except json.JSONDecodeError as err:
            return err.lineno, f"not valid JSON ({err.msg} at column {err.colno})"
        except ValueError:
            return None
        return None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.rstrip(b"\r\n"))
            except json.JSONDecodeError as err:
                return number, f"not valid JSON ({err.msg} at column {err.colno})"
            except ValueError:
                return number, "not UTF-8 text"
            if not isinstance(value, dict):
                return number, f"expected a JSON object {{...}} per line, got {type(value).__name__}"
    return None


def _looks_like_path(source: str) -> bool:
    """True when `source` is meant as a local path rather than a hub name ("org/name")."""
    return looks_local(source) or Path(source).suffix.lower() in FILE_BUILDERS or os.path.exists(source)


def check_source(source: str, option: str | None = None) -> None:
    """MissingPathError when `source` is meant as a local path and does not exist; UserError for an unknown
    built-in kind. `option` (the config option that named it) prefixes the message. Reads nothing."""
    if source.startswith(BUILTIN):
        if source[len(BUILTIN) :] not in KINDS:
            kinds = ", ".join(BUILTIN + k for k in KINDS)
            raise UserError(f"unknown built-in data kind {source[len(BUILTIN) :]!r}; expected {kinds}", where=option)
    elif _looks_like_path(source) and not Path(source).expanduser().exists():
        path = "path" if option else "dataset path"
        raise MissingPathError(f"{path} {source!r} does not exist", where=option)


def _select_split(splits: dict, split: str, source: str):
    """(dataset, spans): `split` ("train", "train[:90%]", "train[10:20]+test"...) from a dict of split name ->
    Dataset, and the (split name, row range) parts it concatenates."""
    import datasets

    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()})
    except ValueError as err:
        raise UserError(f"cannot select split {split!r} (available: {', '.join(splits)}): {err}", where=source) from err
    spans = tuple((ins.splitname, range(ins.from_, ins.to)) for ins in instructions)
    parts = [splits[name].select(rows) for name, rows in spans]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), spans


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or log lines from `datasets` while a local file loads (in moments): a file that does not
    parse is reported once, as a UserError, instead of a "Failed to load JSON" log line and then the error."""
    import datasets

    enabled, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if enabled:
            datasets.enable_progress_bars()


def _read_file(path: Path, source: str):
    """The rows of one data file; a file that does not parse is a UserError naming its first bad line."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"unknown data file type {path.suffix!r}; expected {', '.join(FILE_BUILDERS)}", where=source)
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except (ValueError, DatasetGenerationError) as err:
        bad = _bad_json(path) if builder == "json" else None
        if bad is not None:
            raise UserError(bad[1], where=f"{source}, line {bad[0]}") from err
        raise UserError(f"cannot be read as {path.suffix} data: {err}", where=source) from err


def load_rows(source: str, split: str = "train", *, config_name: str | None = None):
    """A `datasets.Dataset` from `source`, carrying its :class:`Origin` (see `origin_of`) for error messages.

    source: "builtin:sft" | "builtin:preference" | "builtin:prompt" (one split, "train"); a local file by extension
    (.jsonl/.json, .parquet, .csv; one split, "train"); a local directory (a dataset saved with `save_to_disk`, or
    data files that `datasets.load_dataset(dir)` understands); otherwise a hub dataset name loaded with
    `datasets.load_dataset(source, config_name, split=split)`. `split` may use slicing ("train[:90%]").
    Raises MissingPathError (a FileNotFoundError) for a missing local path, UserError (a ValueError) for an unknown
    builtin kind or split, an unknown file type or a file that does not parse (naming its first bad line).
    """
    import datasets

    check_source(source)
    if source.startswith(BUILTIN):
        from rlhf.tiny import builtin_rows

        splits, jsonl = {"train": datasets.Dataset.from_list(builtin_rows(source[len(BUILTIN) :]))}, None
    elif not _looks_like_path(source):
        try:
            ds = datasets.load_dataset(source, config_name, split=split)
        except (FileNotFoundError, ConnectionError) as err:
            raise UserError(f"not a local path, and not loadable from the hub: {err}", where=source) from err
        return _with_origin(ds, Origin(source, ((split, range(len(ds))),)))
    else:
        path = Path(source).expanduser()
        jsonl = path if path.is_file() and path.suffix.lower() in (".jsonl", ".json") and _is_json_lines(path) else None
        with _quiet_datasets():
            if path.is_file():
                splits = {"train": _read_file(path, source)}
            elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # from save_to_disk
                saved = datasets.load_from_disk(str(path))
                splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
            else:
                splits = dict(datasets.load_dataset(str(path), config_name))
    ds, spans = _select_split(splits, split, source)
    return _with_origin(ds, Origin(source, spans, jsonl=jsonl))


def split_holdout(ds, fraction: float, seed: int):
    """(train, eval): a deterministic random `fraction` of the rows (at least one when fraction > 0) held out.

    Both keep the original row order, and (a Dataset) its origin, so errors still name the row of the file. Works
    on a `datasets.Dataset` or a list of rows; fraction 0 gives an empty eval set.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(ds)
    n_eval = math.ceil(n * fraction)
    if n_eval >= n and n_eval > 0:
        raise UserError(f"holdout fraction {fraction} of {n} rows leaves no training rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    if isinstance(ds, list):
        return [ds[i] for i in train_idx], [ds[i] for i in eval_idx]
    origin = origin_of(ds) or Origin()
    return tuple(_with_origin(ds.select(idx), origin.select(idx)) for idx in (train_idx, eval_idx))
