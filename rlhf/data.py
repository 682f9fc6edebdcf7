"""Data for the training layer: loading, formats, validation, tokenisation and collators.

Formats (`detect_format`): sft "prompt_completion" | "messages"; preference "explicit" (prompt, chosen, rejected)
| "implicit" (chosen, rejected), optional float "margin" | "ranked" (prompt, responses: K ranked responses, optional
ranks or scores; :mod:`rlhf.ranked_data`); prompt "prompt" | "messages"; unpaired "unpaired" (prompt, completion,
label) or preference pairs split in two (:mod:`rlhf.kto_data`). A text field is a string or
a list of messages {"role", "content"}.

Rules:
- Chat template: when the tokenizer has one (or a field is a message list), a string prompt becomes one user turn
  and a string completion/chosen/rejected one assistant turn; the conversation is rendered with
  `apply_chat_template`, the part before a response with `add_generation_prompt=True`. Set
  `tokenizer.chat_template = None` to use plain strings: then prompt + completion are concatenated as they are,
  and message lists are joined with newlines (the newline before an assistant turn belongs to the prompt).
- Loss: labels are the tokens of every assistant turn after the prompt ("messages": every assistant turn), else
  IGNORE_INDEX. A row's prompt is everything before its first labelled token.
- Implicit preference: the prompt is the longest common prefix of the messages (message lists) or of the tokens
  (strings, always plain text). Explicit chosen/rejected message lists that repeat the prompt turns lose them.
- Tokens: prompt and responses are tokenised separately and concatenated, as generation sees them. Template text
  gets no special tokens from the tokenizer (the template writes its BOS); plain text gets the tokenizer's leading
  ones (BOS) unless it starts with them, never its trailing ones. EOS follows the last response unless it ends
  with one (whitespace after that EOS is dropped; with a template, a content's own final EOS text is removed).
- Over-long rows: "drop" removes them, "error" raises, "truncate" keeps the prompt whole and cuts the response
  from its end (no EOS re-added). A prompt of >= max_length tokens is always an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .collators import PreferenceCollator as PreferenceCollator
from .collators import PromptCollator as PromptCollator
from .collators import SFTCollator as SFTCollator
from .errors import UserError
from .kto_data import UNPAIRED_COLUMNS, tokenize_unpaired
from .ranked_data import RANKED_COLUMNS, tokenize_ranked
from .sources import KINDS, check_source, load_rows, origin_of, split_holdout  # noqa: F401  (re-exported)

IGNORE_INDEX = -100
FORMATS = {
    "sft": ("prompt_completion", "messages"),
    "preference": ("explicit", "implicit", "ranked"),
    "prompt": ("prompt", "messages"),
    "unpaired": ("unpaired", "explicit", "implicit"),
}
FORMAT_COLUMNS = {  # format -> required columns
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "ranked": RANKED_COLUMNS,
    "unpaired": UNPAIRED_COLUMNS,
    "prompt": ("prompt",),
}  # fmt: skip
OVERLONG = ("drop", "truncate", "error")
SIDES = ("chosen", "rejected")


# ---------------------------------------------------------------------------------------------------- formats


def detect_format(ds, kind: str) -> str:
    """The format name of `ds` (a Dataset or a list of dicts) for `kind`, from its columns.

    sft: "prompt_completion" (prompt, completion) else "messages". preference: "explicit" (prompt, chosen,
    rejected) else "implicit" (chosen, rejected). prompt: "prompt" else "messages".
    """
    if kind not in FORMATS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    columns = list(ds.column_names) if hasattr(ds, "column_names") else list(ds[0]) if len(ds) else []
    fmt = _match_format(columns, kind)
    if fmt is not None:
        return fmt
    accepted = "; ".join(f"{fmt}: {', '.join(FORMAT_COLUMNS[fmt])}" for fmt in FORMATS[kind])
    message = f"{kind} data has columns {columns}; accepted formats (required columns) are {accepted}"
    other = next((k for k in ("preference", "sft", "prompt") if k != kind and _match_format(columns, k)), None)
    if other is not None:
        message += f"; these columns are {other} data, for {STAGES_OF[other]}"
    origin = origin_of(ds)
    raise UserError(message, where=origin.source if origin else None)


STAGES_OF = {
    "sft": "`rlhf sft`",
    "preference": "`rlhf rm`, `rlhf dpo` or `rlhf kto`",
    "prompt": "`rlhf ppo` or `rlhf grpo`",
    "unpaired": "`rlhf kto`",
}  # kind -> stages


def _match_format(columns: list[str], kind: str) -> str | None:
    """The first format of `kind` whose required columns are all in `columns`."""
    return next((f for f in FORMATS[kind] if all(c in columns for c in FORMAT_COLUMNS[f])), None)


# ---------------------------------------------------------------------------------------------------- validation


def _where(index: int | None) -> str:
    return "example" if index is None else f"row {index}"


def _row_error(index: int | None, message: str) -> UserError:
    """An invalid row: `prepare` replaces the `row {index}` of the message by the place in the file."""
    return UserError(message, where=_where(index))


def _field(example: dict, field: str, index: int | None, response: bool = False):
    """example[field], a string or a message list; UserError when missing, None, or (a response) empty."""
    if field not in example:
        raise _row_error(index, f"missing field {field!r}")
    value = example[field]
    if value is None:
        what = "missing or null: no response" if response else "missing or null"
        raise _row_error(index, f"field {field!r} is None ({what})")
    if isinstance(value, str) and response and not value.strip():
        raise _row_error(index, f"field {field!r} is an empty response")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _check_messages(value, index, field)
    raise _row_error(index, f"field {field!r} must be a string or a list of messages, got {type(value)}")


def _check_messages(messages: Sequence, index: int | None, field: str) -> list[dict]:
    """Validated copy of a message list: dicts with a non-empty str role, str content, non-empty assistant turns."""
    if not messages:
        raise _row_error(index, f"field {field!r} is an empty message list")
    out = []
    for k, m in enumerate(messages):
        name = f"{field}[{k}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _row_error(index, f"field {name!r} must be a dict with a 'role' string, got {m!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise _row_error(index, f"field {name + '.content'!r} must be a string, got {content!r}")
        if m["role"] == "assistant" and not content.strip():
            raise _row_error(index, f"field {name + '.content'!r} is an empty assistant turn")
        out.append({"role": m["role"], "content": content})
    return out


def _margin(example: dict, index: int | None) -> float:
    """The optional float margin of a preference row (0.0 when absent or None)."""
    value = example.get("margin")
    try:
        margin = 0.0 if value is None else float(value)
    except (TypeError, ValueError):
        margin = math.nan
    if not math.isfinite(margin):
        raise _row_error(index, f"field 'margin' must be a finite number, got {value!r}")
    return margin


ADD_PAD = "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and model.resize_token_embeddings(len(tokenizer))"


def check_pad_token(tokenizer, kind: str) -> None:
    """UserError when the tokenizer has no pad token, or (kind "preference") its pad id equals its EOS id."""
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer has no pad token; add a distinct one, e.g. {ADD_PAD}")
    if kind == "preference" and tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(
            f"the tokenizer's pad token id ({tokenizer.pad_token_id}) equals its EOS id: the reward is read at the "
            "last real token, which is EOS, and a lookup that finds the last real token from the pad id then reads "
            f"the wrong position; add a distinct pad token, e.g. {ADD_PAD}"
        )


# ---------------------------------------------------------------------------------------------------- rendering

Segments = list[tuple[str, bool]]  # (text, labelled); their concatenation is the whole rendered sequence


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _without_eos(message: dict, eos: str | None) -> dict:
    """An assistant message without an EOS text at the end of its content (the template writes its own)."""
    content = message["content"].rstrip()
    if message["role"] != "assistant" or not eos or not content.endswith(eos) or content == eos:
        return message
    return {**message, "content": content[: -len(eos)]}


def _template_segments(tokenizer, messages: list[dict], start: int, index: int | None, field: str) -> Segments:
    """Chat-template segments of `messages`; assistant turns at positions >= start are labelled.

    A labelled segment runs from the end of the conversation before it rendered with add_generation_prompt=True
    to the end of the rendering that includes it. An EOS text ending an assistant turn's content is removed first.
    Whitespace after an EOS that ends a labelled segment goes to the next segment; whitespace after the last
    labelled segment is dropped.
    """
    eos = tokenizer.eos_token
    messages = [_without_eos(m, eos) for m in messages]
    full = _render(tokenizer, messages, False)
    segments, pos = [], 0
    for k in range(start, len(messages)):
        if messages[k]["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:k], True), _render(tokenizer, messages[: k + 1], False)
        if not (full.startswith(before) and full.startswith(through) and pos <= len(before) < len(through)):
            raise _row_error(
                index,
                f"field {field!r}: the chat template does not render turn {k} as a prefix of the "
                "whole conversation, so its response tokens cannot be located",
            )
        response = full[len(before) : len(through)]
        if eos and response.rstrip().endswith(eos):
            response = response.rstrip()
        segments += [(full[pos : len(before)], False), (response, True)]
        pos = len(before) + len(response)
    if full[pos:].strip():
        segments.append((full[pos:], False))
    return segments


def _plain_segments(messages: list[dict], start: int) -> Segments:
    """Template-free segments: contents joined with newlines; assistant turns at positions >= start labelled."""
    segments = []
    for k, m in enumerate(messages):
        sep = "\n" if k else ""
        if m["role"] == "assistant" and k >= start:
            segments += [(sep, False), (m["content"], True)]
        else:
            segments.append((sep + m["content"], False))
    return segments


def _conversation_segments(tokenizer, messages: list[dict], start: int, index: int | None, field: str) -> Segments:
    """Segments of a conversation whose assistant turns from `start` on are labelled; it must end with one."""
    if messages[-1]["role"] != "assistant":
        raise _row_error(
            index, f"field {field!r}: the last turn must be an assistant turn, got {messages[-1]['role']!r}"
        )
    if _has_template(tokenizer):
        return _template_segments(tokenizer, messages, start, index, field)
    return _plain_segments(messages, start)


def _strip_repeated_prompt(prompt: list[dict], response: list[dict]) -> list[dict]:
    """`response` without the prompt turns when it starts by repeating them (full conversations as responses)."""
    return response[len(prompt) :] if response[: len(prompt)] == prompt and len(response) > len(prompt) else response


def _pair_segments(tokenizer, prompt, response, index: int | None, field: str) -> Segments:
    """Segments of prompt + response (`field` names the response), each a string or a message list."""
    if not (_has_template(tokenizer) or isinstance(prompt, list) or isinstance(response, list)):
        return [(prompt, False), (response, True)]
    prompt_msgs = _as_messages(prompt, "user")
    response_msgs = _strip_repeated_prompt(prompt_msgs, _as_messages(response, "assistant"))
    return _conversation_segments(tokenizer, prompt_msgs + response_msgs, len(prompt_msgs), index, field)


# ---------------------------------------------------------------------------------------------------- tokenising


def _special_prefix(tokenizer) -> list[int]:
    """The special token ids the tokenizer puts in front of a single text (e.g. [bos_id]; often [])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def _encode(tokenizer, segments: Segments, templated: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the segments, each tokenised on its own and concatenated.

    Plain text (not `templated`) gets the tokenizer's leading special tokens unless it starts with them already.
    EOS follows a final labelled segment unless it ends with EOS (whitespace after such an EOS is dropped).
    """
    ids, labels, eos = [], [], tokenizer.eos_token
    if segments and segments[-1][1] and eos and segments[-1][0].rstrip().endswith(eos):
        segments = [*segments[:-1], (segments[-1][0].rstrip(), True)]
    for text, labelled in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    prefix = [] if templated else _special_prefix(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
    eos_id = tokenizer.eos_token_id
    if segments and segments[-1][1] and eos_id is not None and ids[-1] != eos_id:
        ids, labels = ids + [eos_id], labels + [eos_id]
    return ids, labels


def _prompt_length(labels: list[int]) -> int:
    """Number of tokens before the first labelled one."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _fit(ids, labels, max_length: int, overlong: str, index: int | None, fields: tuple[str, str]):
    """(ids, labels) fitted to max_length by the `overlong` rule, or None for a dropped row.

    fields: the names of the prompt and of the response, for error messages.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    n_prompt = _prompt_length(labels)
    if n_prompt >= max_length:
        raise _row_error(
            index, f"field {fields[0]!r}: the prompt alone is {n_prompt} tokens, >= max_length={max_length}"
        )
    if len(ids) <= max_length:
        return ids, labels
    if overlong == "error":
        raise _row_error(
            index,
            f"field {fields[1]!r}: the row is {len(ids)} tokens (prompt {n_prompt}, response "
            f"{len(ids) - n_prompt}), longer than max_length={max_length}",
        )
    if overlong == "drop":
        return None
    return ids[:max_length], labels[:max_length]


def _messages_field(example: dict, field: str, index: int | None) -> list[dict]:
    """A field that must hold a message list."""
    value = _field(example, field, index)
    if isinstance(value, str):
        raise _row_error(index, f"field {field!r} must be a list of messages, got a string")
    return value


def tokenize_sft(example: dict, tokenizer, max_length: int, overlong: str = "drop", *, fmt=None, index=None):
    """{"input_ids", "labels"} (python int lists, equal length <= max_length) of one sft row, or None if dropped.

    "prompt_completion": labels on the completion (+ EOS). "messages": labels on every assistant turn (the last
    turn must be an assistant turn; EOS after it); the prompt is everything before the first assistant turn.
    `fmt` defaults to the format of the example's keys; `index` names the row in error messages.
    """
    fmt = fmt or detect_format([example], "sft")
    if fmt == "messages":
        fields = ("messages", "messages")
        messages = _messages_field(example, "messages", index)
        first = next((k for k, m in enumerate(messages) if m["role"] == "assistant"), 0)
        segments = _conversation_segments(tokenizer, messages, first, index, "messages")
    else:
        fields = ("prompt", "completion")
        prompt, completion = _field(example, "prompt", index), _field(example, "completion", index, response=True)
        segments = _pair_segments(tokenizer, prompt, completion, index, "completion")
    ids, labels = _encode(tokenizer, segments, _has_template(tokenizer))
    fitted = _fit(ids, labels, max_length, overlong, index, fields)
    return None if fitted is None else {"input_ids": fitted[0], "labels": fitted[1]}


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _implicit_pair(example: dict, tokenizer, index: int | None) -> list[tuple[list[int], list[int]]]:
    """[(ids, labels) of chosen, of rejected]; their longest common prefix (messages or tokens) is the prompt."""
    values = [_field(example, field, index, response=True) for field in SIDES]
    plain = all(isinstance(v, str) for v in values)
    if plain:  # whole texts + EOS; an EOS alone after the shared tokens is no response
        sides = [_encode(tokenizer, [(v, True)], templated=False)[0] for v in values]
    else:
        sides = [_as_messages(v, "assistant") for v in values]
    n = _common_prefix(*sides)
    for field, side in zip(SIDES, sides, strict=True):
        if n >= len(side) - plain:
            raise _row_error(index, f"field {field!r}: nothing is left after the prompt shared by both sides")
    if plain:
        return [(ids, [IGNORE_INDEX] * n + ids[n:]) for ids in sides]
    templated = _has_template(tokenizer)
    return [
        _encode(tokenizer, _conversation_segments(tokenizer, msgs, n, index, field), templated)
        for field, msgs in zip(SIDES, sides, strict=True)
    ]


def tokenize_preference(example: dict, tokenizer, max_length: int, overlong: str = "drop", *, fmt=None, index=None):
    """{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "margin"} or None if dropped.

    "explicit": prompt + chosen and prompt + rejected. "implicit": the shared prefix of chosen and rejected is the
    prompt. Labels cover each response (+ EOS). The row is dropped when either side is over-long; "truncate" cuts
    each side on its own. margin: the row's float margin, 0.0 when absent.
    """
    fmt = fmt or detect_format([example], "preference")
    if fmt == "ranked":
        return tokenize_ranked(example, tokenizer, max_length, overlong, index=index)
    if example.get("chosen") is not None and example.get("chosen") == example.get("rejected"):
        raise _row_error(index, "fields 'chosen' and 'rejected' are identical")
    if fmt == "implicit":
        pair = _implicit_pair(example, tokenizer, index)
    else:
        prompt = _field(example, "prompt", index)
        segments = [_pair_segments(tokenizer, prompt, _field(example, f, index, True), index, f) for f in SIDES]
        pair = [_encode(tokenizer, s, _has_template(tokenizer)) for s in segments]
    out = {}
    for side, (ids, labels) in zip(SIDES, pair, strict=True):
        names = (side, side) if fmt == "implicit" else ("prompt", side)
        fitted = _fit(ids, labels, max_length, overlong, index, names)
        if fitted is None:
            return None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = fitted
    out["margin"] = _margin(example, index)
    return out


def tokenize_prompt(example: dict, tokenizer, max_length: int, overlong: str = "drop", *, fmt=None, index=None):
    """{"input_ids"} of one prompt row, ready for generation: no EOS; with a chat template, the generation prompt.

    A message list that ends with an assistant turn is used without it. A prompt of >= max_length tokens is a
    ValueError whatever `overlong` says (generation needs room).
    """
    fmt = fmt or detect_format([example], "prompt")
    value = _messages_field(example, fmt, index) if fmt == "messages" else _field(example, fmt, index)
    if not isinstance(value, str) and value[-1]["role"] == "assistant":
        value = value[:-1]
    if not value or (isinstance(value, str) and not value.strip()):
        raise _row_error(index, f"field {fmt!r} is an empty prompt")
    templated = _has_template(tokenizer)
    if templated:
        text = _render(tokenizer, _as_messages(value, "user"), True)
    else:
        text = value if isinstance(value, str) else "\n".join(m["content"] for m in value) + "\n"
    ids = _encode(tokenizer, [(text, False)], templated)[0]
    if len(ids) >= max_length:
        raise _row_error(index, f"field {fmt!r}: the prompt alone is {len(ids)} tokens, >= max_length={max_length}")
    return {"input_ids": ids}


TOKENIZERS: dict[str, Callable] = {
    "sft": tokenize_sft,
    "preference": tokenize_preference,
    "prompt": tokenize_prompt,
    "unpaired": tokenize_unpaired,  # a list of examples per row
}


def prepare(ds, tokenizer, kind: str, max_length: int, overlong: str = "drop", *, log=print) -> list[dict]:
    """Validate and tokenise every row of `ds` (a Dataset or a list of dicts) for `kind`; a list of dicts of ints.

    Over-long rows are dropped, truncated or an error per `overlong`; dropped rows are reported in one line through
    `log`. Raises UserError (a ValueError) naming the row and field for an invalid row, and when every row was
    dropped. The row is named as the user counts it when `ds` comes from `load_rows`/`split_holdout`: the file's
    line for JSON Lines, else its row in the file ("row i" of the held-out split is row j of the file).
    """
    fmt = detect_format(ds, kind)
    check_pad_token(tokenizer, kind)
    tokenize, origin = TOKENIZERS[kind], origin_of(ds)
    rows = []
    for i, example in enumerate(ds):
        try:
            rows.append(tokenize(example, tokenizer, max_length, overlong, fmt=fmt, index=i))
        except UserError as err:
            if origin is None:
                raise
            raise err.located(origin.where(i)) from err
    kept = [row for row in rows if row is not None]
    out = [example for row in kept for example in (row if isinstance(row, list) else [row])]
    if len(kept) < len(rows):
        log(f"dropped {len(rows) - len(kept)} of {len(rows)} rows longer than max_length={max_length}")
    if rows and not kept:
        where = origin.source if origin else None
        raise UserError(f"all {len(rows)} rows are longer than max_length={max_length}", where=where)
    return out
