"""rlhf.metrics: wide CSV with growing header, resume truncation, TensorBoard hook, plots, progress helpers."""

import csv
import importlib.util
import sys
import types

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import torch  # noqa: E402

from rlhf.metrics import MetricsLogger, format_postfix, plot_metrics, progress, read_metrics  # noqa: E402


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_wide_csv_grows_header_and_flushes(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 2.5, "lr": 1e-4})
    assert rows_of(tmp_path / "metrics.csv") == [["step", "split", "loss", "lr"], ["1", "train", "2.5", "0.0001"]]
    logger.log(2, {"loss": torch.tensor(1.25), "accuracy": 0.5})  # a new metric: header extended, 0-d tensor ok
    logger.log(2, {"loss": 1.5}, split="eval")
    assert rows_of(tmp_path / "metrics.csv") == [  # readable before close: every write is flushed
        ["step", "split", "loss", "lr", "accuracy"],
        ["1", "train", "2.5", "0.0001", ""],
        ["2", "train", "1.25", "", "0.5"],
        ["2", "eval", "1.5", "", ""],
    ]
    logger.close()


def test_values_round_trip_exactly(tmp_path):
    value = 0.1 + 0.2  # 0.30000000000000004
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"loss": value})
    _, rows = read_metrics(tmp_path / "metrics.csv")
    assert float(rows[0]["loss"]) == value


def test_resume_drops_rows_after_resume_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 7):
            logger.log(step, {"loss": float(step)})
        logger.log(4, {"loss": 0.5, "accuracy": 0.9}, split="eval")
        logger.log(6, {"loss": 0.25, "accuracy": 0.95}, split="eval")
    with MetricsLogger(tmp_path, resume_step=4, tensorboard=False) as logger:
        logger.log(5, {"loss": 50.0})
    assert rows_of(tmp_path / "metrics.csv") == [
        ["step", "split", "loss", "accuracy"],
        ["1", "train", "1.0", ""],
        ["2", "train", "2.0", ""],
        ["3", "train", "3.0", ""],
        ["4", "train", "4.0", ""],
        ["4", "eval", "0.5", "0.9"],
        ["5", "train", "50.0", ""],
    ]


def test_fresh_run_replaces_old_file_and_cut_lines_are_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,split,loss\n1,train,1.0\n2,train,2.0\n3,tra")  # a line cut short by a crash
    with MetricsLogger(tmp_path, resume_step=5, tensorboard=False) as logger:
        logger.log(6, {"loss": 6.0})
    assert rows_of(path) == [
        ["step", "split", "loss"],
        ["1", "train", "1.0"],
        ["2", "train", "2.0"],
        ["6", "train", "6.0"],
    ]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"kl": 0.1})
    assert rows_of(path) == [["step", "split", "kl"], ["1", "train", "0.1"]]


def test_reserved_names(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger, pytest.raises(ValueError, match="'step'"):
        logger.log(1, {"step": 1.0})


def test_tensorboard_optional(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(1, {"loss": 1.0})
        assert (logger.writer is not None) == (importlib.util.find_spec("tensorboard") is not None)
    with MetricsLogger(tmp_path / "off", tensorboard=False) as logger:
        assert logger.writer is None


def test_tensorboard_tags_and_purge(tmp_path, monkeypatch):
    events = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            events.append(("open", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    with MetricsLogger(tmp_path, resume_step=10) as logger:
        logger.log(11, {"loss": 0.5, "kl": 0.25})
        logger.log(11, {"loss": 0.75}, split="eval")
    assert events == [
        ("open", str(tmp_path / "tensorboard"), 11),
        ("train/loss", 0.5, 11),
        ("train/kl", 0.25, 11),
        ("eval/loss", 0.75, 11),
        ("close",),
    ]


def test_plot_metrics_one_png_per_metric(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real_plot = Axes.plot

    def spy(self, x, y, *args, **kwargs):
        drawn.append((id(self), kwargs.get("label"), list(x), list(y)))
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0 / step, "reward/mean": float(step)})
        logger.log(3, {"loss": 0.4, "accuracy": 0.75}, split="eval")
        logger.log(4, {"loss": float("nan")})
    paths = plot_metrics(tmp_path / "metrics.csv", tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "reward_mean.png", "accuracy.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [d[1:] for d in drawn] == [
        ("train", [1, 2, 3], [1.0, 0.5, 1.0 / 3]),  # the NaN at step 4 is skipped
        ("eval", [3], [0.4]),
        ("train", [1, 2, 3], [1.0, 2.0, 3.0]),
        ("eval", [3], [0.75]),
    ]
    assert drawn[0][0] == drawn[1][0], "train and eval loss share one axes"


def test_format_postfix_and_progress(capsys):
    assert format_postfix({"loss": 0.123456, "kl": torch.tensor(2.0)}) == {"loss": "0.1235", "kl": "2"}
    bar = progress(total=10, initial=4, enabled=True, desc="sft")
    bar.update(1)
    assert (bar.total, bar.n, bar.disable) == (10, 5, False)
    bar.close()
    assert "sft" in capsys.readouterr().err
    assert progress(total=10, enabled=False).disable
