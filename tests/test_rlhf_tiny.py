"""rlhf.tiny: built-in rows, the local tokenizer and the tiny Llama."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from rlhf.tiny import (  # noqa: E402
    DEFAULT_ROWS,
    KINDS,
    REJECTED_CLOSER,
    build_tokenizer,
    builtin_rows,
    tiny_llama,
    tiny_llama_config,
)


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_rows_are_deterministic_per_seed(kind):
    rows = builtin_rows(kind)
    assert len(rows) == DEFAULT_ROWS[kind]
    assert rows == builtin_rows(kind, seed=0)
    assert builtin_rows(kind, 7, seed=1) == builtin_rows(kind, 7, seed=1) != builtin_rows(kind, 7, seed=2)
    assert builtin_rows(kind, 5) == rows[:5]  # n only cuts the same stream
    keys = {"sft": {"prompt", "completion"}, "preference": {"prompt", "chosen", "rejected", "margin"}}
    assert all(set(r) == keys.get(kind, {"prompt", "answer"}) for r in rows)
    assert all(isinstance(v, str) and v for r in rows for k, v in r.items() if k != "margin")
    assert len({r["prompt"] for r in rows}) > len(rows) // 4  # varied, not one template


def test_builtin_rows_rejects_unknown_kind_and_negative_n():
    with pytest.raises(ValueError, match="unknown built-in data kind 'dpo'"):
        builtin_rows("dpo")
    with pytest.raises(ValueError, match=">= 0"):
        builtin_rows("sft", -1)


def test_builtin_preference_rows_have_a_consistent_learnable_difference():
    rows = builtin_rows("preference")
    sft = {r["prompt"]: r["completion"] for r in builtin_rows("sft", 2000)}
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["margin"] == 1.0
        assert "whatever" not in r["chosen"].lower()
        assert r["rejected"].endswith(REJECTED_CLOSER) and "whatever" in r["rejected"].split(".")[0].lower()
        if r["prompt"] in sft:  # the chosen answer is the correct one (the sft completion for the same prompt)
            assert r["chosen"].endswith(sft[r["prompt"]])
            assert sft[r["prompt"]] not in r["rejected"]


def test_builtin_answers_are_correct():
    # "What is 3 plus 4?" -> "3 plus 4 is 7."; the reverse and capitals tasks spell out their answers.
    for r in builtin_rows("sft"):
        words = r["completion"].rstrip(".").split()
        if " plus " in r["completion"]:
            assert int(words[0]) + int(words[2]) == int(words[4])
        elif "backwards" in r["completion"]:
            assert words[0][::-1] == words[-1]
        elif "capital letters" in r["completion"]:
            assert words[-3].rstrip(",").upper() == words[-1]


def test_tokenizer_special_tokens_padding_and_determinism():
    tok = build_tokenizer()
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.unk_token == "<unk>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert 500 <= len(tok) <= 2000
    assert build_tokenizer().get_vocab() == tok.get_vocab()
    assert build_tokenizer() is not tok
    text = "Sure! 12 plus 9 is 21. Ünïcode & symbols ~ work too"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids  # byte level: nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_chat_template():
    tok = build_tokenizer()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s><|system|>\nBe brief.\n<|user|>\nHi\n"
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    full = tok.apply_chat_template([*chat, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert full == prompt + "Hello.</s>"
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids  # role markers are single tokens


def test_tiny_llama_config_defaults_and_overrides():
    cfg = tiny_llama_config(1024)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (256, 4, 4, 688)
    assert cfg.vocab_size == 1024 and cfg.max_position_embeddings == 1024 and not cfg.tie_word_embeddings
    small = tiny_llama_config(100, hidden_size=32, num_hidden_layers=1)
    assert (small.vocab_size, small.hidden_size, small.num_hidden_layers) == (100, 32, 1)


def test_tiny_llama_is_seeded_and_uses_tokenizer_ids():
    tok = build_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(tok, seed=3, **small), tiny_llama(tok, seed=3, **small), tiny_llama(tok, seed=4, **small)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 1
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(a.config, key) == getattr(a.generation_config, key) == getattr(tok, key)
    ids = torch.tensor([tok("What is 1 plus 2?")["input_ids"]])
    assert a(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert 3e6 < sum(p.numel() for p in tiny_llama(tok).parameters()) < 6e6  # "a few million" by default
