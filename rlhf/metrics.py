"""Training metrics: a wide CSV (plus TensorBoard when installed), one PNG per metric, and progress-bar helpers.

``metrics.csv`` has the columns ``step, split, <metric names...>``; a row holds one ``log`` call, and metrics a
call did not report are empty cells. A metric seen for the first time extends the header (the file is rewritten).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CSV_NAME = "metrics.csv"
_KEYS = ("step", "split")


def read_metrics(csv_path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(metric names in header order, rows as dicts of strings); rows whose step is not an integer are skipped
    (a line cut short by a crash)."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        names = [n for n in (reader.fieldnames or []) if n not in _KEYS]
        rows = [row for row in reader if _int_or_none(row.get("step")) is not None and _whole(row)]
    return names, rows


def _whole(row: dict) -> bool:
    """False for a CSV line with missing or extra cells."""
    return None not in row and None not in row.values()


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _write_csv(path: Path, names: list[str], rows: list[dict[str, Any]]) -> None:
    """Replace the CSV at `path` atomically (write a temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*_KEYS, *names], restval="")
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _summary_writer(log_dir: Path, purge_step: int | None):
    """A TensorBoard SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """Append metrics to ``{output_dir}/metrics.csv`` and to TensorBoard (tag ``split/name``) when available.

    ``resume_step=None`` starts a fresh file (an existing one is replaced); ``resume_step=k`` keeps the rows with
    ``step <= k`` of an existing file (later rows belong to the part of a killed run that is being redone).
    """

    def __init__(self, output_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(output_dir) / CSV_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            self.names, rows = read_metrics(self.path)
            rows = [row for row in rows if int(row["step"]) <= resume_step]
        _write_csv(self.path, self.names, rows)
        purge = None if resume_step is None else resume_step + 1
        self.writer = _summary_writer(Path(output_dir) / "tensorboard", purge) if tensorboard else None

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Record `metrics` (numbers or 0-d tensors) at optimizer step `step` for `split` ("train", "eval")."""
        values = {name: float(value) for name, value in metrics.items()}
        clash = [name for name in values if name in _KEYS]
        if clash:
            raise ValueError(f"metric name {clash[0]!r} is reserved for a CSV key column")
        new = [name for name in values if name not in self.names]
        row = {"step": int(step), "split": split, **values}
        if new:
            self._extend_header(new)
        with open(self.path, "a", newline="") as f:  # closed (so flushed) after every row
            csv.DictWriter(f, fieldnames=[*_KEYS, *self.names], restval="").writerow(row)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, int(step))

    def _extend_header(self, new: list[str]) -> None:
        """Rewrite the CSV with `new` metric columns appended to the header."""
        _, rows = read_metrics(self.path)
        self.names += new
        _write_csv(self.path, self.names, rows)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the CSV is closed after every row)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_name(metric: str) -> str:
    """A metric name as a safe file stem: "eval/loss" -> "eval_loss"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") or "metric"


def _series(rows: list[dict[str, str]], name: str) -> dict[str, tuple[list[int], list[float]]]:
    """split -> (steps, values) of metric `name`, skipping empty and non-finite cells."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        text = row.get(name, "")
        value = float(text) if text else math.nan
        if math.isfinite(value):
            steps, values = out.setdefault(row["split"], ([], []))
            steps.append(int(row["step"]))
            values.append(value)
    return out


def plot_metrics(csv_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``{out_dir}/{metric}.png`` for every metric of the CSV with data (train and eval on the same axes)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    names, rows = read_metrics(csv_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        series = _series(rows, name)
        if not series:
            continue
        fig = Figure(figsize=(6, 4), layout="tight")
        ax = fig.subplots()
        for split, (steps, values) in series.items():
            ax.plot(steps, values, label=split, marker="o" if len(steps) <= 20 else None, markersize=3)
        ax.set(title=name, xlabel="step", ylabel=name)
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{_file_name(name)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def format_postfix(metrics: Mapping[str, Any], digits: int = 4) -> dict[str, str]:
    """Metrics as short strings for ``tqdm.set_postfix``: {"loss": 0.123456} -> {"loss": "0.1235"}."""
    return {name: f"{float(value):.{digits}g}" for name, value in metrics.items()}


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str | None = None):
    """A tqdm bar over optimizer steps, starting at `initial` (a resumed run); a no-op bar when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
