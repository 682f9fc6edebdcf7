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
    "ptx_coef=0.5",
    "dpo_steps=4",
    "kto_steps=3",
    "rs_steps=3",
    "grpo_steps=2",
    "num_threads=1",
    "progress=false",
    "ppo_args=rollout_batch_size=8 mini_batch_size=4 ppo_epochs=1 plots=false tensorboard=false",
    "sft_args=plots=false tensorboard=false",
    "rm_args=plots=false tensorboard=false",
    "dpo_args=plots=false tensorboard=false",
    "kto_args=plots=false tensorboard=false batch_size=8",
    "grpo_args=prompts_per_step=4 num_generations=2 plots=false tensorboard=false",
]


def test_pipeline_end_to_end_resumes_and_repeats(tmp_path):
    out = tmp_path / "run"
    assert main(["pipeline", f"output_dir={out}", *SMALL]) == 0
    for stage in ("sft", "pairs", "rm", "ppo", "dpo", "kto", "rs", "grpo", "eval"):
        assert (out / stage / "DONE").is_file(), stage
    results = json.loads((out / "results.json").read_text())
    policies = results["policies"]
    assert {"sft", "ppo", "ppo-ptx", "dpo", "kto", "rs", "grpo", "best-of-2 (SFT + RM)"} <= set(policies)
    best = [json.loads(line) for line in (out / "rs" / "best_of_n.jsonl").read_text().splitlines()]
    assert len(best) == 32 and all(set(r) == {"prompt", "completion"} for r in best)  # one per training prompt
    for name, metrics in policies.items():
        for key in ("gold_reward", "rm_reward", "kl_to_sft", "response_length"):
            assert key in metrics and metrics[key] == metrics[key], (name, key)  # present and not NaN
        if not name.startswith("best-of"):  # the alignment tax: NLL on held-out SFT demonstrations
            assert 0 < metrics["sft_nll"] < 20, (name, metrics.get("sft_nll"))
    assert (out / "ppo_ptx" / "DONE").is_file()
    assert abs(policies["sft"]["kl_to_sft"]) < 1e-4  # the SFT policy against itself
    assert "win_rate_vs_sft" in policies["ppo"] and 0 <= policies["ppo"]["win_rate_vs_sft"] <= 1
    assert 0 <= results["rm_accuracy"] <= 1 and 0.5 <= results["rm_best_accuracy"] <= 1
    assert 0 <= results["gold_accuracy"] <= 1
    report = (out / "report.md").read_text()
    assert "| ppo |" in report and "| kto |" in report and "| grpo |" in report and "best reachable" in report
    assert (out / "report.png").is_file()

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


