"""A user's task through the pipeline and the frontier: their prompt files (with an extra column) and their gold
reward function (``gold=module:function``) label the sampled pairs, are GRPO's reward and the report's gold metric;
mistakes in the gold function or the options are clear errors."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("peft")

from rlhf import task  # noqa: E402
from rlhf.cli import main  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.pipeline import PipelineConfig  # noqa: E402
from rlhf.pipeline_data import gold_label_accuracy  # noqa: E402
from rlhf.rewards import gold_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # the user's module, imported by name as the pipeline will
import reward_fns  # noqa: E402

SMALL = [
    "model=builtin-small", "max_new_tokens=8", "best_of_n=2", "sft_steps=6", "rm_steps=4", "dpo_steps=4",
    "grpo_steps=2", "num_threads=1", "progress=false", "sft_args=plots=false tensorboard=false",
    "rm_args=plots=false tensorboard=false", "dpo_args=plots=false tensorboard=false",
    "grpo_args=prompts_per_step=4 num_generations=2 plots=false tensorboard=false",
]  # fmt: skip


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user_data(tmp_path: Path) -> list[str]:
    """The user's files: demonstrations, and prompts with a ``word`` column their gold reward reads."""

    def prompts(n, split):  # fmt: skip
        return [{"prompt": r["prompt"], "word": task.subject_of(r["prompt"])} for r in task.task_prompts(n, 0, split)]

    return [
        f"sft_dataset={write(tmp_path / 'sft.jsonl', task.sft_demonstrations(64, seed=0))}",
        f"prompt_dataset={write(tmp_path / 'prompts.jsonl', prompts(32, 'train'))}",
        f"eval_prompt_dataset={write(tmp_path / 'eval.jsonl', prompts(16, 'eval'))}",
    ]


def user_gold(row: dict, response: str) -> float:
    return reward_fns.user_gold([row["prompt"]], [response], word=[row["word"]])[0]


def test_pipeline_on_a_user_task_with_its_gold_reward(tmp_path):
    out = tmp_path / "run"
    data = user_data(tmp_path)
    argv = ["pipeline", f"output_dir={out}", "gold=reward_fns:user_gold", "label_beta=1000",
            "stages=sft,pairs,rm,dpo,grpo,eval", *data, *SMALL]  # fmt: skip
    assert main(argv) == 0
    words = {json.loads(line)["prompt"]: json.loads(line) for f in ("prompts", "eval")
             for line in (tmp_path / f"{f}.jsonl").read_text().splitlines()}  # fmt: skip
    for split in ("train", "eval"):  # labelled by the user's gold (beta 1000: the higher gold is chosen)
        rows = [json.loads(line) for line in (out / "pairs" / f"{split}.jsonl").read_text().splitlines()]
        assert rows
        for r in rows:
            chosen, rejected = (user_gold(words[r["prompt"]], r[k]) for k in ("chosen", "rejected"))
            assert chosen > rejected or abs(chosen - rejected) < 0.05, r
    assert "reward_funcs: reward_fns:user_gold" in (out / "grpo" / "config.yaml").read_text().splitlines()
    results = json.loads((out / "results.json").read_text())
    eval_rows = [json.loads(line) for line in (out / "pairs" / "eval.jsonl").read_text().splitlines()]
    expected = gold_label_accuracy(eval_rows, lambda p, r: user_gold(words[p], r))
    assert results["gold_accuracy"] == pytest.approx(expected)
    for name in ("dpo", "grpo"):
        assert 0 <= results["policies"][name]["win_rate_vs_sft"] <= 1, name
    # the report's gold reward is the user's: the SFT policy's, measured again here with the same seed
    from rlhf.evaluate import evaluate_policy
    from rlhf.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(out / "sft" / "final"))
    sft = load_causal_lm(str(out / "sft" / "final"), tokenizer)
    eval_prompts = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    again = evaluate_policy(sft, tokenizer, eval_prompts, gold_fn=lambda p, r: user_gold(words[p], r),
                            max_new_tokens=8, batch_size=64, seed=0)  # fmt: skip
    assert results["policies"]["sft"]["gold_reward"] == pytest.approx(again["gold_reward"])
    assert again["gold_reward"] > 1.0  # the built-in gold reward is at most 1


