"""`rlhf label`: hand-made judges give the expected labels (a function that prefers longer answers), rankings with
scores, ties and empty responses, the LLM judge's two orders cancelling a judge biased to the first position,
sampling from a policy, and a failed run that leaves no output and resumes from its finished chunks."""

import json
import textwrap

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rlhf import label  # noqa: E402
from rlhf.cli import main  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.judges import LLMJudge  # noqa: E402
from rlhf.models import load_tokenizer  # noqa: E402

ROWS = [
    {"prompt": "Q1?", "responses": ["short", "a much longer answer"]},
    {"prompt": "Q2?", "responses": ["a somewhat long one", "tiny"]},
    {"prompt": "Q3?", "responses": ["same", "same"]},  # one distinct response: skipped
    {"prompt": "Q4?", "responses": ["abc", "xyz"]},  # equal lengths: a tie, no label
    {"prompt": "Q5?", "responses": ["", "non-empty"]},  # an empty response is dropped: skipped
]


@pytest.fixture
def judges(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        textwrap.dedent("""
        import os
        CALLS = {"n": 0}

        def longer(prompts, completions, **columns):
            CALLS["n"] += 1
            if CALLS["n"] > int(os.environ.get("LABEL_FAIL_AFTER", "1000000")):
                raise RuntimeError("judge went away")
            return [float(len(c)) for c in completions]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_judges:longer"


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(path):
    return [json.loads(line) for line in open(path)]


def test_a_judge_that_prefers_longer_answers(tmp_path, judges):
    out = tmp_path / "pairs.jsonl"
    counts = label.train(label.LabelConfig(dataset=write(tmp_path / "in.jsonl", ROWS), output=str(out),
                                           judge=judges, progress=False))  # fmt: skip
    rows = read(out)
    assert rows == [
        {"prompt": "Q1?", "chosen": "a much longer answer", "rejected": "short", "scores": [20.0, 5.0]},
        {"prompt": "Q2?", "chosen": "a somewhat long one", "rejected": "tiny", "scores": [19.0, 4.0]},
    ]
    assert counts["labelled"] == 2 and counts["skipped"] == 3
    assert not (tmp_path / "pairs.jsonl.parts").exists()


def test_rankings_of_k_responses(tmp_path, judges):
    rows = [{"prompt": "Q?", "responses": ["bb", "a", "cccc", "dd"]}]
    out = tmp_path / "ranked.jsonl"
    label.train(label.LabelConfig(dataset=write(tmp_path / "in.jsonl", rows), output=str(out), judge=judges, k=4,
                                  progress=False))  # fmt: skip
    (row,) = read(out)
    assert row["responses"][0] == "cccc" and row["responses"][-1] == "a" and row["scores"][1:3] == [2.0, 2.0]
    from rlhf.data import prepare

    prepared = prepare(read(out), load_tokenizer("builtin"), "preference", 64)  # readable by rlhf rm: ties kept
    assert prepared[0]["ranks"] == [0, 1, 1, 2]


class BiasedJudgeModel(nn.Module):
    """Next-token logits of a judge that says "A" whatever it reads (+3) and prefers the longer answer (+1)."""

    def __init__(self, tokenizer, verdict_ids):
        super().__init__()
        self.tokenizer, self.ids = tokenizer, verdict_ids
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids=None):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for b, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids[attention_mask[b].bool()], skip_special_tokens=True)
            a = text.split("Answer A: ")[1].split("\n")[0]
            second = text.split("Answer B: ")[1].split("\n")[0]
            logits[b, :, self.ids[0]] += 3.0  # position bias
            logits[b, :, self.ids[0 if len(a) > len(second) else 1]] += 1.0  # content
        return type("Out", (), {"logits": logits})()


def test_both_orders_cancel_a_first_position_bias():
    tokenizer = load_tokenizer("builtin")
    judge = LLMJudge(None, tokenizer, "Prefer longer answers.")
    judge.model = BiasedJudgeModel(tokenizer, judge.verdict_ids)
    one_order = judge.first_better([judge.render("Q?", "short", "a longer one")])
    assert one_order.item() > 0.5  # alone, the biased judge prefers whatever comes first
    scores = judge.scores("Q?", ["short", "a longer one"], {})
    # forward: logit gap 3 - 1 = 2 for "short" first -> P = sigmoid(2) = 0.881 that "short" is better;
    # swapped: gap 3 + 1 = 4 for the longer answer first -> P(short better) = 1 - sigmoid(4) = 0.018; mean 0.450
    assert scores[0] == pytest.approx(0.4496, abs=1e-3) and scores[1] == pytest.approx(0.5504, abs=1e-3)
    assert judge.agreement == [False]  # the two orders disagreed: the bias showed


def test_sampling_from_a_policy_is_deterministic(tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": f"How was the concert in Oslo {i}?"} for i in range(5)])
    outs = []
    for name in ("a", "b"):
        cfg = label.LabelConfig(dataset=prompts, output=str(tmp_path / f"{name}.jsonl"), policy="builtin-small",
                                k=3, max_new_tokens=6, chunk_prompts=2, progress=False)  # fmt: skip
        label.train(cfg)
        outs.append(read(tmp_path / f"{name}.jsonl"))
    assert outs[0] == outs[1] and outs[0]
    assert all(len(r["responses"]) >= 2 and r["scores"] == sorted(r["scores"], reverse=True) for r in outs[0])


def test_a_failed_run_leaves_no_output_and_resumes(tmp_path, judges, monkeypatch):
    rows = [{"prompt": f"Q{i}?", "responses": ["x" * (i % 3 + 1), "y" * (i % 4 + 2)]} for i in range(10)]
    data = write(tmp_path / "in.jsonl", rows)
    straight = tmp_path / "straight.jsonl"
    label.train(label.LabelConfig(dataset=data, output=str(straight), judge=judges, chunk_prompts=3, progress=False))
    out = tmp_path / "out.jsonl"
    args = ["label", f"dataset={data}", f"output={out}", f"judge={judges}", "chunk_prompts=3", "progress=false"]
    import my_judges

    my_judges.CALLS["n"] = 0
    monkeypatch.setenv("LABEL_FAIL_AFTER", "4")  # dies in the second chunk
    assert main(args) == 2  # the judge's error, named in one line
    assert not out.exists() and len(list((tmp_path / "out.jsonl.parts").glob("part-*.jsonl"))) == 1
    monkeypatch.setenv("LABEL_FAIL_AFTER", "1000000")
    my_judges.CALLS["n"] = 0
    assert main(args) == 0
    assert read(out) == read(straight)
    assert my_judges.CALLS["n"] == 7  # the 3 finished prompts were not judged again
    with pytest.raises(ValueError, match="k must be >= 2"):
        label.LabelConfig(k=1).validate()


def test_bad_judge_is_named(tmp_path):
    data = write(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(UserError, match="judge 'nothing' is neither"):
        label.train(label.LabelConfig(dataset=data, output=str(tmp_path / "o.jsonl"), judge="nothing", progress=False))


def test_an_unimportable_judge_is_named_as_a_judge(tmp_path):
    data = write(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(UserError, match=r"^judge 'no_such_module:fn': cannot import module"):
        label.train(label.LabelConfig(dataset=data, output=str(tmp_path / "o.jsonl"), judge="no_such_module:fn",
                                      progress=False))  # fmt: skip
