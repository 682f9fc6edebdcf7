"""Unpaired feedback for KTO (``rlhf kto``): rows, mismatched pairs and the collator.

Formats (data kind "unpaired"): "unpaired" (``prompt``, ``completion``, ``label``: True = desirable, False =
undesirable; 1/0 accepted), or preference data (explicit or implicit pairs), each pair split into one desirable
example (the chosen response) and one undesirable example (the rejected one). Completions are tokenised with
their prompt exactly as an SFT completion is (:mod:`rlhf.data`).

Mismatched pairs: KTO's reference point z is the policy's KL to the reference estimated on completions that do
not answer the prompt. Each row carries one, fixed when the data is prepared: its prompt followed by the
completion of the next row (cyclically) whose prompt differs, cut to ``max_length``. A fixed pairing keeps a
step's z a function of the step's rows only, whatever the micro-batching and the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .collators import IGNORE_INDEX, _pad
from .errors import UserError

UNPAIRED_COLUMNS = ("prompt", "completion", "label")


def _label(example: dict, index: int | None) -> bool:
    value = example.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    where = "example" if index is None else f"row {index}"
    raise UserError(f"field 'label' must be true (desirable) or false (undesirable), got {value!r}", where=where)


def tokenize_unpaired(example: dict, tokenizer, max_length: int, overlong: str = "drop", *, fmt=None, index=None):
    """The KTO examples of one row: ``[{"input_ids", "labels", "label"}]`` (two for a preference pair, the chosen
    one first), or None when dropped as over-long."""
    from .data import _encode, _field, _fit, _has_template, _pair_segments, detect_format, tokenize_preference

    fmt = fmt or detect_format([example], "unpaired")
    if fmt != "unpaired":
        pair = tokenize_preference(example, tokenizer, max_length, overlong, fmt=fmt, index=index)
        if pair is None:
            return None
        return [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"], "label": side == "chosen"}
            for side in ("chosen", "rejected")
        ]
    label = _label(example, index)
    prompt, completion = _field(example, "prompt", index), _field(example, "completion", index, response=True)
    segments = _pair_segments(tokenizer, prompt, completion, index, "completion")
    ids, labels = _encode(tokenizer, segments, _has_template(tokenizer))
    fitted = _fit(ids, labels, max_length, overlong, index, ("prompt", "completion"))
    return None if fitted is None else [{"input_ids": fitted[0], "labels": fitted[1], "label": label}]


def _split(row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a prepared row."""
    start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return row["input_ids"][:start], row["input_ids"][start:]


def add_mismatched(rows: list[dict], max_length: int) -> list[dict]:
    """Copies of ``rows`` with ``kl_input_ids, kl_labels``: the row's prompt followed by the completion of the next
    row (cyclically) with another prompt (the next row when every prompt is the same), cut to ``max_length``."""
    parts = [_split(row) for row in rows]
    out = []
    for i, row in enumerate(rows):
        prompt = parts[i][0]
        j = next(
            ((i + k) % len(rows) for k in range(1, len(rows)) if parts[(i + k) % len(rows)][0] != prompt),
            (i + 1) % len(rows),
        )
        completion = parts[j][1][: max_length - len(prompt)]
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
        out.append({**row, "kl_input_ids": ids, "kl_labels": labels})
    return out


def check_both_labels(rows: list[dict], what: str) -> None:
    """UserError when the rows hold no example at all or are all of one label (KTO still trains then, but a user
    who passes e.g. only chosen responses has most likely made a mistake)."""
    desirable = sum(1 for r in rows if r["label"])
    if desirable in (0, len(rows)):
        kind = "desirable" if desirable else "undesirable"
        raise UserError(f"the {what} data holds only {kind} examples (label all {bool(desirable)}); KTO needs both")


REF_KEYS = ("ref_logps", "ref_kl_logps")


@dataclass
class KTOCollator:
    """One right-padded batch of B examples: ``input_ids, attention_mask, labels (B, T)``, their mismatched pairs
    ``kl_input_ids, kl_attention_mask, kl_labels (B, T')``, ``desirable (B,)`` bool, and ``ref_logps,
    ref_kl_logps (B,)`` fp32 when the rows carry them."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        input_ids, attention_mask = _pad([r["input_ids"] for r in rows], self.pad_id)
        kl_ids, kl_mask = _pad([r["kl_input_ids"] for r in rows], self.pad_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX)[0],
            "kl_input_ids": kl_ids,
            "kl_attention_mask": kl_mask,
            "kl_labels": _pad([r["kl_labels"] for r in rows], IGNORE_INDEX)[0],
            "desirable": torch.tensor([bool(r["label"]) for r in rows]),
        }
        if REF_KEYS[0] in rows[0]:
            for key in REF_KEYS:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch
