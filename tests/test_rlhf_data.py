"""rlhf.data: loading, formats, validation, tokenisation rules and collators."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402

from rlhf.data import (  # noqa: E402
    IGNORE_INDEX,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    check_pad_token,
    detect_format,
    load_rows,
    prepare,
    split_holdout,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)
from rlhf.tiny import build_tokenizer, builtin_rows  # noqa: E402

PROMPT, ANSWER = "What is 3 plus 4?", "3 plus 4 is 7."
CHATML = (  # a template whose turns end with EOS and a newline
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    t = build_tokenizer()
    t.chat_template = None
    return t


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled(row, key="labels"):
    return [t for t in row[key] if t != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------- tokenisation


def test_sft_prompt_masked_token_by_token_with_chat_template(tok):
    row = tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, 64)
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids, answer_ids = enc(tok, prompt_text), enc(tok, ANSWER)
    assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1
    assert row["input_ids"] == prompt_ids + answer_ids + [tok.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tok.eos_token_id]
    full = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}], tokenize=False
    )
    assert tok.decode(row["input_ids"]) == full  # the chat-template rendering, EOS once


def test_sft_plain_strings_without_template(plain_tok):
    tok = plain_tok
    row = tokenize_sft({"prompt": PROMPT, "completion": " " + ANSWER}, tok, 64)
    prompt_ids = [tok.bos_token_id] + enc(tok, PROMPT)
    assert row["input_ids"] == prompt_ids + enc(tok, " " + ANSWER) + [tok.eos_token_id]
    assert row["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert row["labels"][len(prompt_ids) :] == row["input_ids"][len(prompt_ids) :]


@pytest.mark.parametrize("templated", [True, False])
def test_eos_appended_once_and_bos_never_doubled(tok, plain_tok, templated):
    t = tok if templated else plain_tok
    # a literal "<s>" opening a plain prompt is the BOS itself (with a template it is user text inside the turn)
    bos_text = "" if templated else "<s>"
    for prompt, completion in [(PROMPT, ANSWER), (bos_text + PROMPT, ANSWER + "</s>"), (PROMPT, ANSWER + "</s>\n")]:
        row = tokenize_sft({"prompt": prompt, "completion": completion}, t, 64)
        ids = row["input_ids"]
        assert ids[-1] == t.eos_token_id and ids.count(t.eos_token_id) == 1, (prompt, completion)
        assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1, (prompt, completion)
        assert row["labels"][-1] == t.eos_token_id


def test_eos_not_doubled_when_template_ends_turns_with_eos_and_newline(tok):
    t = build_tokenizer()
    t.chat_template = CHATML
    row = tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, t, 64)
    assert row["input_ids"][-1] == t.eos_token_id and row["input_ids"].count(t.eos_token_id) == 2  # user + answer
    assert t.decode(labelled(row)) == ANSWER + "</s>"  # the trailing newline is dropped
    prompt_ids = enc(t, f"<|im_start|>user\n{PROMPT}</s>\n<|im_start|>assistant\n")
    assert row["input_ids"][: len(prompt_ids)] == prompt_ids  # no BOS: the template writes none
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    row = tokenize_sft({"messages": [*chat, *chat]}, t, 128)
    assert t.decode(row["input_ids"]) == t.apply_chat_template([*chat, *chat], tokenize=False).rstrip()
    assert t.decode(labelled(row)) == "Hello.</s>Hello.</s>"  # the newline after an earlier turn is not labelled


def test_messages_loss_on_every_assistant_turn(tok):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": ANSWER},
    ]
    row = tokenize_sft({"messages": chat}, tok, 128)
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(chat, tokenize=False)
    assert tok.decode(labelled(row)) == "Hello.</s>" + ANSWER + "</s>"
    first = row["labels"].index(enc(tok, "Hello.")[0])
    assert row["input_ids"][:first] == enc(
        tok, tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    )
    masked = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == IGNORE_INDEX]
    assert tok.decode(masked).count("<|user|>") == 2 and tok.decode(masked).count("<|assistant|>") == 2


def test_messages_without_template_join_with_newlines(plain_tok):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    row = tokenize_sft({"messages": chat}, plain_tok, 64)
    assert plain_tok.decode(row["input_ids"], skip_special_tokens=True) == "Hi\nHello."
    assert row["input_ids"] == [plain_tok.bos_token_id] + enc(plain_tok, "Hi\n") + enc(plain_tok, "Hello.") + [2]
    assert plain_tok.decode(labelled(row)) == "Hello.</s>"
    chat += [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao."}]
    row = tokenize_sft({"messages": chat}, plain_tok, 64)
    assert plain_tok.decode(row["input_ids"], skip_special_tokens=True) == "Hi\nHello.\nBye\nCiao."
    assert plain_tok.decode(labelled(row)) == "Hello.Ciao.</s>"  # every assistant turn; EOS only at the end


def test_preference_explicit_with_template_and_margin(tok):
    example = {"prompt": PROMPT, "chosen": ANSWER, "rejected": "3 plus 4 is 9.", "margin": 2}
    row = tokenize_preference(example, tok, 64)
    sft = tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, 64)
    assert (row["chosen_input_ids"], row["chosen_labels"]) == (sft["input_ids"], sft["labels"])
    assert tok.decode(labelled(row, "rejected_labels")) == "3 plus 4 is 9.</s>"
    assert row["margin"] == 2.0 and isinstance(row["margin"], float)
    assert tokenize_preference({k: v for k, v in example.items() if k != "margin"}, tok, 64)["margin"] == 0.0


def test_preference_explicit_message_lists_that_repeat_the_prompt(tok):
    user = {"role": "user", "content": PROMPT}
    example = {
        "prompt": [user],
        "chosen": [user, {"role": "assistant", "content": ANSWER}],
        "rejected": [{"role": "assistant", "content": "No idea."}],
    }
    row = tokenize_preference(example, tok, 64)
    assert tok.decode(row["chosen_input_ids"]).count(PROMPT) == 1
    assert tok.decode(labelled(row, "chosen_labels")) == ANSWER + "</s>"
    assert tok.decode(labelled(row, "rejected_labels")) == "No idea.</s>"


def test_preference_implicit_prompt_is_the_common_prefix(tok):
    # strings: the shared tokens are the prompt
    row = tokenize_preference({"chosen": "The sky is blue.", "rejected": "The sky is green."}, tok, 64)
    shared = [tok.bos_token_id] + enc(tok, "The sky is")
    for side, answer in (("chosen", " blue."), ("rejected", " green.")):
        assert row[f"{side}_input_ids"] == shared + enc(tok, answer) + [tok.eos_token_id]
        assert row[f"{side}_labels"] == [IGNORE_INDEX] * len(shared) + enc(tok, answer) + [tok.eos_token_id]
    # message lists: the shared turns are the prompt
    user = {"role": "user", "content": PROMPT}
    chosen = [user, {"role": "assistant", "content": ANSWER}]
    rejected = [user, {"role": "assistant", "content": "3 plus 4 is 9."}]
    row = tokenize_preference({"chosen": chosen, "rejected": rejected}, tok, 64)
    explicit = tokenize_preference({"prompt": PROMPT, "chosen": ANSWER, "rejected": "3 plus 4 is 9."}, tok, 64)
    assert row == {**explicit, "margin": 0.0}


def test_prompt_rows_end_with_generation_prompt_and_no_eos(tok, plain_tok):
    row = tokenize_prompt({"prompt": PROMPT}, tok, 64)
    assert row["input_ids"] == enc(tok, f"<s><|user|>\n{PROMPT}\n<|assistant|>\n")
    chat = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]
    assert tokenize_prompt({"messages": chat}, tok, 64) == row  # a final assistant turn is left out
    plain = tokenize_prompt({"prompt": PROMPT}, plain_tok, 64)["input_ids"]
    assert plain == [plain_tok.bos_token_id] + enc(plain_tok, PROMPT)
    assert tokenize_prompt({"messages": chat}, plain_tok, 64)["input_ids"] == plain + enc(plain_tok, "\n")


def test_truncate_keeps_prompt_and_cuts_response_end(tok):
    full = tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, 64)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    for max_length in (n_prompt + 1, n_prompt + 3, len(full["input_ids"]) - 1):
        row = tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, max_length, "truncate")
        assert row["input_ids"] == full["input_ids"][:max_length]  # no EOS re-added
        assert row["labels"] == full["labels"][:max_length]
    assert tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, len(full["input_ids"]), "truncate") == full
    assert tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, n_prompt + 1, "drop") is None
    with pytest.raises(ValueError, match=f"the prompt alone is {n_prompt} tokens, >= max_length={n_prompt}"):
        tokenize_sft({"prompt": PROMPT, "completion": ANSWER}, tok, n_prompt, "truncate")  # no room for a response


def test_overlong_error_names_row_and_lengths(tok):
    rows = [{"prompt": "Hi", "completion": "Yo."}] * 2 + [{"prompt": "Hi", "completion": "word " * 40}]
    with pytest.raises(ValueError, match=r"row 2: field 'completion': the row is \d+ tokens .*max_length=20"):
        prepare(rows, tok, "sft", 20, "error")


@pytest.mark.parametrize("overlong", ["drop", "truncate", "error"])
def test_prompt_longer_than_max_length_is_always_an_error(tok, overlong):
    rows = [{"prompt": "Hi", "completion": "Yo."}, {"prompt": "word " * 40, "completion": "Yo."}]
    with pytest.raises(ValueError, match=r"row 1: field 'prompt': the prompt alone is \d+ tokens, >= max_length=20"):
        prepare(rows, tok, "sft", 20, overlong)
    pref = [{"prompt": "word " * 40, "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="row 0: field 'prompt': the prompt alone"):
        prepare(pref, tok, "preference", 20, overlong)
    with pytest.raises(ValueError, match="row 0: field 'prompt': the prompt alone"):
        prepare([{"prompt": "word " * 40}], tok, "prompt", 20, overlong)


def test_prepare_drops_overlong_rows_and_prints_one_line(tok):
    rows = builtin_rows("sft", 20) + [{"prompt": "Hi", "completion": "word " * 80}] * 3
    lines = []
    out = prepare(rows, tok, "sft", 48, log=lines.append)
    assert len(out) == 20 and lines == ["dropped 3 of 23 rows longer than max_length=48"]
    assert all(len(r["input_ids"]) == len(r["labels"]) <= 48 for r in out)
    lines.clear()
    assert len(prepare(builtin_rows("sft", 5), tok, "sft", 48, log=lines.append)) == 5 and lines == []
    with pytest.raises(ValueError, match="all 3 rows are longer than max_length=48"):
        prepare(rows[20:], tok, "sft", 48, log=lines.append)


def test_prepare_preference_drops_row_when_either_side_is_too_long(tok):
    rows = [
        {"prompt": "Hi", "chosen": "Yo.", "rejected": "word " * 40},
        {"prompt": "Hi", "chosen": "a", "rejected": "b"},
    ]
    lines = []
    out = prepare(rows, tok, "preference", 24, log=lines.append)
    assert len(out) == 1 and lines == ["dropped 1 of 2 rows longer than max_length=24"]
    cut = prepare(rows, tok, "preference", 24, "truncate")[0]
    whole = tokenize_preference(rows[0], tok, 64)
    assert cut["chosen_input_ids"] == whole["chosen_input_ids"]  # each side is cut on its own
    assert cut["rejected_input_ids"] == whole["rejected_input_ids"][:24]


# ---------------------------------------------------------------------------------------------------- validation

GOOD = {
    "sft": {"prompt": PROMPT, "completion": ANSWER},
    "preference": {"prompt": PROMPT, "chosen": ANSWER, "rejected": "3 plus 4 is 9."},
    "messages": {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]},
}
BAD = [  # (kind, good row, bad row, message pattern after "row 2: ")
    ("sft", "sft", {"prompt": PROMPT}, "missing field 'completion'"),
    ("sft", "sft", {"completion": ANSWER}, "missing field 'prompt'"),
    ("sft", "sft", {"prompt": PROMPT, "completion": None}, "field 'completion' is None"),
    ("sft", "sft", {"prompt": PROMPT, "completion": "  "}, "field 'completion' is an empty response"),
    ("sft", "sft", {"prompt": None, "completion": ANSWER}, "field 'prompt' is None"),
    ("sft", "sft", {"prompt": 3, "completion": ANSWER}, "field 'prompt' must be a string or a list of messages"),
    (
        "sft",
        "messages",
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ""}]},
        r"field 'messages\[1\].content' is an empty assistant turn",
    ),
    (
        "sft",
        "messages",
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": None}]},
        r"field 'messages\[1\].content' must be a string",
    ),
    ("sft", "messages", {"messages": [{"content": PROMPT}]}, r"field 'messages\[0\]' must be a dict with a 'role'"),
    (
        "sft",
        "messages",
        {"messages": [{"role": "user", "content": PROMPT}]},
        "field 'messages': the last turn must be an assistant turn",
    ),
    ("sft", "messages", {"messages": []}, "field 'messages' is an empty message list"),
    ("sft", "messages", {"messages": PROMPT}, "field 'messages' must be a list of messages"),
    (
        "preference",
        "preference",
        {"prompt": PROMPT, "chosen": "x", "rejected": "x"},
        "fields 'chosen' and 'rejected' are identical",
    ),
    (
        "preference",
        "preference",
        {"prompt": PROMPT, "chosen": "", "rejected": "x"},
        "field 'chosen' is an empty response",
    ),
    ("preference", "preference", {"prompt": PROMPT, "chosen": "x", "rejected": None}, "field 'rejected' is None"),
    ("preference", "preference", {"prompt": PROMPT, "chosen": "x"}, "missing field 'rejected'"),
    ("preference", "preference", {"prompt": PROMPT, "chosen": "x", "rejected": "y", "margin": "big"}, "field 'margin'"),
    ("prompt", "sft", {"prompt": " "}, "field 'prompt' is an empty prompt"),
]


@pytest.mark.parametrize(("kind", "good", "bad", "message"), BAD, ids=[b[3][:40] for b in BAD])
def test_validation_errors_name_row_and_field(tok, kind, good, bad, message):
    rows = [GOOD[good], GOOD[good], bad]
    with pytest.raises(ValueError, match="row 2: " + message):
        prepare(rows, tok, kind, 64)


def test_implicit_errors_name_row_and_field(tok):
    rows = [{"chosen": "Yes.", "rejected": "No."}, {"chosen": "The sky", "rejected": "The sky is blue."}]
    assert len(prepare(rows[:1], tok, "preference", 64)) == 1  # nothing shared but BOS is fine
    with pytest.raises(ValueError, match="row 1: field 'chosen': nothing is left after the prompt"):
        prepare(rows, tok, "preference", 64)


def test_check_pad_token(tok):
    check_pad_token(tok, "preference")
    same = build_tokenizer()
    same.pad_token = same.eos_token
    check_pad_token(same, "sft")  # our collators pad by length, so sft accepts pad == eos
    with pytest.raises(
        ValueError, match="pad token id .* equals its EOS id: the reward is read at the last real token"
    ):
        prepare(builtin_rows("preference", 2), same, "preference", 64)
    none = build_tokenizer()
    none.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*add_special_tokens"):
        prepare(builtin_rows("sft", 2), none, "sft", 64)


def test_detect_format_and_unknown_schema():
    cases = [
        ("sft", [GOOD["sft"]], "prompt_completion"),
        ("sft", [GOOD["messages"]], "messages"),
        ("preference", [GOOD["preference"]], "explicit"),
        ("preference", [{"chosen": "a", "rejected": "b"}], "implicit"),
        ("prompt", [{"prompt": "a"}], "prompt"),
        ("prompt", [GOOD["messages"]], "messages"),
    ]
    for kind, rows, fmt in cases:
        assert detect_format(rows, kind) == fmt
        assert detect_format(datasets.Dataset.from_list(rows), kind) == fmt
    with pytest.raises(
        ValueError, match=r"columns \['question', 'answer'\]; accepted .*prompt_completion: prompt, com"
    ):
        detect_format([{"question": "q", "answer": "a"}], "sft")
    with pytest.raises(ValueError, match="unknown data kind 'rl'"):
        detect_format([GOOD["sft"]], "rl")
    with pytest.raises(ValueError, match="overlong must be one of drop, truncate, error"):
        prepare([GOOD["sft"]], build_tokenizer(), "sft", 64, "cut")


# ---------------------------------------------------------------------------------------------------- loading


def test_load_builtin_and_split_selection():
    ds = load_rows("builtin:preference")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 512
    assert ds[0] == builtin_rows("preference", 1)[0]
    assert load_rows("builtin:sft", "train[:10%]").to_list() == builtin_rows("sft", 51)  # datasets rounds 51.2
    assert len(load_rows("builtin:prompt", "train[-6:]")) == 6
    with pytest.raises(ValueError, match="cannot select split 'test'"):
        load_rows("builtin:sft", "test")
    with pytest.raises(ValueError, match="unknown built-in data kind 'ppo'"):
        load_rows("builtin:ppo")


ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(5)]


def _write(path, rows):
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_load_each_file_format(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    _write(path, ROWS)
    ds = load_rows(str(path))
    assert isinstance(ds, datasets.Dataset) and ds.to_list() == ROWS
    assert load_rows(str(path), "train[1:3]").to_list() == ROWS[1:3]


def test_load_directories_and_missing_paths(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert load_rows(str(saved)).to_list() == ROWS
    split = tmp_path / "split"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:3]), "test": datasets.Dataset.from_list(ROWS[3:])}
    ).save_to_disk(str(split))
    assert load_rows(str(split), "test").to_list() == ROWS[3:]
    assert load_rows(str(split), "train[:1]+test").to_list() == [ROWS[0], *ROWS[3:]]
    files = tmp_path / "files"
    files.mkdir()
    _write(files / "train.jsonl", ROWS[:4])
    _write(files / "test.jsonl", ROWS[4:])
    assert load_rows(str(files)).to_list() == ROWS[:4] and load_rows(str(files), "test").to_list() == ROWS[4:]
    for missing in (str(tmp_path / "nope.jsonl"), str(tmp_path / "nope"), "./nope", "nope.parquet"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_rows(missing)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown data file type '.txt'"):
        load_rows(str(tmp_path / "data.txt"))


def test_prepare_accepts_a_dataset_of_messages(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    _write(path, [GOOD["messages"]] * 3)
    out = prepare(load_rows(str(path)), tok, "sft", 64)
    assert out == [tokenize_sft(GOOD["messages"], tok, 64)] * 3


def test_split_holdout_is_deterministic_and_disjoint():
    ds = load_rows("builtin:sft")
    train, held = split_holdout(ds, 0.1, seed=0)
    assert (len(train), len(held)) == (460, 52)
    again = split_holdout(ds, 0.1, seed=0)
    assert train[:] == again[0][:] and held[:] == again[1][:]
    assert held[:] != split_holdout(ds, 0.1, seed=1)[1][:]
    rows = builtin_rows("sft", 10)
    tr, ev = split_holdout(rows, 0.25, seed=3)
    assert len(ev) == 3 and sorted(map(str, tr + ev)) == sorted(map(str, rows))
    assert split_holdout(rows, 0.01, seed=0)[1] != [] and split_holdout(rows, 0.0, seed=0) == (rows, [])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_holdout(rows, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------------- error places


def _without_completion(i):
    rows = [dict(r) for r in ROWS * 2]  # 10 rows
    rows[i] = {"prompt": rows[i]["prompt"], "completion": None}
    return rows


def test_errors_name_the_jsonl_line_after_slicing_and_holdout(tmp_path, tok):
    # rows 0..9; a blank line after row 0 and one after row 4: row i is on line i + 1 (i = 0), i + 2 (1 <= i <= 4),
    # i + 3 (i >= 5). Row 7 is on line 10.
    lines = [json.dumps(r) for r in _without_completion(7)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines[:1] + [""] + lines[1:5] + ["  "] + lines[5:]) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl, line 10: field 'completion' is None"):
        prepare(load_rows(str(path)), tok, "sft", 64)
    # train[2:] holds file rows 2..9; seed 3 holds out its positions 0, 5, 7 (file rows 2, 7, 9): file row 7 is
    # row 1 of the held-out split, which the message must not name
    assert split_holdout(list(range(8)), 0.3, seed=3)[1] == [0, 5, 7]
    train, held = split_holdout(load_rows(str(path), "train[2:]"), 0.3, seed=3)
    assert held["completion"][1] is None
    prepare(train, tok, "sft", 64)
    with pytest.raises(ValueError, match=r"^\S*data\.jsonl, line 10: field 'completion'"):
        prepare(held, tok, "sft", 64)


def test_errors_name_the_file_row_of_other_formats(tmp_path, tok):
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(_without_completion(7)).to_parquet(str(path))
    assert split_holdout(list(range(10)), 0.3, seed=0)[1] == [1, 7, 8]  # file row 7 is held-out row 1
    with pytest.raises(ValueError, match=r"data\.parquet, row 7: field 'completion'"):
        prepare(split_holdout(load_rows(str(path)), 0.3, seed=0)[1], tok, "sft", 64)
    held = split_holdout(datasets.Dataset.from_list(_without_completion(7)), 0.3, seed=0)[1]  # built in memory
    with pytest.raises(ValueError, match=r"^row 7: field 'completion'"):
        prepare(held, tok, "sft", 64)
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(_without_completion(3))}
    ).save_to_disk(str(saved))
    with pytest.raises(ValueError, match=r"saved split 'test', row 3: field 'completion'"):
        prepare(load_rows(str(saved), "train+test"), tok, "sft", 64)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.jsonl", '{"prompt": "a"}\n\n{"prompt": "c",, "completion": "d"}\n', "line 3: not valid JSON"),
        ("a.jsonl", '{"prompt": "a"}\n["c", "d"]\n', "line 2: expected a JSON object"),
        ("a.json", '[\n  {"prompt": "a"},\n  {"prompt": "c" "completion": "d"}\n]\n', "line 3: not valid JSON"),
    ],
)
def test_unparsable_json_names_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{name}, {message}"):
        load_rows(str(path))


def test_wrong_kind_of_data_names_the_stage_for_it(tmp_path):
    path = tmp_path / "pairs.jsonl"
    _write(path, [GOOD["preference"]] * 2)
    with pytest.raises(
        ValueError, match=r"pairs\.jsonl: sft data has columns .*preference data, for `rlhf rm`, `rlhf dpo` or"
    ):
        detect_format(load_rows(str(path)), "sft")
    with pytest.raises(ValueError, match=r"preference data has columns .*these columns are sft data, for `rlhf sft`"):
        detect_format([GOOD["sft"]], "preference")


# ---------------------------------------------------------------------------------------------------- collators


def test_sft_collator_pads_right():
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = SFTCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert all(v.dtype == torch.long for v in batch.values())
    wide = SFTCollator(pad_id=9, pad_to_multiple_of=4)(rows)
    assert wide["input_ids"].tolist() == [[1, 5, 6, 9], [1, 7, 9, 9]] and wide["labels"].shape == (2, 4)


def test_preference_collator_stacks_chosen_then_rejected():
    rows = [
        {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 3, 3, 2],
         "rejected_labels": [-100, 3, 3, 2], "margin": 1.5},
        {"chosen_input_ids": [1, 4, 2], "chosen_labels": [-100, 4, 2], "rejected_input_ids": [1, 2],
         "rejected_labels": [-100, 2], "margin": 0.0},
    ]  # fmt: skip
    batch = PreferenceCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [1, 4, 2, 0], [1, 3, 3, 2], [1, 2, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 3, 4, 2]
    assert batch["labels"].tolist()[0] == [-100, 2, -100, -100] and batch["labels"].tolist()[2] == [-100, 3, 3, 2]
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.5, 0.0]
    assert PreferenceCollator(0, pad_to_multiple_of=8)(rows)["input_ids"].shape == (4, 8)


def test_prompt_collator_pads_left_for_generation():
    rows = [{"input_ids": [1, 5, 6]}, {"input_ids": [1, 7]}]
    batch = PromptCollator(pad_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert PromptCollator(0, "right")(rows)["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    with pytest.raises(ValueError, match="padding_side"):
        PromptCollator(0, "middle")


def test_builtin_data_prepares_and_collates_end_to_end(tok):
    for kind, collator in (("sft", SFTCollator), ("preference", PreferenceCollator), ("prompt", PromptCollator)):
        rows = prepare(load_rows(f"builtin:{kind}", "train[:16]"), tok, kind, 64)
        assert len(rows) == 16
        batch = collator(tok.pad_token_id)(rows)
        assert batch["input_ids"].shape[0] == (32 if kind == "preference" else 16)
