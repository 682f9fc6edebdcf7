"""The pipeline end to end at a reduced size: every stage runs, the report is written, re-runs resume and repeat."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("peft")

from rlhf.cli import main  # noqa: E402
from rlhf.pipeline import PipelineConfig  # noqa: E402

SMALL = [
    "model=builtin-small",
    "sft_examples=128",
    "train_prompts=32",
    "eval_prompts=16",
    "max_new_tokens=8",
    "best_of_n=2",
    "sft_steps=6",
    "rm_steps=4",
    "ppo_steps=2",
    "dpo_steps=4",
    "num_threads=1",
    "progress=false",
    "ppo_args=rollout_batch_size=8 mini_batch_size=4 ppo_epochs=1 plots=false tensorboard=false",
    "sft_args=plots=false tensorboard=false",
    "rm_args=plots=false tensorboard=false",
    "dpo_args=plots=false tensorboard=false",
]


def test_pipeline_end_to_end_resumes_and_repeats(tmp_path):
    out = tmp_path / "run"
    assert main(["pipeline", f"output_dir={out}", *SMALL]) == 0
    for stage in ("sft", "pairs", "rm", "ppo", "dpo", "eval"):
        assert (out / stage / "DONE").is_file(), stage
    results = json.loads((out / "results.json").read_text())
    policies = results["policies"]
    assert {"sft", "ppo", "dpo", "best-of-2 (SFT + RM)"} <= set(policies)
    for name, metrics in policies.items():
        for key in ("gold_reward", "rm_reward", "kl_to_sft", "response_length"):
            assert key in metrics and metrics[key] == metrics[key], (name, key)  # present and not NaN
    assert abs(policies["sft"]["kl_to_sft"]) < 1e-4  # the SFT policy against itself
    assert "win_rate_vs_sft" in policies["ppo"] and 0 <= policies["ppo"]["win_rate_vs_sft"] <= 1
    assert 0 <= results["rm_accuracy"] <= 1 and 0.5 <= results["rm_best_accuracy"] <= 1
    assert 0 <= results["gold_accuracy"] <= 1
    report = (out / "report.md").read_text()
    assert "| ppo |" in report and "best reachable" in report and (out / "report.png").is_file()

    # a re-run skips every finished stage and reports the same numbers
    mtime = (out / "sft" / "DONE").stat().st_mtime_ns
    assert main(["pipeline", f"output_dir={out}", *SMALL]) == 0
    assert (out / "sft" / "DONE").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text()) == results

    # evaluation alone again, and then the whole run from scratch: same report (fixed seed)
    (out / "eval" / "DONE").unlink()
    assert main(["pipeline", f"output_dir={out}", *SMALL]) == 0
    assert json.loads((out / "results.json").read_text()) == results
    assert main(["pipeline", "--restart", f"output_dir={out}", *SMALL]) == 0
    assert json.loads((out / "results.json").read_text()) == results


def test_pipeline_config_rejects_unknown_stage():
    with pytest.raises(ValueError, match="stages"):
        PipelineConfig(stages="sft,nope").validate()
    with pytest.raises(ValueError, match="reward model"):
        PipelineConfig(stages="sft,ppo").validate()
    assert main(["pipeline", "stages=sft,ppo"]) == 2  # a config error, before anything is written
