"""The sampling step (rlhf.generation.InverseCDFSampler): the distribution of the final scores, never a token of
probability 0, the global RNG (so a resumed run draws the same tokens), and generate's samples with it."""

import math

import pytest
import torch

from rlhf.generation import InverseCDFSampler, generate
from rlhf.models import load_causal_lm, load_tokenizer


def _draw(scores: torch.Tensor) -> torch.Tensor:
    out = InverseCDFSampler()(None, scores)
    assert ((out == 0).sum(-1) == 1).all() and ((out == 0) | (out == -math.inf)).all()
    return out.argmax(-1)


def test_draws_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -math.inf, 0.5])
    p = torch.softmax(logits, -1)
    n = 20000
    tokens = _draw(logits.expand(n, -1).clone())
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[4] == 0  # probability 0 is never drawn
    # chi-square with 4 degrees of freedom (5 possible tokens): 99.9% quantile 18.47
    expected = n * p.double()
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 18.47


def test_extreme_and_truncated_scores():
    torch.manual_seed(1)
    scores = torch.full((64, 1000), -math.inf)
    scores[:, 7] = 0.0  # one allowed token (top-k = 1)
    assert (_draw(scores) == 7).all()
    scores = torch.zeros(64, 1000)
    scores[:, 999] = 100.0  # nearly all the mass on the last token
    assert (_draw(scores) == 999).all()


def test_uses_the_global_rng():
    scores = torch.randn(32, 500)
    torch.manual_seed(5)
    a = _draw(scores.clone())
    torch.manual_seed(5)
    b = _draw(scores.clone())
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}])
def test_generate_samples_the_same_with_and_without_recording(sampling):
    tok = load_tokenizer("builtin")
    model = load_causal_lm("builtin-small", tok)
    ids = torch.randint(10, 200, (6, 5))
    prompts = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(3)
    a = generate(model, tok, prompts, max_new_tokens=6, **sampling)
    torch.manual_seed(3)
    b = generate(model, tok, prompts, max_new_tokens=6, record_logprobs=True, **sampling)
    assert torch.equal(a["input_ids"], b["input_ids"])
    lp = b["sampler_logprobs"][b["response_mask"]]
    assert (lp <= 0).all() and torch.isfinite(lp).all()


def test_record_logprobs_needs_sampling():
    tok = load_tokenizer("builtin")
    model = load_causal_lm("builtin-small", tok)
    ids = torch.randint(10, 200, (2, 3))
    with pytest.raises(ValueError, match="record_logprobs needs sampling"):
        generate(model, tok, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=2,
                 do_sample=False, record_logprobs=True)  # fmt: skip
