"""The default task: short reviews, judged by a programmatic "human" (the gold reward).

A prompt asks for an opinion of a thing in a city ("Describe the hotel in Paris.", "How was the concert in Oslo?").
A response names the thing and gives one to three adjectives: "The hotel is lovely, quiet and clean." The gold
reward plays the human labeller, like the sentiment classifier of the DPO paper's IMDb task
(Rafailov et al. 2023, https://arxiv.org/abs/2305.18290):

- every adjective of `LEXICON` has a polarity in {-1, -0.5, 0, +0.5, +1} ("awful" -1, "dull" -0.5, "busy" 0,
  "nice" +0.5, "wonderful" +1); the sentiment of a response is the mean polarity of the distinct lexicon words
  it contains (repeating a word or writing more of them earns nothing by itself);
- a response with no lexicon word says nothing about the thing: sentiment -0.5;
- a response that does not name the thing of the prompt ("It is nice.") loses 0.5;
- the result is clipped to [-1, 1].

Why this shape:

- The format is fixed and short (about 10 tokens with the built-in tokenizer, which is trained on these texts),
  so a ~4M-parameter Llama learns it in a few hundred SFT steps and sampling is cheap.
- The demonstrations are of MIXED quality (`sft_demonstrations`): each has a random tone that biases, but does
  not fix, its adjectives, and some are vague ("It is ..."). The SFT policy therefore samples responses whose gold
  reward spreads over [-1, 1] with a mean near 0: there is room to improve, and pairs of its samples usually differ.
- The gold reward is a bag of words plus one check against the prompt, so a small reward model learns it from a
  few hundred noisy pairwise labels, and PPO/DPO improve it by shifting probability between adjectives (every
  adjective slot is a place to gain), at a KL of a few nats.
- It is bounded, deterministic, cheap, and ignores length (a mean, not a sum), so it cannot be gamed by rambling.

Labels (`label_pairs`) are a Bradley-Terry draw on the gold rewards, P(a preferred) = sigmoid(beta (g_a - g_b)),
so they are noisy the way human labels are; `best_accuracy` is the accuracy of the Bayes-optimal labeller on them.
Train and eval prompts are disjoint: each prompt string belongs to one split by a CRC32 hash.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from collections.abc import Callable, Sequence

THINGS = (
    "hotel", "cafe", "museum", "movie", "book", "park", "beach", "concert", "restaurant", "train",
    "garden", "market", "library", "bakery", "theatre", "album", "game", "lesson", "trip", "festival",
    "room", "pizza", "soup", "bike", "phone", "laptop", "jacket", "show", "song", "bridge",
)  # fmt: skip
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Vienna")
PROMPT_TEMPLATES = (
    "Describe the {thing} in {city}.",
    "What do you think of the {thing} in {city}?",
    "Tell me about the {thing} in {city}.",
    "Write a short review of the {thing} in {city}.",
    "How was the {thing} in {city}?",
    "Give your opinion of the {thing} in {city}.",
)
POLARITY_WORDS = {
    1.0: ("wonderful", "excellent", "superb", "brilliant", "delightful", "lovely"),
    0.5: ("good", "nice", "pleasant", "friendly", "clean", "charming"),
    0.0: ("large", "small", "old", "modern", "busy", "simple"),
    -0.5: ("dull", "noisy", "slow", "bland", "messy", "cramped"),
    -1.0: ("awful", "terrible", "horrible", "dreadful", "dirty", "rude"),
}
LEXICON = {word: score for score, words in POLARITY_WORDS.items() for word in words}  # word -> polarity
NO_OPINION = -0.5  # sentiment of a response without any lexicon word
OFF_TOPIC_PENALTY = 0.5  # subtracted when the response does not name the prompt's thing
DEFAULT_BETA = 4.0  # Bradley-Terry inverse temperature of the default labels
EVAL_EVERY = 5  # one prompt in EVAL_EVERY (by hash) is held out for evaluation
SPLITS = ("train", "eval")
_WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------------------------------------------- prompts


def _split_of(prompt: str) -> str:
    return "eval" if zlib.crc32(prompt.encode()) % EVAL_EVERY == 0 else "train"


def prompt_pool(split: str = "train") -> list[str]:
    """Every prompt of `split` ("train" or "eval"), sorted; the two pools are disjoint and cover all prompts."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    prompts = [t.format(thing=x, city=c) for t in PROMPT_TEMPLATES for x in THINGS for c in CITIES]
    return sorted(p for p in prompts if _split_of(p) == split)


