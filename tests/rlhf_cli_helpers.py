"""Shared by the training-layer tests: run the `rlhf` CLI in a subprocess, SIGKILL it after a checkpoint, resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def final_weights(path: Path) -> dict:
    """The weights of the newest checkpoint under ``path``: one model's state_dict, or ``{"<model>.<name>": ...}``
    for stages with several trained models."""
    from rlhf.checkpoint import read_weights

    models = read_weights(sorted((path / "checkpoints").glob("step-*"))[-1])
    if len(models) == 1:
        return next(iter(models.values()))
    return {f"{name}.{key}": value for name, state in models.items() for key, value in state.items()}


def run_cli(args: list[str], out_dir: Path) -> subprocess.Popen:
    """``python -m rlhf <args> output_dir=...`` on one thread, output captured."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "rlhf", *args, f"output_dir={out_dir}", "progress=false", "num_threads=1"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> str:
    """Wait for a CLI run; it must succeed. Returns its output."""
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def kill_then_resume(args: list[str], out_dir: Path, step: int) -> None:
    """Start a run, SIGKILL it once checkpoint ``step`` is complete (before it finishes), then resume it."""
    victim = run_cli(args, out_dir)
    deadline = time.monotonic() + 300
    while not (out_dir / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists():
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (out_dir / "final").exists(), "the run finished before it was killed"
    assert "resumed from" in finish(run_cli([*args, "--resume"], out_dir))
