"""rlhf.task: prompts, mixed-quality demonstrations, the gold reward and the Bradley-Terry labels."""

import math
import random
import statistics

import pytest

from rlhf.task import (
    DEFAULT_BETA,
    LEXICON,
    THINGS,
    bt_best_accuracy,
    gold_reward,
    label_pairs,
    preference_probability,
    prompt_pool,
    sft_demonstrations,
    subject_of,
    task_prompts,
)

HOTEL = "Describe the hotel in Paris."


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The hotel is lovely and noisy.", 0.25),  # mean(+1, -0.5)
        ("The hotel is wonderful, superb and lovely.", 1.0),
        ("The hotel is wonderful, wonderful and wonderful.", 1.0),  # repeats count once
        ("The hotel is lovely, lovely and awful.", 0.0),  # distinct words: mean(+1, -1)
        ("The hotel is good, busy and dull.", 0.0),  # mean(+0.5, 0, -0.5)
        ("The hotel is nice, old and small.", 0.5 / 3),
        ("The hotel is awful, dirty and rude.", -1.0),
        ("THE HOTEL IS LOVELY!", 1.0),  # case and punctuation do not matter
        ("It is lovely.", 0.5),  # does not name the hotel: 1 - 0.5
        ("The cafe is nice.", 0.0),  # names another thing: 0.5 - 0.5
        ("It is awful.", -1.0),  # -1 - 0.5, clipped to -1
        ("The hotel is.", -0.5),  # no opinion
        ("", -1.0),  # no opinion, no subject
        ("The hotel is lovelyish.", -0.5),  # whole words only
    ],
)
def test_gold_reward_hand_made(response, expected):
    assert gold_reward(HOTEL, response) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_without_a_task_prompt_has_no_subject_check():
    assert subject_of("Hello there") is None and subject_of("How was the concert in Oslo?") == "concert"
    assert gold_reward("Hello there", "Lovely.") == 1.0
    assert gold_reward("Hello there", "Nothing to say.") == -0.5


def test_gold_reward_is_bounded_and_ignores_length():
    rng = random.Random(0)
    words = [*LEXICON, *THINGS, "the", "is", "it", "and"]
    for _ in range(500):
        response = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        assert -1.0 <= gold_reward(HOTEL, response) <= 1.0
    short, long = "The hotel is nice.", "The hotel is nice and friendly and charming and good and clean."
    assert gold_reward(HOTEL, short) == gold_reward(HOTEL, long) == 0.5


def test_prompts_are_deterministic_disjoint_and_distinct():
    train, held_out = set(prompt_pool("train")), set(prompt_pool("eval"))
    assert not train & held_out and len(held_out) > 200 and len(train) > 4 * 200
    rows = task_prompts(300, seed=0, split="eval")
    assert rows == task_prompts(300, seed=0, split="eval") != task_prompts(300, seed=1, split="eval")
    assert task_prompts(5, seed=0, split="eval") == rows[:5]
    assert len({r["prompt"] for r in rows}) == 300 and {r["prompt"] for r in rows} <= held_out
    many = task_prompts(len(train) + 10, seed=3)  # past the pool: reshuffled, so every prompt comes up once first
    assert set(r["prompt"] for r in many[: len(train)]) == train
    assert all(subject_of(p) is not None for p in train | held_out)
    with pytest.raises(ValueError, match="split"):
        task_prompts(3, split="test")
    with pytest.raises(ValueError, match=">= 0"):
        task_prompts(-1)


def test_demonstrations_are_deterministic_mixed_and_on_train_prompts():
    rows = sft_demonstrations(2000, seed=0)
    assert rows == sft_demonstrations(2000, seed=0) != sft_demonstrations(2000, seed=1)
    assert all(set(r) == {"prompt", "completion"} for r in rows)
    assert {r["prompt"] for r in rows} <= set(prompt_pool("train"))
    gold = [gold_reward(r["prompt"], r["completion"]) for r in rows]
    # Mixed quality: mean near 0 (room to improve), wide spread, both ends reached.
    assert -0.2 < statistics.mean(gold) < 0.1 and statistics.pstdev(gold) > 0.45
    assert 0.03 < sum(g == 1.0 for g in gold) / len(gold) < 0.2
    assert 0.05 < sum(g == -1.0 for g in gold) / len(gold) < 0.25
    vague = sum(r["completion"].startswith("It is") for r in rows) / len(rows)
    assert 0.1 < vague < 0.2


