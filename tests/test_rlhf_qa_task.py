"""The built-in verifiable task (rlhf.qa_task): disjoint splits, the exact checker, pass@1 / pass@k by hand, and
the mixed-quality demonstrations."""

import math

import pytest

from rlhf import qa_task
from rlhf.tiny import TASKS


def test_splits_are_disjoint_and_deterministic():
    train = qa_task.qa_rows(300, "train", seed=0)
    held_out = qa_task.qa_rows(100, "eval", seed=0)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held_out})
    assert all(qa_task.split_of(r["prompt"]) == "train" for r in train)
    assert train == qa_task.qa_rows(300, "train", seed=0) != qa_task.qa_rows(300, "train", seed=1)
    with pytest.raises(ValueError, match="split must be one of train, eval"):
        qa_task.qa_rows(3, "test")


def test_checker_is_exact_up_to_whitespace():
    assert qa_task.is_correct("  7 plus 5 is 12. ", "7 plus 5 is 12.")
    assert qa_task.is_correct("7 plus 5\nis 12.", "7 plus 5 is 12.")
    assert not qa_task.is_correct("7 plus 5 is 12", "7 plus 5 is 12.")
    assert not qa_task.is_correct("7 plus 5 is 13.", "7 plus 5 is 12.")


def test_pass_at_k_by_hand():
    # three questions, k = 4: fractions 2/4, 0/4, 4/4 -> pass@1 = 0.5; sample variance of (0.5, 0, 1) is 0.25,
    # s.e. = sqrt(0.25 / 3); two questions have a correct sample -> pass@k = 2/3
    out = qa_task.pass_at_k([[True, False, True, False], [False] * 4, [True] * 4])
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@1_sem"] == pytest.approx(math.sqrt(0.25 / 3))
    assert out["pass@k"] == pytest.approx(2 / 3) and out["k"] == 4
    with pytest.raises(ValueError, match="no questions"):
        qa_task.pass_at_k([])


def test_demonstrations_are_train_questions_of_mixed_quality():
    rows = qa_task.sft_demonstrations(2000, seed=0)
    assert len(rows) == 2000 and rows == qa_task.sft_demonstrations(2000, seed=0)
    assert all(qa_task.split_of(r["prompt"]) == "train" for r in rows)
    answers = {}
    for r in qa_task.qa_rows(4000, "train", seed=3):
        answers[r["prompt"]] = r["answer"]
    graded = [qa_task.is_correct(r["completion"], answers[r["prompt"]]) for r in rows if r["prompt"] in answers]
    assert len(graded) > 500
    share = sum(graded) / len(graded)
    # half are correct by construction; a rare "mistake" coincides with the answer (a sum of 1 off by -2 is printed
    # as |-1| = 1), so the share is 0.5 within sampling noise
    assert abs(share - qa_task.CORRECT_FRACTION) < 4 * math.sqrt(0.25 / len(graded))
    perfect = qa_task.sft_demonstrations(300, seed=0, correct_fraction=1.0)
    assert all(qa_task.is_correct(r["completion"], answers[r["prompt"]]) for r in perfect if r["prompt"] in answers)
    with pytest.raises(ValueError, match="correct_fraction"):
        qa_task.sft_demonstrations(3, correct_fraction=1.5)


def test_every_task_has_a_wrong_answer_that_the_checker_rejects():
    import random

    rng = random.Random(0)
    for task in TASKS:
        for _ in range(50):
            _, correct, wrong = task(rng)
            assert qa_task.is_correct(correct, correct)
            if wrong != correct:
                assert not qa_task.is_correct(wrong, correct)


def test_held_out_questions_can_be_distinct():
    rows = qa_task.qa_rows(200, "eval", seed=0, distinct=True)
    assert len({r["prompt"] for r in rows}) == 200
    assert all(qa_task.split_of(r["prompt"]) == "eval" for r in rows)
    with pytest.raises(ValueError, match="distinct eval questions, fewer than 1000"):
        qa_task.qa_rows(1000, "eval", distinct=True)


def test_paired_gain_is_the_mean_difference_with_its_standard_error():
    # differences 0.5, 0.0, 0.25, 0.25: mean 0.25; sample variance (0.0625 + 0.0625 + 0 + 0) / 3 = 0.0416667;
    # s.e. sqrt(0.0416667 / 4) = 0.1020621
    gain = qa_task.paired_gain([0.75, 0.5, 0.5, 1.0], [0.25, 0.5, 0.25, 0.75])
    assert gain["pass@1_gain"] == pytest.approx(0.25)
    assert gain["pass@1_gain_sem"] == pytest.approx(0.10206207261596575)
    with pytest.raises(ValueError, match="the same questions"):
        qa_task.paired_gain([0.5], [0.5, 0.5])
