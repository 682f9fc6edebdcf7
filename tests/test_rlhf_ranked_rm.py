"""Reward models on K ranked responses (`rlhf rm` with prompt + responses rows): data (ranks from the order, from
ranks, from scores with ties), the collator's layout, one forward row per response (counted), the loss against
rlhf_kernels.ranked_reward_loss, pairs as K = 2 rankings, training end to end, and the errors."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

import rlhf_kernels  # noqa: E402
from rlhf import reward  # noqa: E402
from rlhf.collators import PreferenceCollator  # noqa: E402
from rlhf.config import DPOConfig, RewardConfig  # noqa: E402
from rlhf.data import detect_format, prepare, tokenize_preference  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.models import load_reward_model, load_tokenizer  # noqa: E402
from rlhf.ranked_data import RankedCollator, ranks_from_scores  # noqa: E402
from rlhf.tiny import builtin_rows  # noqa: E402

QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


def test_ranks_from_the_order_the_ranks_or_the_scores(tok):
    row = {"prompt": "Q?", "responses": ["best", "middle", "worst"]}
    assert detect_format([row], "preference") == "ranked"
    assert tokenize_preference(row, tok, 64)["ranks"] == [0, 1, 2]
    assert tokenize_preference({**row, "ranks": [2, 0, 0]}, tok, 64)["ranks"] == [2, 0, 0]
    scored = tokenize_preference({**row, "scores": [0.5, 3.0, 0.5]}, tok, 64)
    assert scored["ranks"] == [1, 0, 1] and scored["scores"] == [0.5, 3.0, 0.5]
    assert ranks_from_scores([1.0, 7.0, 7.0, -2.0]) == [1, 0, 0, 2]
    # each response is tokenised with the prompt exactly as a chosen response of a pair is
    pair = tokenize_preference({"prompt": "Q?", "chosen": "best", "rejected": "worst"}, tok, 64)
    ranked = tokenize_preference(row, tok, 64)
    assert ranked["responses_input_ids"][0] == pair["chosen_input_ids"]
    assert ranked["responses_input_ids"][2] == pair["rejected_input_ids"]


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"responses": ["only one"]}, "at least 2 responses"),
        ({"ranks": [0, 0, 0]}, "all 3 responses are tied"),
        ({"ranks": [0, 1]}, "list of 3 integers"),
        ({"ranks": [0, -1, 2]}, "integers >= 0"),
        ({"scores": [1.0, float("nan"), 0.0]}, "finite numbers"),
        ({"responses": ["a", "", "c"]}, "empty response"),
    ],
)
def test_bad_ranked_rows_are_named(tok, extra, match):
    row = {"prompt": "Q?", "responses": ["a", "b", "c"], **extra}
    with pytest.raises(UserError, match=match):
        prepare([row], tok, "preference", 64)


def test_overlong_responses_are_dropped_one_by_one(tok):
    long = " ".join(["word"] * 80)
    row = {"prompt": "Q?", "responses": ["short", long, "tiny"], "ranks": [0, 1, 2]}
    (kept,) = prepare([row], tok, "preference", 32, log=lambda m: None)
    assert kept["ranks"] == [0, 2] and len(kept["responses_input_ids"]) == 2
    tied_rest = {"prompt": "Q?", "responses": ["short", long, "tiny"], "ranks": [1, 0, 1]}
    with pytest.raises(UserError, match="longer than max_length"):  # what is left is all tied: the row is dropped
        prepare([tied_rest], tok, "preference", 32, log=lambda m: None)


def test_collator_places_each_response_in_its_slot():
    rows = [
        {"responses_input_ids": [[1, 2], [3], [4, 5, 6]], "ranks": [0, 1, 1], "scores": None},
        {"responses_input_ids": [[7], [8, 9]], "ranks": [1, 0], "scores": [0.0, 2.5]},
    ]
    batch = RankedCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0], [8, 9, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 1, 3, 1, 2]
    assert batch["slot"].tolist() == [0, 1, 2, 3, 4]  # K = 3: row 1's responses at 3 and 4, slot 5 empty
    assert batch["ranks"].tolist() == [[0, 1, 1], [1, 0, -1]]
    assert batch["scores"].tolist() == [[0, 0, 0], [0.0, 2.5, 0.0]]
    assert batch["has_scores"].tolist() == [False, True]


def ranked_rows(tok, n, seed=0):
    """Built-in preference rows turned into K = 3 rankings: the chosen answer, then the rejected one and another
    row's rejected answer tied for last."""
    base = builtin_rows("preference", n + 1, seed=seed)
    rows = [
        {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], base[i + 1]["rejected"]], "ranks": [0, 1, 1]}
        for i, r in enumerate(base[:n])
    ]
    return rows


def test_one_forward_row_per_response_and_the_loss_of_the_op(tok):
    model = load_reward_model("builtin-small", tok, seed=0)
    rows = prepare(ranked_rows(tok, 4), tok, "preference", 128)
    rows[3] = {**rows[3], "responses_input_ids": rows[3]["responses_input_ids"][:2], "ranks": [0, 1]}  # K = 2 here
    batch = RankedCollator(tok.pad_token_id)(rows)
    seen = []
    handle = model.backbone.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        loss, stats = reward.reward_loss(model, batch, normalizer=4, center_coef=0.1)
    finally:
        handle.remove()
    assert seen == [11]  # 3 + 3 + 3 + 2 responses, one forward pass, one row each (not 2 * C(K, 2) = 20 rows)
    with torch.no_grad():  # the same responses scored one by one
        each = [torch.tensor(ids) for r in rows for ids in r["responses_input_ids"]]
        single = [model(ids[None], torch.ones_like(ids)[None])[0] for ids in each]
    table = torch.zeros(4, 3)
    table.view(-1)[batch["slot"]] = torch.stack(single)
    expected, _ = rlhf_kernels.ranked_reward_loss(table, batch["ranks"], center_coef=0.1, normalizer=4)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert int(stats["num_pairs"]) == 2 + 2 + 2 + 1 and int(stats["num_prompts"]) == 4


def test_a_pair_batch_is_the_bradley_terry_loss(tok):
    model = load_reward_model("builtin-small", tok, seed=0)
    rows = prepare(builtin_rows("preference", 3), tok, "preference", 128)
    rows = [{**r, "margin": m} for r, m in zip(rows, (0.0, 0.5, -1.0))]
    batch = PreferenceCollator(tok.pad_token_id)(rows)
    loss, stats = reward.reward_loss(model, batch, normalizer=3, center_coef=0.2)
    with torch.no_grad():
        r = model(batch["input_ids"], batch["attention_mask"])
    c, j = r[:3], r[3:]
    expected = (-torch.nn.functional.logsigmoid(c - j - batch["margin"]) + 0.2 * (c + j) ** 2).sum() / 3
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)
    assert stats["accuracy"].item() == pytest.approx(float((c > j).float().mean()))
    assert stats["margin"].item() == pytest.approx(float((c - j).mean()), abs=1e-6)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("rank_loss", rlhf_kernels.RANK_LOSS_MODES)
def test_ranked_reward_model_learns_the_ranking(tmp_path, tok, rank_loss):
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(tok, 160))
    cfg = RewardConfig(
        model="builtin-small",
        dataset=data,
        output_dir=str(tmp_path / "rm"),
        rank_loss=rank_loss,
        max_steps=40,
        batch_size=8,
        lr=2e-3,
        warmup_ratio=0.0,
        logging_steps=10,
        eval_steps=0,
        save_steps=0,
        eval_fraction=0.2,
        **QUIET,
    )
    final = reward.train(cfg)
    assert final["eval/accuracy"] > 0.8 and final["eval/kendall_tau"] > 0.6, final
    assert final["eval/num_pairs"] == 2 * 32 and final["eval/num_prompts"] == 32  # the tied pair is no pair
    for key in ("loss", "accuracy", "kendall_tau", "margin", "reward/mean"):
        assert f"train/{key}" in final, key


def test_score_margin_needs_scores_and_dpo_refuses_rankings(tmp_path, tok):
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(tok, 20))
    cfg = RewardConfig(model="builtin-small", dataset=data, output_dir=str(tmp_path / "rm"), score_margin=1.0, **QUIET)
    with pytest.raises(UserError, match="score_margin > 0 needs ranked rows with a .scores. column"):
        reward.train(cfg)
    from rlhf import dpo

    with pytest.raises(UserError, match="ranked rows .* are for `rlhf rm`"):
        dpo.train(DPOConfig(model="builtin-small", dataset=data, output_dir=str(tmp_path / "dpo"), **QUIET))
    with pytest.raises(ValueError, match="rank_loss must be one of pairwise, plackett_luce"):
        RewardConfig(rank_loss="listwise").validate()


def test_score_margin_shifts_the_loss(tok):
    model = load_reward_model("builtin-small", tok, seed=0)
    rows = [{**r, "scores": [2.0, 1.0, 0.0]} for r in ranked_rows(tok, 3)]
    for r in rows:
        r.pop("ranks")
    batch = RankedCollator(tok.pad_token_id)(prepare(rows, tok, "preference", 128))
    plain, _ = reward.reward_loss(model, batch, 3)
    shifted, _ = reward.reward_loss(model, batch, 3, score_margin=0.5)
    with torch.no_grad():
        table = torch.zeros(9).index_copy(0, batch["slot"], model(batch["input_ids"], batch["attention_mask"]))
    expected, _ = rlhf_kernels.ranked_reward_loss(table.view(3, 3), batch["ranks"], margins=0.5 * batch["scores"])
    torch.testing.assert_close(shifted.detach(), expected, atol=1e-6, rtol=1e-6)
    assert shifted.item() > plain.item() + 0.1