def test_demonstrations_are_short_with_the_builtin_tokenizer():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from rlhf.tiny import build_tokenizer

    tok = build_tokenizer()
    rows = sft_demonstrations(300, seed=0)
    lengths = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert max(lengths) <= 12  # the task's words are single tokens: "The hotel is a, b and c."
    assert max(len(tok(r["prompt"])["input_ids"]) for r in rows) <= 16


def test_preference_probability_and_best_accuracy_hand_made():
    assert preference_probability(1.0, 0.0, 2.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert preference_probability(0.0, 1.0, 2.0) == pytest.approx(1 / (1 + math.exp(2)))
    assert preference_probability(0.3, 0.3, 2.0) == 0.5
    assert [preference_probability(a, b, math.inf) for a, b in ((1, 0), (0, 1), (0, 0))] == [1.0, 0.0, 0.5]
    # p = sigmoid(2) = 0.8808 (best guess "a"), sigmoid(-1) = 0.2689 (best guess "b": 0.7311), 0.5 (a coin flip).
    best = bt_best_accuracy([1.0, 0.0, 0.5], [0.0, 0.5, 0.5], beta=2.0)
    assert best == pytest.approx((0.8807970779778823 + 0.7310585786300049 + 0.5) / 3)
    assert bt_best_accuracy([1.0, -1.0], [0.0, 0.0], beta=math.inf) == 1.0
    with pytest.raises(ValueError, match="length"):
        bt_best_accuracy([1.0], [0.0, 1.0], beta=1.0)


def test_label_pairs_follow_gold_when_beta_is_infinite():
    rows = sft_demonstrations(400, seed=0)
    prompts = [r["prompt"] for r in rows]
    a = [r["completion"] for r in rows]
    b = [r["completion"] for r in sft_demonstrations(400, seed=1)]
    b[:10] = a[:10]  # identical pairs are skipped
    pairs, best = label_pairs(prompts, a, b, beta=math.inf, seed=0)
    assert len(pairs) == sum(x != y for x, y in zip(a, b)) < 391
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    for p in pairs:
        assert gold_reward(p["prompt"], p["chosen"]) >= gold_reward(p["prompt"], p["rejected"])
    ties = sum(gold_reward(p["prompt"], p["chosen"]) == gold_reward(p["prompt"], p["rejected"]) for p in pairs)
    assert best == pytest.approx((len(pairs) - ties * 0.5) / len(pairs))


def test_label_pairs_noise_matches_bradley_terry():
    n, beta = 4000, 2.0
    good, bad = "The hotel is lovely.", "The hotel is."  # gold +1 and -0.5: p(good) = sigmoid(3) = 0.9526
    rows = [{"prompt": HOTEL}] * n
    pairs, best = label_pairs(rows, [good, bad] * (n // 2), [bad, good] * (n // 2), beta=beta, seed=7)
    p = 1 / (1 + math.exp(-3.0))
    frac = sum(r["chosen"] == good for r in pairs) / n
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)  # within 4 standard errors
    assert best == pytest.approx(p)
    assert pairs == label_pairs(rows, [good, bad] * (n // 2), [bad, good] * (n // 2), beta=beta, seed=7)[0]
    assert pairs != label_pairs(rows, [good, bad] * (n // 2), [bad, good] * (n // 2), beta=beta, seed=8)[0]
    assert DEFAULT_BETA > 0 and math.isnan(label_pairs([HOTEL], [good], [good])[1])


def test_label_pairs_rows_are_valid_preference_data():
    pytest.importorskip("transformers")
    from rlhf.data import prepare
    from rlhf.tiny import build_tokenizer

    rows = sft_demonstrations(20, seed=0)
    other = sft_demonstrations(20, seed=5)
    pairs, _ = label_pairs(rows, [r["completion"] for r in rows], [r["completion"] for r in other], beta=4.0)
    prepared = prepare(pairs, build_tokenizer(), "preference", 64, overlong="error")
    assert len(prepared) == len(pairs) > 0
