"""Built-in tiny data, tokenizer and Llama model: everything a training run needs without a download.

The data are simple question/answer tasks generated from templates (add two numbers, count letters, spell a word
backwards or in capitals, name an opposite or a colour). They are meant for smoke tests and examples: a model of a
few million parameters learns them in minutes on a CPU.

- `builtin_rows(kind, n, seed)`: rows for "sft" (prompt, completion), "preference" (prompt, chosen, rejected,
  margin) and "prompt" (prompt, answer).
- `build_tokenizer()`: a byte-level BPE tokenizer trained on the built-in texts and those of the default task
  (`rlhf.task`), with a chat template.
- `tiny_llama_config(vocab_size, **overrides)` and `tiny_llama(tokenizer, seed, **overrides)`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

KINDS = ("sft", "preference", "prompt")
DEFAULT_ROWS = {"sft": 512, "preference": 512, "prompt": 256}

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)  # ids 0, 1, 2, ... in this order
VOCAB_SIZE = 1024

# Each turn is "<|role|>\n{content}\n"; an assistant turn ends with EOS instead of the newline, so the response
# (content + EOS) is exactly what the model has to produce, and generation stops at EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

WORDS = (
    "apple", "river", "garden", "window", "pencil", "rocket", "silver", "planet", "forest", "candle",
    "bridge", "coffee", "dragon", "island", "jacket", "kitten", "lemon", "marble", "number", "orange",
    "pepper", "rabbit", "summer", "tiger", "velvet", "winter", "yellow", "anchor", "button", "castle",
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"), ("happy", "sad"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "new"), ("wet", "dry"),
    ("loud", "quiet"), ("strong", "weak"), ("rich", "poor"), ("high", "low"), ("long", "short"), ("day", "night"),
)  # fmt: skip
COLOURS = (
    ("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
    ("a tomato", "red"), ("a carrot", "orange"), ("chocolate", "brown"), ("a lemon", "yellow"), ("milk", "white"),
    ("a strawberry", "red"), ("the sea", "blue"), ("a leaf", "green"), ("a crow", "black"), ("a plum", "purple"),
)  # fmt: skip
COLOUR_NAMES = sorted({c for _, c in COLOURS})

CHOSEN_OPENERS = ("Sure!", "Of course!", "Happy to help!", "Good question!")
REJECTED_OPENERS = ("Whatever.", "Ugh, whatever.", "Whatever, fine.")
REJECTED_CLOSER = "Whatever."

# A task draws its inputs from `rng` and returns (prompt, correct answer, wrong answer).
Task = Callable[[random.Random], tuple[str, str, str]]


def _task_add(rng: random.Random) -> tuple[str, str, str]:
    """Add two small numbers; the wrong answer is off by 1 to 3."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    prompt = rng.choice(("What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} to {b}?"))
    wrong = a + b + rng.choice((-3, -2, -1, 1, 2, 3))
    answer = "{a} plus {b} is {s}."
    return prompt.format(a=a, b=b), answer.format(a=a, b=b, s=a + b), answer.format(a=a, b=b, s=abs(wrong))


def _task_next(rng: random.Random) -> tuple[str, str, str]:
    """Name the number after n; the wrong answer is n itself or n - 1."""
    n = rng.randint(0, 98)
    prompt = rng.choice(("What number comes after {n}?", "Which number follows {n}?"))
    answer = "The number after {n} is {m}."
    return prompt.format(n=n), answer.format(n=n, m=n + 1), answer.format(n=n, m=max(n - rng.randint(0, 1), 0))


def _task_count(rng: random.Random) -> tuple[str, str, str]:
    """Count the letters of a word; the wrong answer is off by 1 or 2."""
    w = rng.choice(WORDS)
    prompt = rng.choice(("How many letters are in the word {w}?", "Count the letters in {w}."))
    answer = "The word {w} has {k} letters."
    return prompt.format(w=w), answer.format(w=w, k=len(w)), answer.format(w=w, k=len(w) + rng.choice((-2, -1, 1, 2)))


def _task_reverse(rng: random.Random) -> tuple[str, str, str]:
    """Spell a word backwards; the wrong answer leaves it unchanged."""
    w = rng.choice(WORDS)
    prompt = rng.choice(("Spell {w} backwards.", "Write the word {w} in reverse."))
    answer = "{w} spelled backwards is {r}."
    return prompt.format(w=w), answer.format(w=w, r=w[::-1]), answer.format(w=w, r=w)


def _task_upper(rng: random.Random) -> tuple[str, str, str]:
    """Write a word in capitals; the wrong answer capitalises only the first letter."""
    w = rng.choice(WORDS)
    prompt = rng.choice(("Write {w} in capital letters.", "Shout the word {w}."))
    answer = "In capital letters, {w} is {u}."
    return prompt.format(w=w), answer.format(w=w, u=w.upper()), answer.format(w=w, u=w.capitalize())


