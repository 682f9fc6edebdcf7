"""The built-in verifiable task: short questions with one exact answer, the question/answer tasks of
:mod:`rlhf.tiny` (add two numbers, the next number, count letters, spell backwards or in capitals, an opposite, a
colour). A completion is correct when it is the answer sentence ("7 plus 5 is 12."), whitespace aside: a checker,
not a model, so the reward of GRPO on it is exact.

Train and held-out questions are disjoint: each question string belongs to one split by a CRC32 hash (one in
``EVAL_EVERY``). The SFT demonstrations answer train questions, half of them correctly and half with the task's
typical mistake (mixed quality, like people's demonstrations): the SFT policy learns both the right answer and
the mistake, so it starts well between 0 and 1 accuracy, and a reward for exact answers can teach it to prefer the
right one on questions it has never seen.

``pass@1`` is the mean over questions of the fraction of ``k`` samples that are correct (unbiased); ``pass@k`` the
fraction of questions with at least one correct sample among the ``k``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

EVAL_EVERY = 5  # one question in EVAL_EVERY (by hash) is held out
CORRECT_FRACTION = 0.5  # of the SFT demonstrations; the rest make the task's typical mistake
SPLITS = ("train", "eval")


def split_of(question: str) -> str:
    return "eval" if zlib.crc32(question.encode()) % EVAL_EVERY == 0 else "train"


def is_correct(completion: str, answer: str) -> bool:
    """The completion is the answer sentence, whitespace aside."""
    return " ".join(completion.split()) == " ".join(str(answer).split())


def qa_rows(n: int, split: str, seed: int = 0, *, distinct: bool = False) -> list[dict]:
    """``n`` rows ``{"prompt", "answer"}`` of ``split``. Questions may repeat (the task has a few thousand, a few
    hundred of them held out) unless ``distinct``: then every question once (ValueError when the split has fewer
    than ``n``; held-out accuracy is measured on distinct questions, so that its standard error is honest)."""
    from .tiny import builtin_rows

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rows, seen, batch, drawn = [], set(), max(4 * n, 64), 0
    while len(rows) < n:
        fresh = 0
        for row in builtin_rows("prompt", batch, seed=seed * 7919 + drawn):
            if split_of(row["prompt"]) == split and len(rows) < n and not (distinct and row["prompt"] in seen):
                rows.append(row)
                seen.add(row["prompt"])
                fresh += 1
        drawn += 1
        if distinct and fresh == 0 and drawn >= 3:  # a draw of 4n rows found no new question: none is left
            raise ValueError(f"the qa task has only {len(rows)} distinct {split} questions, fewer than {n}")
    return rows


def sft_demonstrations(n: int, seed: int = 0, correct_fraction: float = CORRECT_FRACTION) -> list[dict]:
    """``n`` SFT rows ``{"prompt", "completion"}`` on train questions, of mixed quality like people's
    demonstrations: each is the correct answer sentence with probability ``correct_fraction``, else the task's
    typical mistake in the same sentence (a sum off by a few, the number itself for its successor, a word left
    unreversed or only capitalised, another pair's opposite, another colour)."""
    import random

    from .tiny import TASKS

    if not 0.0 <= correct_fraction <= 1.0:
        raise ValueError(f"correct_fraction must be in [0, 1], got {correct_fraction}")
    rng = random.Random(f"rlhf-qa-sft-{seed}")
    rows = []
    while len(rows) < n:
        question, correct, wrong = rng.choice(TASKS)(rng)
        answer = correct if rng.random() < correct_fraction else wrong
        if split_of(question) == "train":
            rows.append({"prompt": question, "completion": answer})
    return rows


def pass_at_k(correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """From ``k`` graded samples per question: ``pass@1`` (mean fraction correct) with its standard error over
    questions, and ``pass@k``."""
    n = len(correct)
    if n == 0:
        raise ValueError("no questions to grade")
    fractions = [sum(c) / len(c) for c in correct]
    mean, sem = mean_and_sem(fractions)
    return {
        "pass@1": mean,
        "pass@1_sem": sem,
        "pass@k": sum(any(c) for c in correct) / n,
        "k": len(correct[0]),
        "per_question": fractions,
    }


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n)


def paired_gain(policy: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """The mean per-question gain of pass@1 over a baseline on the same questions, with its paired standard error
    (the standard error of the mean of the per-question differences)."""
    if len(policy) != len(baseline):
        raise ValueError(f"{len(policy)} and {len(baseline)} questions: a paired gain needs the same questions")
    gain, sem = mean_and_sem([p - b for p, b in zip(policy, baseline, strict=True)])
    return {"pass@1_gain": gain, "pass@1_gain_sem": sem}


def evaluate_qa(model, tokenizer, rows: list[dict], *, k: int, max_new_tokens: int, seed: int = 0,
                batch_size: int = 64) -> dict:  # fmt: skip
    """``k`` samples (temperature 1) per held-out question of ``rows`` ``{"prompt", "answer"}``, graded:
    :func:`pass_at_k`."""
    from .evaluate import sample_responses

    samples = sample_responses(model, tokenizer, rows, n=k, max_new_tokens=max_new_tokens, seed=seed,
                               batch_size=batch_size)  # fmt: skip
    out = pass_at_k([[is_correct(s, r["answer"]) for s in group] for group, r in zip(samples, rows, strict=True)])
    out["num_prompts"] = len(rows)
    return out
