"""Ranked preference data: K responses to one prompt with their ranking, for reward models (``rlhf rm``).

Format "ranked" (preference kind): ``prompt`` and ``responses`` (a list of K >= 2 responses, each a string or a
message list), best first unless the row says otherwise:

- ``ranks``: K ints >= 0, 0 = best, equal ranks = a tie (tied responses form no pair);
- ``scores``: K finite numbers, higher = better (equal scores tie); the ranks follow from them when ``ranks`` is
  absent, and ``score_margin`` turns score differences into pair margins.

Each response is tokenised with the prompt exactly as a chosen/rejected response is (:mod:`rlhf.data`). Over-long
responses follow ``overlong`` one by one ("drop" drops that response); a row left without two differently ranked
responses is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .collators import _pad
from .errors import UserError

RANKED_COLUMNS = ("prompt", "responses")


def _row_error(index: int | None, message: str) -> UserError:
    return UserError(message, where="example" if index is None else f"row {index}")


def _numbers(example: dict, field: str, count: int, index: int | None, *, integer: bool) -> list | None:
    """The row's ``field`` as ``count`` numbers (ints >= 0 with ``integer``, else finite floats), or None."""
    value = example.get(field)
    if value is None:
        return None
    what = "integers >= 0" if integer else "finite numbers"
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise _row_error(index, f"field {field!r} must be a list of {count} {what}, one per response, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _row_error(index, f"field {field!r} must hold {what}, got {v!r}")
        if integer and (v != int(v) or v < 0):
            raise _row_error(index, f"field {field!r} must hold {what} (0 = best), got {v!r}")
        if not integer and not math.isfinite(v):
            raise _row_error(index, f"field {field!r} must hold {what}, got {v!r}")
    return [int(v) for v in value] if integer else [float(v) for v in value]


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense ranks of ``scores`` (higher score = better = lower rank; equal scores share a rank)."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def row_ranking(example: dict, index: int | None) -> tuple[list, list[int], list[float] | None]:
    """``(responses, ranks, scores or None)`` of a ranked row, validated."""
    from .data import _field

    responses = example.get("responses")
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
        raise _row_error(index, f"field 'responses' must be a list of at least 2 responses, got {responses!r}")
    responses = [_field({"r": r}, "r", index, response=True) for r in responses]
    ranks = _numbers(example, "ranks", len(responses), index, integer=True)
    scores = _numbers(example, "scores", len(responses), index, integer=False)
    if ranks is None:
        ranks = ranks_from_scores(scores) if scores is not None else list(range(len(responses)))
    if len(set(ranks)) < 2:
        raise _row_error(index, f"all {len(responses)} responses are tied (ranks {ranks}): the row has no comparison")
    return responses, ranks, scores


def tokenize_ranked(example: dict, tokenizer, max_length: int, overlong: str = "drop", *, index=None):
    """``{"responses_input_ids": [K' id lists], "ranks": [K'], "scores": [K'] or None}`` of one ranked row, or
    None when fewer than two differently ranked responses fit ``max_length``."""
    from .data import _encode, _field, _fit, _has_template, _pair_segments

    prompt = _field(example, "prompt", index)
    responses, ranks, scores = row_ranking(example, index)
    kept_ids, kept_ranks, kept_scores = [], [], []
    for k, response in enumerate(responses):
        field = f"responses[{k}]"
        segments = _pair_segments(tokenizer, prompt, response, index, field)
        ids, labels = _encode(tokenizer, segments, _has_template(tokenizer))
        fitted = _fit(ids, labels, max_length, overlong, index, ("prompt", field))
        if fitted is not None:
            kept_ids.append(fitted[0])
            kept_ranks.append(ranks[k])
            kept_scores.append(0.0 if scores is None else scores[k])
    if len(set(kept_ranks)) < 2:
        return None
    return {"responses_input_ids": kept_ids, "ranks": kept_ranks, "scores": None if scores is None else kept_scores}


def is_ranked(rows: list[dict]) -> bool:
    """Whether prepared preference rows are ranked rows (else chosen/rejected pairs)."""
    return bool(rows) and "responses_input_ids" in rows[0]


@dataclass
class RankedCollator:
    """One right-padded batch of all responses of B ranked rows, each response once.

    Keys: ``input_ids, attention_mask (N, T)`` long, N = the rows' response count, row b's responses in order;
    ``slot (N,)`` long, the response's place ``b * K + k`` in the ``(B, K)`` layout (K the most responses of a
    row); ``ranks (B, K)`` long, -1 where a row has fewer responses; ``scores (B, K)`` float32, 0 where absent.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        K = max(len(r["ranks"]) for r in rows)
        seqs = [ids for r in rows for ids in r["responses_input_ids"]]
        input_ids, attention_mask = _pad(seqs, self.pad_id, self.pad_to_multiple_of)
        slot = [b * K + k for b, r in enumerate(rows) for k in range(len(r["ranks"]))]
        ranks = torch.full((len(rows), K), -1, dtype=torch.long)
        scores = torch.zeros((len(rows), K), dtype=torch.float32)
        for b, r in enumerate(rows):
            ranks[b, : len(r["ranks"])] = torch.tensor(r["ranks"], dtype=torch.long)
            if r.get("scores") is not None:
                scores[b, : len(r["scores"])] = torch.tensor(r["scores"], dtype=torch.float32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "slot": torch.tensor(slot, dtype=torch.long),
            "ranks": ranks,
            "scores": scores,
            "has_scores": torch.tensor([r.get("scores") is not None for r in rows]),
        }