def _task_opposite(rng: random.Random) -> tuple[str, str, str]:
    """Name the opposite of a word (either direction); the wrong answer is another pair's word."""
    pair = rng.choice(OPPOSITES)
    w, o = pair if rng.random() < 0.5 else pair[::-1]
    other = rng.choice([p for p in OPPOSITES if p != pair])[rng.randint(0, 1)]
    prompt = rng.choice(("What is the opposite of {w}?", "Give me the opposite of the word {w}."))
    answer = "The opposite of {w} is {o}."
    return prompt.format(w=w), answer.format(w=w, o=o), answer.format(w=w, o=other)


def _task_colour(rng: random.Random) -> tuple[str, str, str]:
    """Name the usual colour of a thing; the wrong answer is another colour."""
    thing, colour = rng.choice(COLOURS)
    other = rng.choice([c for c in COLOUR_NAMES if c != colour])
    prompt = rng.choice(("What colour is {t}?", "Tell me the colour of {t}."))
    answer = "{T} is usually {c}."
    cap = thing[0].upper() + thing[1:]
    return prompt.format(t=thing), answer.format(T=cap, c=colour), answer.format(T=cap, c=other)


TASKS: tuple[Task, ...] = (_task_add, _task_next, _task_count, _task_reverse, _task_upper, _task_opposite, _task_colour)


def _row(kind: str, rng: random.Random) -> dict:
    """One row of `kind` from a random task (the rng advances the same way for every kind)."""
    prompt, correct, wrong = rng.choice(TASKS)(rng)
    opener, rude = rng.choice(CHOSEN_OPENERS), rng.choice(REJECTED_OPENERS)
    if kind == "sft":
        return {"prompt": prompt, "completion": correct}
    if kind == "prompt":
        return {"prompt": prompt, "answer": correct}
    return {
        "prompt": prompt,
        "chosen": f"{opener} {correct}",
        "rejected": f"{rude} {wrong} {REJECTED_CLOSER}",
        "margin": 1.0,
    }


def builtin_rows(kind: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """`n` built-in rows of `kind` ("sft", "preference" or "prompt"), the same for the same seed.

    sft rows: {"prompt": str, "completion": str} (the correct answer as a full sentence).
    preference rows: {"prompt", "chosen", "rejected", "margin": 1.0}: chosen is the correct answer after a polite
    opener ("Sure!"); rejected is a wrong answer framed by the marker word "Whatever" at both ends, so a tiny reward
    model separates the two within a hundred steps. prompt rows: {"prompt": str, "answer": str} (the correct
    completion, which the built-in "gold" reward function of `rlhf grpo` checks).
    Default n: DEFAULT_ROWS[kind].
    """
    if kind not in KINDS:
        raise ValueError(f"unknown built-in data kind {kind!r}; expected one of {', '.join(KINDS)}")
    n = DEFAULT_ROWS[kind] if n is None else n
    if n < 0:
        raise ValueError(f"number of built-in rows must be >= 0, got {n}")
    rng = random.Random(f"rlhf-builtin-{kind}-{seed}")
    return [_row(kind, rng) for _ in range(n)]


def _corpus() -> list[str]:
    """Every text the built-in rows and the default task (`rlhf.task`) can contain, rendered roughly as the chat
    template would."""
    from .task import corpus_texts

    texts = corpus_texts()
    for row in builtin_rows("preference", 2000, seed=12345):
        texts.append(f"<|user|>\n{row['prompt']}\n<|assistant|>\n{row['chosen']}")
        texts.append(row["rejected"])
    texts += [f"{opener} " for opener in CHOSEN_OPENERS] + [f"{w} {w[::-1]} {w.upper()}" for w in WORDS]
    texts += [" ".join(str(i) for i in range(100))]
    return texts


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The trained `tokenizers.Tokenizer` as JSON (trained once per process; training is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok.to_str()


def build_tokenizer():
    """A fresh `PreTrainedTokenizerFast` for the built-in data: byte-level BPE (any text encodes), ~1k tokens.

    Special tokens: "<pad>" id 0, "<s>" (BOS, added in front by `tokenizer(text)`), "</s>" (EOS), "<unk>", and the
    role markers "<|system|>", "<|user|>", "<|assistant|>" used by `chat_template`:
    "<s><|user|>\\n{question}\\n<|assistant|>\\n{answer}</s>". Padding on the right; pad != eos.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llama_config(vocab_size: int, **overrides):
    """A `LlamaConfig` for a ~3.7M-parameter model at vocab 1024 (hidden 256, 4 layers, 4 heads, MLP 688).

    Keyword overrides replace any field (e.g. hidden_size=64, num_hidden_layers=2 for tests); the number of key/value
    heads follows num_attention_heads unless given.
    """
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A freshly initialised `LlamaForCausalLM` sized to `tokenizer` (len(tokenizer) rows), pad/bos/eos ids from it.

    The initialisation depends only on `seed` and the config; the global torch RNG is left untouched.
    """
    import torch
    from transformers import LlamaForCausalLM

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    ids["eos_token_id"] = tokenizer.eos_token_id
    config = tiny_llama_config(len(tokenizer), **{**ids, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return model
