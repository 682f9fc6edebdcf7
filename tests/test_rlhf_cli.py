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
        assert issubclass(cls, TrainConfig) or name in ("pipeline", "label", "frontier")
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
    flag = {"pipeline": "--restart", "frontier": "--restart", "label": None}.get(stage, "--resume")
    assert (flag is None or flag in out) and "--config" in out
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


@pytest.mark.parametrize(
    "stage, option",
    [
        ("sft", "model"),
        ("sft", "tokenizer"),
        ("rm", "eval_dataset"),
        ("dpo", "dataset"),
        ("ppo", "ref_model"),
        ("ppo", "value_model"),
        ("ppo", "reward_model"),
        ("pipeline", "reward_model"),
        ("pipeline", "preference_dataset"),
    ],
)
def test_missing_local_paths_exit_2_before_the_stage_runs(stage, option, tmp_path, capsys, fake_stages):
    missing = tmp_path / "nope"
    assert main([stage, f"{option}={missing}"]) == 2
    assert capsys.readouterr().err == f"rlhf: error: {option}: path '{missing}' does not exist" + (
        " (a hub name looks like 'org/name')\n" if option.endswith(("model", "tokenizer")) else "\n"
    )
    assert not fake_stages


@pytest.fixture
def raising_stage(monkeypatch):
    """`rlhf sft` whose train() raises the exception given by `raising_stage(exc)`."""

    def install(exc):
        module = types.ModuleType("rlhf.sft")

        def train(cfg, resume=False):
            raise exc

        module.train = train
        monkeypatch.setitem(sys.modules, "rlhf.sft", module)

    return install


def test_user_error_from_a_stage_is_one_line_and_debug_shows_the_traceback(raising_stage, capsys, monkeypatch):
    from rlhf.errors import UserError

    raising_stage(UserError("field 'completion' is None\n(missing)", where="a.jsonl, line 3"))
    assert main(["sft"]) == 2
    assert capsys.readouterr().err == "rlhf: error: a.jsonl, line 3: field 'completion' is None (missing)\n"
    for argv, env in ((["sft", "--debug"], "0"), (["sft"], "1")):
        monkeypatch.setenv("RLHF_DEBUG", env)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)") and "UserError: a.jsonl, line 3" in err


@pytest.mark.parametrize("exc", [RuntimeError("bug"), ValueError("bug"), FileNotFoundError("bug")])
def test_other_errors_from_a_stage_propagate(exc, raising_stage, capsys):
    raising_stage(exc)
    with pytest.raises(type(exc), match="bug"):
        main(["sft"])
    assert "rlhf: error" not in capsys.readouterr().err


def test_summary_lists_policies_report_and_models(tmp_path):
    from rlhf.report import summary

    (tmp_path / "report.md").write_text("# report\n")
    results = {
        "policies": {
            "sft": {"gold_reward": -0.1, "rm_reward": 3.7, "kl_to_sft": 0.0, "response_length": 8.2},
            "ppo": {"gold_reward": 0.319, "rm_reward": 7.0, "kl_to_sft": 1.667, "win_rate_vs_sft": 0.754},
        }
    }
    models = {"sft": tmp_path / "sft/final", "rm": tmp_path / "rm/final", "ppo": tmp_path / "ppo/final"}
    assert summary(results, tmp_path, models, 233.4).splitlines() == [
        f"rlhf pipeline: done in 3m53s; report: {tmp_path / 'report.md'}",
        "policy  gold reward  KL to SFT (nats/seq)  win rate vs SFT (gold)",
        "sft          -0.100                 0.000                       -",
        "ppo           0.319                 1.667                   0.754",
        f"final models: sft {tmp_path}/sft/final, rm {tmp_path}/rm/final, ppo {tmp_path}/ppo/final",
    ]
    without_gold = {"policies": {"sft": {"rm_reward": 3.7, "kl_to_sft": 0.0}}}
    assert summary(without_gold, tmp_path, {}, 5).splitlines()[1:] == [
        "policy  RM reward  KL to SFT (nats/seq)",
        "sft         3.700                 0.000",
    ]


def test_pipeline_ends_with_the_summary(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    argv = ["pipeline", f"output_dir={out}", "stages=sft,eval", "model=builtin-small", "sft_examples=64"]
    argv += ["eval_prompts=8", "max_new_tokens=8", "sft_steps=2", "num_threads=1", "progress=false"]
    assert main([*argv, "sft_args=plots=false tensorboard=false batch_size=8"]) == 0
    tail = capsys.readouterr().out.strip().splitlines()[-4:]
    assert tail[0].startswith("rlhf pipeline: done in ") and tail[0].endswith(f"; report: {out / 'report.md'}")
    assert tail[1].split() == ["policy", "gold", "reward", "KL", "to", "SFT", "(nats/seq)"]
    assert tail[2].split()[0] == "sft" and tail[3] == f"final models: sft {out / 'sft' / 'final'}"
