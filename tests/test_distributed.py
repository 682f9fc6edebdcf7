"""Training on many processes (rlhf.distributed): units on one process, then two-process CPU runs (torchrun, gloo).

The two-process runs are checked against one process with the same global batch (one process with
``grad_accum=2`` against two with ``grad_accum=1``; PPO's global rollout and mini-batches with a fixed
``generation_batch_size``).

Tolerance: both runs do the same fp32 arithmetic on the same micro-batches. What differs is the order of a few
sums: the gradient norm adds per-shard partial sums (clipping is active in these runs, norms ~10 against
max_grad_norm 1, so every gradient is scaled by that norm), gloo adds the two processes' gradients, stats are summed
in float64 across processes. The clip coefficient's ~1e-7 relative difference goes into every weight through
Adam's step and grows a little over the steps. Measured on a 2-core CPU VM: final weights within 1.2e-7, metrics
within 2e-5 relative (values near 0 within 1e-5 absolute); ``ddp`` (no sharded norm) gives bitwise-equal weights.
We allow 1e-4 relative + 1e-5 absolute, about 5x the largest difference seen; a different global batch (one
process with ``grad_accum=1``) moves the losses by more than 1e-2, which ``test_a_different_batch_is_caught``
checks against this same tolerance.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from rlhf_cli_helpers import REPO  # noqa: E402

from rlhf import distributed  # noqa: E402
from rlhf.checkpoint import read_weights  # noqa: E402
from rlhf_kernels import AGG_MODES  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
WORKER = Path(__file__).with_name("distributed_worker.py")
HEADS_WORKER = Path(__file__).with_name("fsdp_heads_worker.py")
QUIET = ["progress=false", "plots=false", "tensorboard=false", "num_threads=1", "device=cpu"]
COMMON = [
    "model=builtin-small",
    "max_length=64",
    "logging_steps=1",
    "save_steps=2",
    "eval_steps=0",
    "lr=1e-3",
    "warmup_ratio=0",
    "schedule=linear",
    "eval_batch_size=3",
    *QUIET,
]
SUPERVISED = ["max_steps=3", "batch_size=2"]
PPO = [
    "reward_model=builtin-small",
    "max_steps=2",
    "rollout_batch_size=8",
    "mini_batch_size=4",
    "batch_size=2",
    "generation_batch_size=2",
    "ppo_epochs=2",
    "max_new_tokens=6",
    "eval_fraction=0.1",
]

GRPO = [
    "max_steps=2",
    "prompts_per_step=4",
    "num_generations=3",
    "batch_size=2",
    "generation_batch_size=2",
    "mini_batch_size=6",
    "num_iterations=2",
    "max_completion_length=6",
    "eval_fraction=0.1",
    "reward_funcs=reward_fns:completion_length",  # tests/reward_fns.py: non-zero advantages from the first step
]

# name -> (stage, options); the one-process run adds grad_accum=2 to supervised stages
RUNS = {
    "sft": ("sft", SUPERVISED),
    "sft-ddp": ("sft", [*SUPERVISED, "distributed=ddp"]),
    "rm": ("rm", SUPERVISED),
    "dpo": ("dpo", SUPERVISED),
    "kto": ("kto", SUPERVISED),
    "dpo-replicated-ref": ("dpo", [*SUPERVISED, "shard_frozen=false", "loss_type=ipo"]),
    **{f"ppo-{agg}": ("ppo", [*PPO, f"agg={agg}"]) for agg in AGG_MODES},
    "grpo": ("grpo", [*GRPO, "recipe=grpo"]),
    "grpo-gspo-batch-std": ("grpo", [*GRPO, "recipe=gspo", "scale_rewards=batch", "rollout_correction=token_mask"]),
}


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def torchrun(procs: int, *args: str) -> list[str]:
    """The command line of ``procs`` processes (torchrun, one node) or of a plain single process."""
    if procs == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]


def run_worker(runs: list[dict], tmp: Path, procs: int, timeout: int = 900) -> str:
    spec = tmp / f"runs-{procs}.json"
    spec.write_text(json.dumps(runs))
    out = subprocess.run(
        torchrun(procs, str(WORKER), str(spec)), env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-8000:]
    return out.stdout


def metrics(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final_tensors(path: Path) -> dict:
    """Every tensor of every safetensors file under ``path/final``, keyed by file and name."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted((path / "final").rglob("*.safetensors")):
        for key, value in load_file(str(file)).items():
            out[f"{file.relative_to(path)}:{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------------- units


def test_modes_and_errors(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.resolve_mode("auto", 1) == "none"
    assert distributed.resolve_mode("auto", 4) == "fsdp2"
    with pytest.raises(distributed_user_error(), match="each would train alone"):
        distributed.resolve_mode("none", 2)
    with pytest.raises(distributed_user_error(), match="needs the torchrun environment"):
        distributed.resolve_mode("fsdp2", 1)
    with pytest.raises(distributed_user_error(), match="choose from"):
        distributed.resolve_mode("zero3", 1)


def test_pipeline_asks_for_its_stages_under_torchrun(monkeypatch, tmp_path):
    from rlhf import pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed_user_error(), match="the pipeline runs on one process"):
        pipeline.train(pipeline.PipelineConfig(output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing written


def test_ppo_batches_must_split_over_the_processes():
    from rlhf.config import PPOConfig
    from rlhf.ppo import check_processes

    check_processes(PPOConfig(rollout_batch_size=8, mini_batch_size=4), 2)
    for sizes, match in (
        (dict(rollout_batch_size=9, mini_batch_size=3), "rollout_batch_size=9"),
        (dict(rollout_batch_size=8, mini_batch_size=3), "mini_batch_size=3"),
    ):
        with pytest.raises(distributed_user_error(), match=match):
            check_processes(PPOConfig(**sizes), 2)


def distributed_user_error():
    from rlhf.errors import UserError

    return UserError


def test_rank_slices_cover_the_step_in_order():
    seen = []
    for rank in range(4):
        ctx = distributed.Context(mode="fsdp2", rank=rank, world=4)
        seen += list(range(12))[distributed.rank_slice(12, ctx)]
    assert seen == list(range(12))
    with pytest.raises(ValueError, match="do not split evenly"):
        distributed.rank_slice(10, distributed.Context(mode="fsdp2", world=4))


@pytest.mark.parametrize("n, world, batch", [(10, 3, 2), (7, 2, 3), (1, 4, 2), (16, 2, 4), (5, 1, 2)])
def test_eval_shards_give_every_process_as_many_batches(n, world, batch):
    rows = list(range(n))
    shards = [distributed.shard_for_eval(rows, batch, distributed.Context(rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # the same number of forwards on every process
    real = [row for s in shards for part, ok in s if ok for row in part]
    assert real == rows  # every row once, in order
    assert all(len(part) >= 1 for s in shards for part, _ in s)


def test_neutral_stats_change_no_reduction():
    stats = {"loss": 2.0, "reward/min": -1.0, "reward/max": 3.0, "num_pairs": 4}
    neutral = distributed.neutral_stats(stats)
    assert neutral == {"loss": 0.0, "reward/min": float("inf"), "reward/max": float("-inf"), "num_pairs": 0.0}
    from rlhf.train import reduce_stats

    assert reduce_stats([stats, neutral]) == {k: float(v) for k, v in stats.items()}


def test_one_process_needs_no_process_group():
    assert distributed.context().world == 1
    assert distributed.all_reduce([1.5, 2.0]).tolist() == [1.5, 2.0]
    assert distributed.reduce_stats({"a": 1}) == {"a": 1.0}
    model = torch.nn.Linear(2, 2)
    assert distributed.grad_scale([model]) == 1
    assert distributed.forward_call(model, lambda x: x + 1, 1) == 2
    with distributed.gathered(model) as same:
        assert same is model


# ---------------------------------------------------------------------------------------------------- 2 vs 1


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """Every run of RUNS on one process and on two; returns ``{procs: output root}``."""
    roots = {}
    for procs in (1, 2):
        root = tmp_path_factory.mktemp(f"procs{procs}")
        runs = []
        for name, (stage, options) in RUNS.items():
            extra = ["grad_accum=2"] if procs == 1 and stage not in ("ppo", "grpo") else []
            if procs == 1:  # one process: no sharding options
                options = [o for o in options if not o.startswith("distributed=")]
            runs.append({"stage": stage, "overrides": [*COMMON, *options, *extra, f"output_dir={root / name}"]})
        if procs == 1:  # the must-differ control: half the global batch
            stage, options = RUNS["sft"]
            runs.append({"stage": stage, "overrides": [*COMMON, *options, f"output_dir={root / 'sft-half-batch'}"]})
        run_worker(runs, root, procs)
        roots[procs] = root
    return roots


def close(x: float, y: float) -> bool:
    return abs(x - y) <= ATOL + RTOL * abs(x)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one(equivalence, name):
    one, two = equivalence[1] / name, equivalence[2] / name
    rows_one, rows_two = metrics(one), metrics(two)
    assert [(r["step"], r["split"]) for r in rows_one] == [(r["step"], r["split"]) for r in rows_two]
    assert any(r["split"] == "eval" for r in rows_one)
    for a, b in zip(rows_one, rows_two, strict=True):
        keys = [k for k in a if k not in ("step", "split", "seconds_per_step") and a[k] != ""]
        assert set(keys) <= set(b), (name, set(keys) - set(b))
        for key in keys:
            x, y = float(a[key]), float(b[key])
            assert close(x, y), (name, a["step"], a["split"], key, x, y)
    weights_one, weights_two = final_tensors(one), final_tensors(two)
    assert weights_one.keys() == weights_two.keys() and weights_one
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=RTOL, atol=ATOL, msg=f"{name}: {key}")
    # the checkpoints of two processes are sharded: one weights file per process
    last = sorted((two / "checkpoints").glob("step-*"))[-1]
    assert len(list((last / "weights").glob("shard-*.safetensors"))) == 2


def test_a_different_batch_is_caught(equivalence):
    """The tolerance separates: one process with half the global batch (grad_accum=1) fails it on the losses."""
    half, two = metrics(equivalence[1] / "sft-half-batch"), metrics(equivalence[2] / "sft")
    losses = [(float(a["loss"]), float(b["loss"])) for a, b in zip(half, two, strict=True) if a["split"] == "train"]
    assert not all(close(x, y) for x, y in losses[1:]), losses
    assert max(abs(x - y) / abs(x) for x, y in losses) > 1e-2, losses


def test_the_runs_train(equivalence):
    """The comparison above is not vacuous: the weights moved away from the initial model."""
    first = read_weights(sorted((equivalence[2] / "sft" / "checkpoints").glob("step-*"))[0])["model"]
    last = read_weights(sorted((equivalence[2] / "sft" / "checkpoints").glob("step-*"))[-1])["model"]
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-4


# ---------------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_fused_heads_under_fsdp2_match_the_unsharded_model(tmp_path, mode):
    report = tmp_path / "heads.json"
    out = subprocess.run(
        torchrun(2, str(HEADS_WORKER), mode, str(report)),
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-8000:]
    results = json.loads(report.read_text())
    assert set(results) >= {"logprobs", "entropy", "correct", "ppo_loss", "dpo_loss", "kl", "generate"}
    for key, diff in results.items():
        assert diff <= 1e-5, (key, diff)


# ---------------------------------------------------------------------------------------------------- failures


def cli(procs: int, args: list[str]) -> list[str]:
    return torchrun(procs, "-m", "rlhf", *args)


def test_killed_rank_then_resume_on_two_and_on_one(tmp_path):
    args = ["sft", *COMMON, "max_steps=8", "batch_size=2", "save_steps=2"]
    reference = tmp_path / "uninterrupted"
    subprocess.run(cli(2, [*args, f"output_dir={reference}"]), env=env(), cwd=REPO, check=True, capture_output=True)

    killed = tmp_path / "killed"
    victim = subprocess.Popen(
        cli(2, [*args, f"output_dir={killed}"]), env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    import psutil

    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-00000002" / "COMPLETE").exists():
        assert victim.poll() is None, victim.communicate()[1].decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    workers = [p for p in psutil.Process(victim.pid).children(recursive=True) if "rlhf" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGKILL)
    victim.communicate(timeout=120)
    assert victim.returncode != 0
    assert not (killed / "final").exists(), "the run finished before a rank was killed"

    on_one = tmp_path / "resumed-on-one"
    shutil.copytree(killed, on_one)
    for procs, path, extra in ((2, killed, []), (1, on_one, ["grad_accum=2"])):
        out = subprocess.run(
            cli(procs, [*args, *extra, f"output_dir={path}", "--resume"]),
            env=env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        assert "resumed from" in out.stdout
        expected, got = final_tensors(reference), final_tensors(path)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL, msg=f"{procs} processes: {key}")


def test_one_process_checkpoint_resumes_on_two(tmp_path):
    """1 -> 2: a one-process run (grad_accum=2) cut back to its step-4 checkpoint, resumed on two processes
    (grad_accum=1), ends where an uninterrupted two-process run ends."""
    args = ["sft", *COMMON, "max_steps=8", "batch_size=2", "save_steps=2", "keep_checkpoints=0"]
    reference, cut = tmp_path / "two", tmp_path / "one-then-two"
    subprocess.run(cli(2, [*args, f"output_dir={reference}"]), env=env(), cwd=REPO, check=True, capture_output=True)
    subprocess.run(
        cli(1, [*args, "grad_accum=2", f"output_dir={cut}"]), env=env(), cwd=REPO, check=True, capture_output=True
    )
    for later in (6, 8):
        shutil.rmtree(cut / "checkpoints" / f"step-{later:08d}")
    shutil.rmtree(cut / "final")
    out = subprocess.run(
        cli(2, [*args, f"output_dir={cut}", "--resume"]), env=env(), cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "was written on 1 process(es), this run has 2" in out.stdout and "(step 4 of 8)" in out.stdout
    expected, got = final_tensors(reference), final_tensors(cut)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL, msg=key)


def test_bad_row_fails_on_every_rank_within_seconds(tmp_path):
    data = tmp_path / "sft.jsonl"
    good = json.dumps({"prompt": "Hello", "completion": " world"})
    data.write_text(
        "\n".join([good] * 5 + ['{"prompt": "no completion here", "completion": null}'] + [good] * 5) + "\n"
    )
    start = time.monotonic()
    out = subprocess.run(
        cli(2, ["sft", f"dataset={data}", f"output_dir={tmp_path / 'out'}", *QUIET]),
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], out.stderr[-4000:]
    assert "sft.jsonl" in errors[0] and "line 6" in errors[0]
    # torchrun's failure report lists the exit statuses: 2 (our user error), or SIGTERM for a process that had
    # printed its error but was still shutting down when torchrun stopped the job after the first exit
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) ", out.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, out.stderr[-4000:]
    assert elapsed < 120, elapsed  # startup of two python processes on a small CI machine, then the error
