"""rlhf.evaluate: exact sequence KL, policy evaluation, win rate, best-of-n, reward-model accuracy.

A module fixture fine-tunes builtin-small on the task's demonstrations for 150 steps (a few seconds): its samples
are well-formed, so gold rewards, the spread check and best-of-n selection are meaningful.
"""

import json
import math
import re
import statistics

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rlhf.collators import PromptCollator  # noqa: E402
from rlhf.data import tokenize_prompt  # noqa: E402
from rlhf.evaluate import (  # noqa: E402
    best_of_n,
    best_of_n_kl,
    evaluate_policy,
    reward_accuracy,
    sample_responses,
    sequence_kl,
    win_rate,
)
from rlhf.generation import generate, response_mask_from  # noqa: E402
from rlhf.models import load_causal_lm, load_tokenizer, position_ids_from_mask  # noqa: E402
from rlhf.task import gold_reward, sft_demonstrations, task_prompts  # noqa: E402

KW = dict(max_new_tokens=16, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin-small")


@pytest.fixture(scope="module")
def sft_model(tok, tmp_path_factory):
    from rlhf import sft
    from rlhf.config import SFTConfig

    out = tmp_path_factory.mktemp("sft")
    data = out / "demos.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_demonstrations(1024, seed=0)))
    cfg = SFTConfig(
        model="builtin-small", dataset=str(data), output_dir=str(out), max_steps=150, lr=3e-3, batch_size=16,
        warmup_ratio=0.05, eval_fraction=0.0, save_steps=0, eval_steps=0, logging_steps=50, tensorboard=False,
        plots=False, progress=False, device="cpu", num_threads=1,  # tiny matrices: one thread is fastest
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        sft.train(cfg)
    finally:
        torch.set_num_threads(threads)
    return load_causal_lm(str(out / "final"), tok).eval()


@pytest.fixture(scope="module")
def prompts():
    return task_prompts(32, seed=0, split="eval")


class LengthRM(nn.Module):
    """A stand-in reward model: the number of real tokens of each row."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        return attention_mask.sum(-1).float()


class GoldRM(nn.Module):
    """A stand-in reward model that decodes each row and returns its gold reward."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.dummy = tok, nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask):
        scores = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            text = self.tok.decode(ids[mask.bool()].tolist())
            prompt, _, response = text.rpartition("<|assistant|>\n")
            prompt = prompt.split("<|user|>\n")[-1].strip()
            scores.append(gold_reward(prompt, response.replace(self.tok.eos_token, "")))
        return torch.tensor(scores)


def rollout(model, tok, texts, max_new_tokens=8, seed=0, eos_at=None):
    """A rollout batch; ``eos_at=(row, position)`` puts an EOS into that response (the rest becomes padding)."""
    rows = [tokenize_prompt({"prompt": t}, tok, 64) for t in texts]
    torch.manual_seed(seed)
    batch = generate(model, tok, PromptCollator(tok.pad_token_id)(rows), max_new_tokens=max_new_tokens)
    if eos_at is None:
        return batch
    P = batch["prompt_length"]
    responses = batch["input_ids"][:, P:].clone()
    responses[eos_at] = tok.eos_token_id
    mask, ended = response_mask_from(responses, tok.eos_token_id)
    responses = responses.masked_fill(~mask, tok.pad_token_id)
    input_ids = torch.cat([batch["input_ids"][:, :P], responses], 1)
    attention_mask = torch.cat([batch["attention_mask"][:, :P], mask.long()], 1)
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "response_mask": mask, "ended": ended}


def full_logits_kl(policy, ref, batch, temperature=1.0):
    """Sequence KL from the models' full logits in float64 (positions from the mask, as the fused path)."""
    ids, mask, P = batch["input_ids"], batch["attention_mask"], batch["prompt_length"]
    pos = position_ids_from_mask(mask)
    logp = [
        (
            m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : -1].double() / temperature
        ).log_softmax(-1)
        for m in (policy, ref)
    ]  # (B, R, V) each: positions P-1 .. P+R-2 predict the R response tokens
    per_token = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)  # (B, R)
    return (per_token * batch["response_mask"]).sum(-1)


@torch.no_grad()
def test_sequence_kl_is_zero_against_itself_and_matches_full_logits(tok):
    policy = load_causal_lm("builtin-small", tok, seed=0)
    other = load_causal_lm("builtin-small", tok, seed=1)
    texts = ["Describe the hotel in Paris.", "Hi", "Write a short review of the festival in Vienna, please."]
    batch = rollout(policy, tok, texts, eos_at=(1, 2))  # left-padded prompts of different lengths
    assert batch["response_mask"].any() and not batch["response_mask"].all()
    assert torch.equal(sequence_kl(policy, policy, batch), torch.zeros(3))
    for temperature in (1.0, 0.7):
        kl = sequence_kl(policy, other, batch, temperature=temperature)
        expected = full_logits_kl(policy, other, batch, temperature)
        assert kl.dtype == torch.float32 and kl.shape == (3,) and bool((kl > 0).all())
        torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)
    # Tokens after the mask (padding after EOS, or garbage there) are not read.
    garbage = {**batch, "input_ids": batch["input_ids"].clone()}
    P, off = batch["prompt_length"], ~batch["response_mask"]
    garbage["input_ids"][:, P:][off] = 5
    torch.testing.assert_close(sequence_kl(policy, other, garbage), sequence_kl(policy, other, batch))