def task_prompts(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` prompt rows {"prompt": str} of `split`, the same for the same seed.

    Prompts are drawn without replacement from the split's pool (reshuffled each time it runs out), so up to the
    pool size (1455 train, 345 eval prompts) they are distinct.
    """
    return [{"prompt": p} for p in _draw(prompt_pool(split), n, random.Random(f"rlhf-task-prompts-{split}-{seed}"))]


def _draw(pool: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` items of `pool` without replacement, reshuffling the pool each time it runs out."""
    if n < 0:
        raise ValueError(f"number of prompts must be >= 0, got {n}")
    out: list[str] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out += order[: n - len(out)]
    return out


def subject_of(prompt: str) -> str | None:
    """The thing a task prompt asks about ("hotel"), or None when the prompt names none of `THINGS`."""
    words = set(_WORD.findall(prompt.lower()))
    return next((thing for thing in THINGS if thing in words), None)


# ---------------------------------------------------------------------------------------------------- demonstrations


def _adjectives(rng: random.Random, k: int) -> list[str]:
    """`k` distinct adjectives: a random tone picks a polarity half the time, otherwise any polarity."""
    tone = rng.choice(tuple(POLARITY_WORDS))
    out: list[str] = []
    while len(out) < k:
        polarity = tone if rng.random() < 0.5 else rng.choice(tuple(POLARITY_WORDS))
        word = rng.choice(POLARITY_WORDS[polarity])
        if word not in out:
            out.append(word)
    return out


def _join(words: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def demonstration(prompt: str, rng: random.Random) -> str:
    """One response of mixed quality: 1-3 adjectives of a random tone; 15% vague ("It is ...", no subject)."""
    k = rng.choices((1, 2, 3), weights=(1, 2, 2))[0]
    adjectives = _join(_adjectives(rng, k))
    vague = rng.random() < 0.15
    thing = subject_of(prompt) or "thing"
    return f"It is {adjectives}." if vague else f"The {thing} is {adjectives}."


def sft_demonstrations(n: int, seed: int = 0) -> list[dict]:
    """`n` SFT rows {"prompt", "completion"} on train prompts, of mixed quality (see the module docstring).

    The prompts are drawn from their own stream, not the one of `task_prompts(n, seed)`.
    """
    rng = random.Random(f"rlhf-task-sft-{seed}")
    return [{"prompt": p, "completion": demonstration(p, rng)} for p in _draw(prompt_pool("train"), n, rng)]


# ---------------------------------------------------------------------------------------------------- gold reward


def gold_reward(prompt: str, response: str) -> float:
    """The programmatic "human" score of `response` to `prompt`, in [-1, 1] (rules in the module docstring).

    Example: ("Describe the hotel in Paris.", "The hotel is lovely and noisy.") -> mean(+1, -0.5) = 0.25.
    """
    words = _WORD.findall(response.lower())
    scores = [LEXICON[w] for w in dict.fromkeys(words) if w in LEXICON]
    value = sum(scores) / len(scores) if scores else NO_OPINION
    subject = subject_of(prompt)
    if subject is not None and subject not in words:
        value -= OFF_TOPIC_PENALTY
    return min(1.0, max(-1.0, value))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_probability(gold_a: float, gold_b: float, beta: float) -> float:
    """Bradley-Terry P(a preferred to b) = sigmoid(beta (g_a - g_b)); beta = inf gives 1, 1/2 or 0."""
    if math.isinf(beta):
        return 1.0 if gold_a > gold_b else 0.0 if gold_a < gold_b else 0.5
    return _sigmoid(beta * (gold_a - gold_b))


def bt_best_accuracy(gold_a: Sequence[float], gold_b: Sequence[float], beta: float) -> float:
    """Mean of max(p, 1 - p) over pairs, p = P(a preferred): the expected accuracy of the best possible predictor
    (one that knows the gold rewards) on labels drawn by the Bradley-Terry model. 0.5 for pairs of equal gold."""
    if len(gold_a) != len(gold_b):
        raise ValueError(f"gold_a and gold_b differ in length: {len(gold_a)} vs {len(gold_b)}")
    if not len(gold_a):
        raise ValueError("bt_best_accuracy needs at least one pair")
    probs = [preference_probability(a, b, beta) for a, b in zip(gold_a, gold_b, strict=True)]
    return sum(max(p, 1.0 - p) for p in probs) / len(probs)


def label_pairs(
    prompts: Sequence[str | dict],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    gold_fn: Callable[[str, str], float] | None = None,
) -> tuple[list[dict], float]:
    """Noisy preference labels: (rows {"prompt", "chosen", "rejected"}, best_accuracy).

    For each prompt, response a is chosen with probability sigmoid(beta (g_a - g_b)) on the gold rewards (one
    uniform draw per pair from a generator seeded by `seed`); `gold_fn(prompt, response)` defaults to
    :func:`gold_reward`. Pairs with identical responses are skipped.
    `prompts` are strings or rows with a "prompt". best_accuracy: `bt_best_accuracy` over the kept pairs (the best
    held-out accuracy any reward model can reach on such labels); nan when no pair is kept.
    """
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses_a)} a, {len(responses_b)} b")
    gold_fn = gold_fn or gold_reward
    rng = random.Random(f"rlhf-task-labels-{seed}")
    rows, gold_a, gold_b = [], [], []
    for prompt, a, b in zip(prompts, responses_a, responses_b, strict=True):
        prompt = prompt["prompt"] if isinstance(prompt, dict) else prompt
        if a == b:
            continue
        ga, gb = gold_fn(prompt, a), gold_fn(prompt, b)
        a_wins = rng.random() < preference_probability(ga, gb, beta)
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        gold_a.append(ga)
        gold_b.append(gb)
    best = bt_best_accuracy(gold_a, gold_b, beta) if rows else float("nan")
    return rows, best


def rank_responses(
    prompts: Sequence[str | dict],
    responses: Sequence[Sequence[str]],
    *,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    gold_fn: Callable[[str, str], float] | None = None,
) -> list[dict]:
    """Noisy rankings of K responses per prompt: rows {"prompt", "responses"} with the responses best first.

    The ranking is a Plackett-Luce draw on the gold rewards, the K-response form of :func:`label_pairs`' draw:
    the best is drawn with probability proportional to exp(beta g), then the best of the rest, and so on (for
    K = 2 exactly the Bradley-Terry label; `gold_fn` as there). Repeated responses of a prompt are kept once; a
    prompt left with fewer than two distinct responses is skipped.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} response lists")
    rng = random.Random(f"rlhf-task-rankings-{seed}")
    rows = []
    for prompt, candidates in zip(prompts, responses, strict=True):
        prompt = prompt["prompt"] if isinstance(prompt, dict) else prompt
        left = list(dict.fromkeys(candidates))
        if len(left) < 2:
            continue
        gold = {r: (gold_fn or gold_reward)(prompt, r) for r in left}
        order = []
        while left:
            top = max(beta * gold[r] for r in left)
            weights = [math.exp(beta * gold[r] - top) for r in left]
            order.append(left.pop(rng.choices(range(len(left)), weights=weights)[0]))
        rows.append({"prompt": prompt, "responses": order})
    return rows


def corpus_texts(n: int = 1000) -> list[str]:
    """Texts of the task for the built-in tokenizer's training corpus (chat-rendered demonstrations + every word)."""
    texts = [f"<|user|>\n{r['prompt']}\n<|assistant|>\n{r['completion']}" for r in sft_demonstrations(n, seed=12345)]
    texts.append(" ".join((*THINGS, *CITIES, *LEXICON)))
    return texts
