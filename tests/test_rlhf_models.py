"""rlhf.models: the fused policy forward, the reward head's token, LoRA, save/load round trips, pad tokens."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rlhf.models import (  # noqa: E402
    IGNORE_INDEX,
    LMHead,
    RewardModel,
    apply_lora,
    is_checkpointing,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)

HEAD = LMHead()


def token_logprobs(model, ids, mask, labels, **kwargs):
    return HEAD.logprobs(model, ids, mask, labels, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin-small")


@pytest.fixture()
def policy(tokenizer):
    return load_causal_lm("builtin-small", tokenizer, seed=0)


def _rows(tokenizer):
    texts = ["what is two plus three", "reverse the word cat please", "hi"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _pad(rows, pad_id, side):
    """``input_ids, attention_mask (B, T)`` padded on ``side``."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_token_logprobs_match_full_logits(policy, tokenizer):
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # a "prompt" of two tokens
    lp, ent = token_logprobs(policy, ids, mask, labels, return_entropy=True)
    logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1].double()  # right padding: same positions
    full = logits.log_softmax(-1)
    tgt = labels[:, 1:]
    ref = full.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tgt != IGNORE_INDEX)
    ref_ent = -(full.exp() * full).sum(-1) * (tgt != IGNORE_INDEX)
    assert lp.shape == tgt.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=1e-5)


def test_token_logprobs_gradients_match_full_logits(policy, tokenizer):
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    token_logprobs(policy, ids, mask, labels).sum().backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum").neg().backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_token_accuracy_counts_argmax_hits(policy, tokenizer):
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    _, states = token_logprobs(policy, ids, mask, labels, return_hidden=True)
    logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = labels[:, 1:]
    tgt_hit = labels[:, 1:].clone()
    tgt_hit[0, 0] = logits[0, 0].argmax()  # make at least one target the argmax
    for t in (tgt, tgt_hit):
        expected = ((logits.argmax(-1) == t) & (t != IGNORE_INDEX)).sum()
        assert int(HEAD.token_accuracy(states, t, chunk=2)) == int(expected)
    assert int(HEAD.token_accuracy(states, tgt_hit, chunk=2)) >= 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_reads_last_real_token(tokenizer, side):
    model = load_reward_model("builtin-small", tokenizer, seed=0).eval()
    rows = _rows(tokenizer)
    ids, mask = _pad(rows, tokenizer.pad_token_id, side)
    with torch.no_grad():
        batched = model(ids, mask)
        alone = torch.stack([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
        # by hand: the head applied to the backbone's hidden state at the row's last token
        manual = torch.stack(
            [model.score(model.backbone(input_ids=torch.tensor([r])).last_hidden_state[0, -1])[0] for r in rows]
        )
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, manual, atol=1e-5, rtol=1e-5)
    # a different token in the last real position changes the reward, one in the padding does not
    ids2 = ids.clone()
    last = (mask * torch.arange(ids.shape[1])).argmax(-1)
    ids2[0, last[0]] = (ids[0, last[0]] + 1) % len(tokenizer)
    pad_pos = (mask[2] == 0).nonzero()[0, 0]
    ids2[2, pad_pos] = 5
    with torch.no_grad():
        r2 = model(ids2, mask)
    assert not torch.allclose(r2[0], batched[0])
    torch.testing.assert_close(r2[1:], batched[1:], atol=1e-6, rtol=1e-6)


def test_reward_model_rejects_empty_row(tokenizer):
    model = load_reward_model("builtin-small", tokenizer)
    with pytest.raises(ValueError, match="no real token"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_causal_lm_save_load_round_trip(policy, tokenizer, tmp_path):
    policy.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tok2 = load_tokenizer(str(tmp_path))
    assert tok2.pad_token_id == tokenizer.pad_token_id and len(tok2) == len(tokenizer)
    again = load_causal_lm(str(tmp_path), tok2)
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    assert torch.equal(token_logprobs(policy, ids, mask, labels), token_logprobs(again, ids, mask, labels))


def test_reward_model_save_load_round_trip(tokenizer, tmp_path):
    model = load_reward_model("builtin-small", tokenizer, seed=3).eval()
    model.save_pretrained(tmp_path)
    again = load_reward_model(str(tmp_path), tokenizer).eval()
    assert isinstance(again, RewardModel)
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "left")
    with torch.no_grad():
        assert torch.equal(model(ids, mask), again(ids, mask))
    with pytest.raises(FileNotFoundError, match="score_head"):
        RewardModel.from_pretrained(tmp_path / "missing")


def test_pad_equal_to_eos_gets_a_distinct_pad_token(policy, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "tok")
    policy.save_pretrained(tmp_path / "tok")
    fixed = load_tokenizer(str(tmp_path / "tok"))
    assert fixed.pad_token_id is not None and fixed.pad_token_id != fixed.eos_token_id
    model = load_causal_lm(str(tmp_path / "tok"), fixed)
    assert model.get_input_embeddings().num_embeddings >= len(fixed)
    assert model.config.pad_token_id == fixed.pad_token_id


def test_lora_policy_trains_only_adapters(policy, tokenizer):
    pytest.importorskip("peft")
    model = apply_lora(policy, r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    token_logprobs(model, ids, mask, labels).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm("builtin-small", tokenizer, seed=0, gradient_checkpointing=checkpointing).train()
        token_logprobs(model, ids, mask, labels).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert is_checkpointing(model)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_head_runs_in_the_autocast_dtype(policy, tokenizer):
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    full = token_logprobs(policy, ids, mask, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, (hidden, _) = token_logprobs(policy, ids, mask, labels, return_hidden=True)
    assert hidden.dtype == torch.bfloat16 and lp.dtype == torch.float32
    assert 0 < (lp - full).abs().max() < 0.5  # bf16 rounding of a whole model: close, not equal
    lp.sum().backward()
    assert policy.lm_head.weight.grad.dtype == torch.float32
