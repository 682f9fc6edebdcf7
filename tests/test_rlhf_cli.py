"""rlhf.cli: --help lists every option with its default, dispatch to the stage module, exit code 2 on errors.

No training here: the stage modules are replaced by fakes that record the config they are given.
"""

import dataclasses
import importlib.util
import subprocess
import sys
import types

import pytest

pytest.importorskip("yaml")

from rlhf.cli import STAGES, main  # noqa: E402
from rlhf.config import RewardConfig, SFTConfig, TrainConfig, format_default  # noqa: E402


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace every stage module by a fake whose train() records (stage, cfg, resume)."""
    calls = []
    for stage, (_, module_name) in STAGES.items():
        module = types.ModuleType(module_name)
        module.train = lambda cfg, resume=False, stage=stage: calls.append((stage, cfg, resume)) or {}
        monkeypatch.setitem(sys.modules, module_name, module)
    return calls


def test_stage_table():
    assert STAGES["sft"] == (SFTConfig, "rlhf.sft")
    assert STAGES["rm"] == (RewardConfig, "rlhf.reward")
    for name, (cls, module_name) in STAGES.items():
        assert issubclass(cls, TrainConfig) or name == "pipeline"
        assert importlib.util.find_spec(module_name) is not None, module_name


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_help_lists_every_field_with_default(stage, capsys, fake_stages):
    assert main([stage, "--help"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    cls = STAGES[stage][0]
    for f in dataclasses.fields(cls):
        assert f.name in lines, f"{f.name} missing from rlhf {stage} --help"
        assert f"= {format_default(f.default)} " in lines[f.name], lines[f.name]
    assert ("--restart" if stage == "pipeline" else "--resume") in out and "--config" in out
    assert not fake_stages


def test_top_level_help_lists_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)


def test_sft_dispatch_with_yaml_and_overrides(tmp_path, fake_stages):
    path = tmp_path / "sft.yaml"
    path.write_text("lr: 1e-3\nbatch_size: 4\nmax_steps: 5\n")
    argv = ["sft", "--config", str(path), "batch_size=2", "--resume", "tokenizer=None", "progress=false"]
    assert main(argv) == 0
    [(stage, cfg, resume)] = fake_stages
    assert stage == "sft" and resume is True
    assert cfg == SFTConfig(lr=1e-3, batch_size=2, max_steps=5, progress=False)


def test_rm_dispatch_defaults(fake_stages):
    assert main(["rm", "center_coef=0.01"]) == 0
    [(stage, cfg, resume)] = fake_stages
    assert stage == "rm" and resume is False
    assert cfg == RewardConfig(center_coef=0.01)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "lrr=0.1"], "unknown config key 'lrr' in the command-line overrides; did you mean lr"),
        (["sft", "batch_size=two"], "batch_size must be int"),
        (["rm", "schedule=exp"], "schedule must be one of"),
        (["sft", "eval_fraction=1.5"], "eval_fraction must be in [0, 1)"),
        (["sft", "lr"], "'lr' is not of the form key=value"),
        (["sft", "--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml"),
        (["sft", "center_coef=1"], "unknown config key 'center_coef'"),
    ],
)
def test_config_errors_exit_2_with_message(argv, message, capsys, fake_stages):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf: error: ") and message in err, err
    assert "Traceback" not in err
    assert not fake_stages


@pytest.mark.parametrize("argv", [[], ["ppo-nope"], ["sft", "--lr=3"], ["sft", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys, fake_stages):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err
    assert not fake_stages


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf", "rm", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "center_coef" in proc.stdout and "builtin:preference" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rlhf", "sft", "nope=1"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("rlhf: error: unknown config key 'nope'")