def test_pipeline_qa_task_sft_then_grpo(tmp_path):
    """task=qa: SFT on mixed-quality answers, GRPO on the answer checker, pass@1 and pass@k of both."""
    out = tmp_path / "qa"
    args = [a for a in SMALL if not a.startswith(("ppo", "rm", "dpo", "kto", "best"))] + ["task=qa", "pass_k=3"]
    assert main(["pipeline", f"output_dir={out}", *args]) == 0
    assert not (out / "rm").exists() and not (out / "ppo").exists()
    rows = [json.loads(line) for line in (out / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(set(r) == {"prompt", "answer"} for r in rows)
    train = {json.loads(line)["prompt"] for line in (out / "data" / "prompts.jsonl").read_text().splitlines()}
    assert not train & {r["prompt"] for r in rows}  # held-out questions are never trained on
    policies = json.loads((out / "results.json").read_text())["policies"]
    assert set(policies) == {"sft", "grpo"}
    for metrics in policies.values():
        assert 0 <= metrics["pass@1"] <= metrics["pass@k"] <= 1 and metrics["k"] == 3 and metrics["num_prompts"] == 16
    assert "pass@1" in (out / "report.md").read_text()


def test_pipeline_config_rejects_unknown_stage():
    with pytest.raises(ValueError, match="stages"):
        PipelineConfig(stages="sft,nope").validate()
    with pytest.raises(ValueError, match="reward model"):
        PipelineConfig(stages="sft,ppo").validate()
    assert main(["pipeline", "stages=sft,ppo"]) == 2  # a config error, before anything is written
    with pytest.raises(ValueError, match="task=qa runs the stages sft, grpo and eval"):
        PipelineConfig(task="qa", stages="sft,rm,grpo").validate()
    with pytest.raises(ValueError, match="reward model"):
        PipelineConfig(stages="sft,grpo", grpo_reward="rm").validate()


def test_pipeline_rm_on_k_ranked_responses(tmp_path):
    """rm_k=3: 3 samples for 2/3 of the prompts (as many labelled responses as the pairs), ranked by the gold
    reward's Plackett-Luce draw; the reward model trains on them and is evaluated on the held-out pairs."""
    out = tmp_path / "k3"
    args = [a for a in SMALL if not a.startswith(("ppo", "dpo", "kto", "grpo", "best"))]
    assert main(["pipeline", f"output_dir={out}", "rm_k=3", "stages=sft,pairs,rm,eval", *args]) == 0
    rows = [json.loads(line) for line in (out / "pairs" / "ranked_k3.jsonl").read_text().splitlines()]
    assert 0 < len(rows) <= 32 * 2 // 3 and all(2 <= len(r["responses"]) <= 3 for r in rows)
    assert (out / "rm" / "DONE").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["rm_k"] == 3 and 0 <= results["rm_accuracy"] <= 1
    assert "rankings of 3 responses per prompt" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="rm_k must be >= 2"):
        PipelineConfig(rm_k=1).validate()


def test_pipeline_with_ai_labels(tmp_path):
    """labels=ai: a judge (here a function preferring longer answers) labels the training pairs; the report states
    how often it agrees with the gold reward, beside the gold draw's agreement on the same samples."""
    out = tmp_path / "ai"
    args = [a for a in SMALL if not a.startswith(("ppo", "kto", "grpo", "best", "ptx"))]
    argv = [
        "pipeline",
        f"output_dir={out}",
        "labels=ai",
        "judge=reward_fns:completion_length",
        "stages=sft,pairs,rm,dpo,eval",
    ]
    assert main([*argv, *args]) == 0
    rows = [json.loads(line) for line in (out / "pairs" / "train.jsonl").read_text().splitlines()]
    assert rows and all(len(r["chosen"]) > len(r["rejected"]) for r in rows)  # the judge's labels
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == "reward_fns:completion_length" and 0 <= results["judge_gold_agreement"] <= 1
    assert 0 <= results["gold_draw_agreement"] <= 1 and "judge_order_agreement" not in results  # not an LLM judge
    assert "labelled by the judge `reward_fns:completion_length`" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="labels=ai needs judge="):
        PipelineConfig(labels="ai").validate()


def test_pipeline_rounds_of_dpo_and_kto(tmp_path):
    """rounds=2: round 2 samples pairs from round 1's policy, labels them, and trains from that policy."""
    out = tmp_path / "rounds"
    args = [a for a in SMALL if not a.startswith(("ppo", "grpo", "best", "ptx", "rs_"))]
    assert main(["pipeline", f"output_dir={out}", "rounds=2", "stages=sft,pairs,dpo,kto,eval", *args]) == 0
    for name in ("dpo_round2", "kto_round2", "pairs_dpo_round2", "pairs_kto_round2"):
        assert (out / name / "DONE").is_file(), name
    policies = json.loads((out / "results.json").read_text())["policies"]
    assert {"dpo", "dpo (round 2)", "kto", "kto (round 2)"} <= set(policies)
    for name in ("dpo (round 2)", "kto (round 2)"):
        assert policies[name]["kl_to_sft"] == policies[name]["kl_to_sft"]  # measured, not NaN
    import yaml

    for name in ("dpo", "kto"):  # round 2 trained from round 1's policy
        config = yaml.safe_load((out / f"{name}_round2" / "config.yaml").read_text())
        assert config["model"] == str(out / name / "final")
        assert config["dataset"] == str(out / f"pairs_{name}_round2" / "train.jsonl")
