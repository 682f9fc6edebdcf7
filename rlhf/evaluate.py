"""Measuring alignment: gold and proxy rewards, exact KL to the SFT policy, win rates, best-of-n, RM accuracy.

Every policy is judged on its own samples for held-out prompts: the mean gold reward (the programmatic "human",
:func:`rlhf.task.gold_reward` by default), the mean reward-model (proxy) score, the exact sequence-level
KL(pi || pi_sft) (the sum over response tokens of the full-vocabulary per-token KL, through
:func:`rlhf_kernels.fused_linear_kl`), the response length, the fraction of responses that end with EOS and the
win rate against the SFT policy by gold reward. Sampling is seeded locally, so the same seed gives the same numbers
and the caller's RNG stream is left as it was.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .collators import PreferenceCollator, PromptCollator
from .data import prepare, tokenize_prompt
from .generation import generate
from .models import LMHead

GoldFn = Callable[[str, str], float]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _prompt_text(prompt: str | dict) -> str:
    return prompt["prompt"] if isinstance(prompt, dict) else prompt


@torch.no_grad()
def sequence_kl(policy, ref, batch: dict, *, temperature: float = 1.0) -> torch.Tensor:
    """Exact sequence KL(pi || pi_ref) of each response: ``(B,)`` fp32.

    The sum over the response tokens (``response_mask``) of the full-vocabulary per-token
    KL = sum_v pi(v | s) (log pi(v | s) - log pi_ref(v | s)), computed through the head adapter
    (:meth:`rlhf.models.LMHead.kl`, :func:`rlhf_kernels.fused_linear_kl`) from both models' last hidden states at
    positions ``P-1 .. P+R-2`` (no ``(B, R, V)`` logits). ``batch`` is a rollout batch from
    :func:`rlhf.generation.generate`, normally sampled from ``policy``: the mean over samples estimates the KL
    between the two sequence distributions. Exactly 0 when ``ref`` is ``policy``.
    """
    head = LMHead(temperature=temperature)
    start = batch["prompt_length"] - 1
    states = head.hidden(policy, batch["input_ids"], batch["attention_mask"], start)  # no-grad: own forward calls
    ref_states = head.hidden(ref, batch["input_ids"], batch["attention_mask"], start)
    return head.kl(states, ref_states, batch["response_mask"]).sum(-1)  # (B, R) -> (B,)


def _rollouts(
    policy, tokenizer, prompts: Sequence[str | dict], *, n: int, max_new_tokens: int, temperature: float,
    batch_size: int, max_prompt_length: int,
) -> Iterator[tuple[list[str], dict, list[str]]]:  # fmt: skip
    """Yield ``(prompt texts, rollout batch, response texts)``, ``n`` consecutive samples per prompt.

    Each ``generate`` call holds ``max(1, batch_size // n)`` prompts. Responses are decoded without special tokens.
    """
    texts = [_prompt_text(p) for p in prompts]
    collate, device = PromptCollator(tokenizer.pad_token_id), _device(policy)
    per_call = max(1, batch_size // n)
    for start in range(0, len(texts), per_call):
        chunk = [t for t in texts[start : start + per_call] for _ in range(n)]
        rows = [tokenize_prompt({"prompt": t}, tokenizer, max_prompt_length) for t in chunk]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        batch = generate(
            policy, tokenizer, batch, max_new_tokens=max_new_tokens, temperature=temperature, do_sample=True
        )
        responses = batch["input_ids"][:, batch["prompt_length"] :]
        decoded = [
            tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(responses, batch["response_mask"], strict=True)
        ]
        yield chunk, batch, decoded


@contextlib.contextmanager
def _evaluating(seed: int | None, *models):
    """Models in eval mode and, when ``seed`` is given, the torch RNG (CPU and the first model's CUDA device)
    seeded with it; modes and RNG states are restored on exit."""
    models = [m for m in models if m is not None]
    modes = [m.training for m in models]
    device = _device(models[0])
    with contextlib.ExitStack() as stack:
        if seed is not None:
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(seed)
        for m in models:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(models, modes, strict=True):
                m.train(mode)


@torch.no_grad()
def sample_responses(
    policy, tokenizer, prompts: Sequence[str | dict], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
    batch_size: int = 32, seed: int = 0, max_prompt_length: int = 512,
) -> list[list[str]]:  # fmt: skip
    """``n`` sampled responses (decoded text, no special tokens) per prompt: one list per prompt.

    For preference data: ``a, b = zip(*sample_responses(sft, tok, prompts, n=2, ...))`` then
    :func:`rlhf.task.label_pairs`. Deterministic for a seed; the caller's RNG state is restored.
    """
    out: list[str] = []
    with _evaluating(seed, policy):
        for _, _, decoded in _rollouts(
            policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, max_prompt_length=max_prompt_length,
        ):  # fmt: skip
            out += decoded
    return [out[i : i + n] for i in range(0, len(out), n)]


def win_rate(gold: Sequence[float], baseline_gold: Sequence[float]) -> float:
    """Fraction of prompts where ``gold`` beats ``baseline_gold`` (ties count 1/2)."""
    if len(gold) != len(baseline_gold):
        raise ValueError(f"{len(gold)} gold rewards but {len(baseline_gold)} baseline rewards")
    wins = [1.0 if g > b else 0.5 if g == b else 0.0 for g, b in zip(gold, baseline_gold, strict=True)]
    return sum(wins) / max(len(wins), 1)


def _summary(gold, rm, kl, lengths, ended, responses, baseline_gold) -> dict:
    """The metrics dict shared by :func:`evaluate_policy` and :func:`best_of_n`."""
    n = len(gold)
    if n == 0:
        raise ValueError("no prompts to evaluate")
    mean = sum(gold) / n
    var = sum((g - mean) ** 2 for g in gold) / max(n - 1, 1)
    out = {
        "gold_reward": mean,
        "gold_reward_sem": math.sqrt(var / n),
        "response_length": sum(lengths) / n,
        "eos_rate": sum(ended) / n,
        "num_prompts": n,
    }
    if rm:
        out["rm_reward"] = sum(rm) / n
    if kl is not None:
        out["kl_to_sft"] = kl
    if baseline_gold is not None:
        out["win_rate_vs_sft"] = win_rate(gold, baseline_gold)
    out["per_prompt_gold"], out["responses"] = list(gold), list(responses)
    return out


@torch.no_grad()
def evaluate_policy(
    policy, tokenizer, prompts: Sequence[str | dict], *, sft_model=None, reward_model=None,
    gold_fn: GoldFn | None = None, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 32,
    seed: int = 0, baseline_gold: Sequence[float] | None = None, max_prompt_length: int = 512,
) -> dict:  # fmt: skip
    """Sample one response per prompt from ``policy`` and measure it.

    Returns floats ``gold_reward`` (mean over prompts), ``gold_reward_sem`` (its standard error), ``rm_reward``
    (mean reward-model score, when ``reward_model`` is given), ``kl_to_sft`` (mean exact sequence KL to
    ``sft_model``, see :func:`sequence_kl`; when ``sft_model`` is given; 0 for the SFT policy itself),
    ``response_length`` (mean response tokens, EOS included), ``eos_rate``, ``win_rate_vs_sft`` (when
    ``baseline_gold``, the per-prompt gold rewards of the SFT policy's samples, is given; ties count 1/2),
    ``num_prompts``; and the lists ``per_prompt_gold`` (a baseline for later calls) and ``responses``.
    ``gold_fn(prompt, response) -> float`` defaults to :func:`rlhf.task.gold_reward`. ``temperature`` applies to
    sampling and to the KL. Deterministic for a seed (the torch RNG is forked and seeded locally).
    """
    if gold_fn is None:
        from .task import gold_reward as gold_fn
    gold, rm, kl, lengths, ended, responses = [], [], [], [], [], []
    with _evaluating(seed, policy, sft_model, reward_model):
        for texts, batch, decoded in _rollouts(
            policy, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, max_prompt_length=max_prompt_length,
        ):  # fmt: skip
            gold += [float(gold_fn(p, r)) for p, r in zip(texts, decoded, strict=True)]
            if reward_model is not None:
                rm += _rm_scores(reward_model, batch).tolist()
            if sft_model is not None:
                kl += sequence_kl(policy, sft_model, batch, temperature=temperature).tolist()
            lengths += batch["response_mask"].sum(-1).tolist()
            ended += batch["ended"].tolist()
            responses += decoded
    mean_kl = sum(kl) / len(kl) if sft_model is not None else None
    return _summary(gold, rm, mean_kl, lengths, ended, responses, baseline_gold)


def _rm_scores(reward_model, batch: dict) -> torch.Tensor:
    """``(B,)`` fp32 reward-model scores (on the CPU) of prompt + response, read at the last real token."""
    device = _device(reward_model)
    return reward_model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()


def best_of_n_kl(n: int) -> float:
    """``log n - (n - 1) / n``: the standard analytic value of KL(best-of-n || policy) (e.g. Gao et al. 2022,
    https://arxiv.org/abs/2210.10760), which Beirami et al. 2024 (https://arxiv.org/abs/2401.01879) show is an
    upper bound: exact only when no two samples can tie; loose when the policy often repeats a response."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(
    policy, reward_model, tokenizer, prompts: Sequence[str | dict], *, n: int, gold_fn: GoldFn | None = None,
    max_new_tokens: int, temperature: float = 1.0, batch_size: int = 32, seed: int = 0,
    baseline_gold: Sequence[float] | None = None, max_prompt_length: int = 512,
) -> dict:  # fmt: skip
    """Best-of-n sampling: ``n`` samples per prompt from ``policy``, keep the one the reward model scores highest.

    Reports the metrics of :func:`evaluate_policy` for the kept responses, with ``rm_reward`` their reward-model
    score. ``kl_to_sft`` is NOT measured: it is :func:`best_of_n_kl` ``(n)``, the analytic upper bound on the KL of
    the best-of-n distribution to ``policy`` (to the SFT policy when ``policy`` is it). ``batch_size`` counts
    sequences per ``generate`` call (``batch_size // n`` prompts). With ``n = 1`` and the same seed and batch size
    it samples exactly what :func:`evaluate_policy` samples.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if gold_fn is None:
        from .task import gold_reward as gold_fn
    gold, rm, lengths, ended, responses = [], [], [], [], []
    with _evaluating(seed, policy, reward_model):
        for texts, batch, decoded in _rollouts(
            policy, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, max_prompt_length=max_prompt_length,
        ):  # fmt: skip
            scores = _rm_scores(reward_model, batch).view(-1, n)  # (prompts, n)
            best = scores.argmax(-1) + torch.arange(scores.shape[0]) * n  # flat index of each prompt's favourite
            for i in best.tolist():
                gold.append(float(gold_fn(texts[i], decoded[i])))
                responses.append(decoded[i])
            rm += scores.max(-1).values.tolist()
            keep = best.to(batch["ended"].device)
            lengths += batch["response_mask"].sum(-1)[keep].tolist()
            ended += batch["ended"][keep].tolist()
    return _summary(gold, rm, best_of_n_kl(n), lengths, ended, responses, baseline_gold)


@torch.no_grad()
def reward_accuracy(
    reward_model, tokenizer, pairs_rows: Sequence[dict], *, batch_size: int = 32, max_length: int = 512
) -> float:
    """Held-out accuracy of a reward model: the fraction of pairs where it scores chosen above rejected (ties 1/2).

    ``pairs_rows``: preference rows in a format :func:`rlhf.data.prepare` accepts (over-long rows are dropped).
    """
    rows = prepare(list(pairs_rows), tokenizer, "preference", max_length, log=lambda _: None)
    collate, correct = PreferenceCollator(tokenizer.pad_token_id), 0.0
    with _evaluating(None, reward_model):
        for start in range(0, len(rows), batch_size):
            scores = _rm_scores(reward_model, collate(rows[start : start + batch_size]))
            chosen, rejected = scores.view(2, -1)  # rows: chosen first, then rejected
            correct += float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
    return correct / len(rows)


@torch.no_grad()
def heldout_nll(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 32) -> float:
    """Mean negative log-likelihood per response token (nats) of SFT rows ``{"prompt", "completion"}`` under
    ``model``, through the fused log-prob head at temperature 1: what RL costs the model on its SFT data (the
    alignment tax), measured before and after."""
    from .collators import SFTCollator

    prepared = prepare(list(rows), tokenizer, "sft", max_length=100_000, log=lambda message: None)
    collate, head, device = SFTCollator(tokenizer.pad_token_id), LMHead(), _device(model)
    total, tokens = 0.0, 0
    for start in range(0, len(prepared), batch_size):
        batch = {k: v.to(device) for k, v in collate(prepared[start : start + batch_size]).items()}
        logprobs = head.logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total -= float(logprobs.sum())
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(tokens, 1)