def test_frontier_on_a_user_task(tmp_path):
    out = tmp_path / "frontier"
    args = ["frontier", f"output_dir={out}", "preset=quick", "methods=best_of_n", "best_of_n=2", "seeds=0",
            "num_threads=1", "progress=false"]  # fmt: skip
    assert main([*args, f"pipeline_args={' '.join(user_data(tmp_path))}"]) == 2  # a frontier needs a gold reward
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main([*args, f"pipeline_args={' '.join(user_data(tmp_path))} preference_dataset={pairs}"]) == 2
    assert not (out / "base").exists()
    assert main([*args, f"pipeline_args={' '.join(user_data(tmp_path))} gold=reward_fns:user_gold"]) == 0
    points = json.loads((out / "frontier.json").read_text())["points"]
    assert [p["method"] for p in points] == ["sft", "best_of_n"]
    assert all(p["gold_reward"] > 1.0 for p in points)  # the user's gold (the built-in one is below 1)


def test_gold_function_errors(tmp_path):
    assert gold_function(None) is task.gold_reward
    gold = gold_function("reward_fns:user_gold", [{"prompt": "p", "word": "cat"}])
    assert gold("p", "a cat") == pytest.approx(0.5 + 3.0)
    with pytest.raises(UserError, match="gold reward 'reward_fns:user_gold' raised TypeError.*prompt 'q'"):
        gold("q", "no row, so no word column")
    with pytest.raises(UserError, match="returned None .* must score every sample"):
        gold_function("reward_fns:gold_returning_none")("p", "x")
    with pytest.raises(UserError, match="different columns"):
        gold_function("reward_fns:user_gold", [{"prompt": "p", "word": "a"}, {"prompt": "p", "word": "b"}])
    with pytest.raises(UserError, match="gold reward 'no_such_module:f': cannot import"):
        gold_function("no_such_module:f")
    with pytest.raises(ValueError, match="need a gold reward to label them"):
        PipelineConfig(prompt_dataset=str(tmp_path / "p.jsonl")).validate()
    with pytest.raises(ValueError, match="gold must be module:function"):
        PipelineConfig(gold="nocolon").validate()
    assert main(["pipeline", f"output_dir={tmp_path / 'none'}", "gold=no_such_module:f"]) == 2  # before any stage
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="gold must be module:function"):
        PipelineConfig(task="qa", gold="reward_fns:user_gold").validate()


def test_a_module_in_the_working_directory_imports_without_it_on_sys_path(tmp_path, monkeypatch):
    """The `rlhf` console script's sys.path holds its own directory, not the working directory: a user's
    `gold=`, reward function or judge module next to their data must still import."""
    (tmp_path / "cwd_gold_module.py").write_text("def score(prompts, completions, **columns):\n    return [1.5]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert gold_function("cwd_gold_module:score")("p", "r") == 1.5


def test_the_gold_judge_is_the_runs_gold_reward():
    """labels=ai judge=gold on a user's task judges by their gold= function (with the prompt's columns), not by the
    built-in task's."""
    from rlhf.pipeline_data import judge_pairs

    cfg = PipelineConfig(labels="ai", judge="gold", gold="reward_fns:user_gold")
    prompts = [{"prompt": "Describe the cat.", "word": "cat"}, {"prompt": "Describe the dog.", "word": "dog"}]
    rows, _ = judge_pairs(cfg, prompts, ["a cat", "a long answer"], ["a long answer", "a dog"])
    assert [r["chosen"] for r in rows] == ["a cat", "a dog"]  # 0.5 + 3 beats 1.3, whatever the built-in says
