"""Collators: prepared rows (lists of token ids, see :mod:`rlhf.data`) to padded tensors.

Attention masks come from the rows' lengths, never from the pad id, so a pad id equal to EOS cannot mask a real
token.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


def _pad(rows: list[list[int]], value: int, multiple: int | None = None, side: str = "right"):
    """(B, T) long tensor of `rows` padded with `value` on `side`, and its (B, T) attention mask.

    T is the longest row, rounded up to a multiple of `multiple` when given.
    """
    import torch

    length = max(len(row) for row in rows)
    length = -(-length // multiple) * multiple if multiple else length
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.as_tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


@dataclass
class SFTCollator:
    """Right-padded batch of prepared sft rows: input_ids, attention_mask, labels (B, T) long; labels -100 on pad."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        input_ids, attention_mask = _pad([r["input_ids"] for r in rows], self.pad_id, self.pad_to_multiple_of)
        labels = _pad([r["labels"] for r in rows], IGNORE_INDEX, self.pad_to_multiple_of)[0]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class PreferenceCollator:
    """One right-padded batch of 2B rows from B preference rows: rows 0..B-1 chosen, B..2B-1 rejected (same order).

    Keys: input_ids, attention_mask, labels (2B, T) long (labels -100 on pad); margin (B,) float32.
    """

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        input_ids, attention_mask = _pad(seqs, self.pad_id, self.pad_to_multiple_of)
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        labels = _pad(labels, IGNORE_INDEX, self.pad_to_multiple_of)[0]
        margin = torch.tensor([float(r.get("margin", 0.0)) for r in rows], dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "margin": margin}


@dataclass
class PromptCollator:
    """Batch of prepared prompt rows for generation: input_ids, attention_mask (B, T) long, left padding default."""

    pad_id: int
    padding_side: str = "left"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        input_ids, attention_mask = _pad(ids, self.pad_id, self.pad_to_multiple_of, self.padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