def test_sft_samples_are_well_formed_with_a_spread_of_gold(sft_model, tok):
    prompts = task_prompts(64, seed=0, split="eval")
    out = evaluate_policy(sft_model, tok, prompts, **KW)
    gold = out["per_prompt_gold"]
    form = re.compile(r"^(The \w+|It) is \w+((, \w+)* and \w+)?\.$")
    assert out["eos_rate"] >= 0.9 and 5 <= out["response_length"] <= 12
    assert sum(bool(form.match(r)) for r in out["responses"]) >= 0.6 * len(prompts)  # ~0.8 measured
    assert statistics.pstdev(gold) > 0.3 and max(gold) >= 0.3 and min(gold) <= -0.5  # ~0.45, 0.5, -1 measured


def test_evaluate_policy_keys_determinism_rng_and_modes(sft_model, tok, prompts):
    other = load_causal_lm("builtin-small", tok, seed=1)
    sft_model.train()
    state = torch.random.get_rng_state()
    out = evaluate_policy(sft_model, tok, prompts, sft_model=sft_model, reward_model=LengthRM(), **KW)
    assert torch.equal(torch.random.get_rng_state(), state) and sft_model.training  # both restored
    sft_model.eval()
    keys = {"gold_reward", "gold_reward_sem", "rm_reward", "kl_to_sft", "response_length", "eos_rate", "num_prompts"}
    assert keys | {"per_prompt_gold", "responses"} == set(out)
    assert out["kl_to_sft"] == 0.0 and out["num_prompts"] == len(prompts) == len(out["per_prompt_gold"])
    gold = [gold_reward(p["prompt"], r) for p, r in zip(prompts, out["responses"], strict=True)]
    assert out["per_prompt_gold"] == gold and out["gold_reward"] == pytest.approx(statistics.mean(gold))
    # LengthRM scores prompt + response tokens: its mean is the mean prompt length + the mean response length.
    prompt_tokens = statistics.mean(len(tokenize_prompt(p, tok, 64)["input_ids"]) for p in prompts)
    assert out["rm_reward"] == pytest.approx(prompt_tokens + out["response_length"])
    again = evaluate_policy(sft_model, tok, prompts, sft_model=sft_model, reward_model=LengthRM(), **KW)
    assert again == out
    assert evaluate_policy(sft_model, tok, prompts, **{**KW, "seed": 1})["responses"] != out["responses"]
    versus = evaluate_policy(other, tok, prompts, sft_model=sft_model, **KW)
    assert math.isfinite(versus["kl_to_sft"]) and versus["kl_to_sft"] > 1.0  # an untrained model is far away


def test_win_rate_hand_made(sft_model, tok, prompts):
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 0.0, 1.0, 0.2]) == (1 + 0.5 + 0 + 0.5) / 4
    with pytest.raises(ValueError, match="baseline"):
        win_rate([1.0], [1.0, 2.0])
    own = evaluate_policy(sft_model, tok, prompts, **KW)["per_prompt_gold"]
    baseline = [g - 1 for g in own[:8]] + own[8:16] + [g + 1 for g in own[16:]]  # 8 wins, 8 ties, 16 losses
    out = evaluate_policy(sft_model, tok, prompts, baseline_gold=baseline, **KW)
    assert out["win_rate_vs_sft"] == (8 + 8 * 0.5) / 32


def test_best_of_n_with_one_sample_is_plain_sampling(sft_model, tok, prompts):
    plain = evaluate_policy(sft_model, tok, prompts, reward_model=LengthRM(), **KW)
    one = best_of_n(sft_model, LengthRM(), tok, prompts, n=1, **KW)
    assert one["responses"] == plain["responses"] and one["per_prompt_gold"] == plain["per_prompt_gold"]
    assert one["kl_to_sft"] == 0.0 and one["rm_reward"] == plain["rm_reward"]


def test_best_of_n_keeps_the_reward_models_favourite(sft_model, tok, prompts):
    n = 4
    samples = sample_responses(sft_model, tok, prompts, n=n, **KW)  # the same draws as best_of_n's
    plain = evaluate_policy(sft_model, tok, prompts, **KW)
    out = best_of_n(sft_model, GoldRM(tok), tok, prompts, n=n, baseline_gold=plain["per_prompt_gold"], **KW)
    best = [max(gold_reward(p["prompt"], r) for r in group) for p, group in zip(prompts, samples, strict=True)]
    assert out["per_prompt_gold"] == best and out["rm_reward"] == pytest.approx(out["gold_reward"])
    assert all(r in group for r, group in zip(out["responses"], samples, strict=True))
    assert out["gold_reward"] > plain["gold_reward"] and out["win_rate_vs_sft"] > 0.5
    assert out["kl_to_sft"] == best_of_n_kl(n) == pytest.approx(math.log(4) - 0.75)


def test_reward_accuracy_hand_made(tok):
    prompt = "Describe the hotel in Paris."
    long, short = "The hotel is lovely, clean and quiet.", "The hotel is nice."
    rows = [{"prompt": prompt, "chosen": long, "rejected": short}] * 3
    assert reward_accuracy(LengthRM(), tok, rows, batch_size=2) == 1.0
    swapped = [{"prompt": prompt, "chosen": short, "rejected": long}]
    assert reward_accuracy(LengthRM(), tok, rows + swapped, batch_size=3) == 0.75
    tie = [{"prompt": prompt, "chosen": "The hotel is good.", "rejected": "The hotel is nice."}]  # same length
    assert reward_accuracy(LengthRM(), tok, tie) == 0.5
