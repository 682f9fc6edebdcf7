"""The training core: every stage runs through the one loop, steps its optimizers in the one place, and reaches the
fused LM-head kernels only through the head adapter (rlhf.models.LMHead)."""

import ast
import inspect
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

import rlhf_kernels  # noqa: E402
from rlhf import dpo, grpo, kto, ppo, reward, sft  # noqa: E402
from rlhf import train as core  # noqa: E402
from rlhf.cli import STAGES  # noqa: E402
from rlhf.config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig  # noqa: E402
from rlhf.grpo_core import GRPOConfig  # noqa: E402

RLHF = Path(core.__file__).resolve().parent
FUSED_OPS = [name for name in rlhf_kernels.__all__ if name.startswith("fused_linear_")]
# What only the head adapter may touch: the fused heads and the LM-head module / weight of a causal LM.
HEAD_ONLY = {*FUSED_OPS, "get_output_embeddings", "lm_head"}
QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1, model="builtin-small", max_steps=1)


def _names_used(path: Path) -> set[str]:
    """Attribute and imported names used in a module (``x.fused_linear_kl``, ``from ... import lm_head``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names


def test_the_scan_sees_every_fused_op():
    assert len(FUSED_OPS) == 5  # logprobs, kl, ppo, dpo, kto: the scan below would be empty without them
    assert HEAD_ONLY & _names_used(RLHF / "models.py") >= {*FUSED_OPS, "get_output_embeddings"}


@pytest.mark.parametrize("path", sorted(p.name for p in RLHF.glob("*.py") if p.name != "models.py"))
def test_only_the_head_adapter_touches_the_lm_head(path):
    used = HEAD_ONLY & _names_used(RLHF / path)
    assert not used, f"rlhf/{path} uses {sorted(used)}: go through rlhf.models.LMHead"


def test_only_the_core_steps_an_optimizer():
    for path in RLHF.glob("*.py"):
        calls = {
            node.func.attr
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        if path.name != "train.py":
            used = calls & {"step", "backward", "zero_grad"}
            assert not used, f"rlhf/{path.name} calls {sorted(used)}: use rlhf.train.accumulate_and_step"


def _frames() -> list[tuple[str, str]]:
    return [(Path(f.filename).name, f.function) for f in inspect.stack()[2:]]


@pytest.fixture()
def spies(monkeypatch):
    """Record, for every fused-op call and every optimizer step, who called it and whether the loop was on the
    stack."""
    calls = {"fused": [], "steps": []}
    for name in FUSED_OPS:
        original = getattr(rlhf_kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            frames = _frames()
            calls["fused"].append((_name, frames[0], ("train.py", "run") in frames))
            return _original(*args, **kwargs)

        monkeypatch.setattr(rlhf_kernels, name, spy)
    original_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        frames = [(Path(f.filename).name, f.function) for f in inspect.stack()[1:]]
        calls["steps"].append((("train.py", "accumulate_and_step") in frames, ("train.py", "run") in frames))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


CASES = {
    "sft": (sft.train, SFTConfig, dict(batch_size=4)),
    "rm": (reward.train, RewardConfig, dict(batch_size=4)),
    "dpo": (dpo.train, DPOConfig, dict(batch_size=4)),
    "kto": (kto.train, KTOConfig, dict(batch_size=4)),
    "ppo": (
        ppo.train,
        PPOConfig,
        dict(reward_model="builtin-small", rollout_batch_size=4, mini_batch_size=2, batch_size=2, max_new_tokens=4),
    ),
    "grpo": (
        grpo.train,
        GRPOConfig,
        dict(prompts_per_step=2, num_generations=2, mini_batch_size=2, batch_size=2, max_completion_length=4),
    ),
}


def test_every_training_stage_is_covered():
    assert set(STAGES) - {"pipeline", "label", "frontier"} == set(CASES)  # label trains nothing; the others compose


@pytest.mark.parametrize("stage", sorted(CASES))
def test_stage_runs_through_the_loop_and_the_head_adapter(stage, spies, tmp_path, capsys):
    train, cls, options = CASES[stage]
    train(cls(output_dir=str(tmp_path), eval_fraction=0.1, **QUIET, **options), resume=True)
    out = capsys.readouterr().out
    assert "checkpoint" not in out  # a fresh run with --resume says nothing about the missing checkpoint
    summary = [line for line in out.splitlines() if line.startswith(f"{tmp_path.name}: 1 steps in ")]
    assert len(summary) == 1 and f"final model: {tmp_path / 'final'}" in summary[0], out
    if stage != "rm":  # the reward model has no LM head
        assert spies["fused"], f"{stage} never reached a fused head"
    for name, caller, _ in spies["fused"]:
        assert caller[0] == "models.py", f"{stage}: {name} called from {caller}"
    assert any(in_loop for *_, in_loop in spies["fused"]) or stage == "rm"
    assert spies["steps"] and all(a and b for a, b in spies["steps"]), spies["steps"]
    assert (tmp_path / "final").is_dir() and (tmp_path / "checkpoints").is_dir()


def test_summary_line_shows_train_then_held_out_stats():
    final = {"train/loss": 0.25, "train/accuracy": 0.5, "train/grad_norm": 3.0, "eval/loss": 0.125, "eval/x/min": 1}
    line = core.summary_line(Path("runs/rm"), final, ("loss", "accuracy"), 200, 68)
    assert line == "rm: 200 steps in 1m08s; loss 0.25, accuracy 0.5, eval/loss 0.125; final model: runs/rm/final"
