"""rlhf.models: the fused policy forward and losses (one forward call each), the reward head's token, LoRA,
save/load round trips, pad tokens."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rlhf import models  # noqa: E402
from rlhf.distributed import forward_call, is_sharded  # noqa: E402
from rlhf.models import (  # noqa: E402
    IGNORE_INDEX,
    LMHead,
    RewardModel,
    apply_lora,
    is_checkpointing,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    position_ids_from_mask,
)
from rlhf_kernels import reference  # noqa: E402

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


def test_logprobs_counts_argmax_hits_like_full_logits(policy, tokenizer, monkeypatch):
    monkeypatch.setattr(models, "CORRECT_CHUNK_ROWS", 2)  # several chunks, the last one partial
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]  # right padding: same positions
    hit = labels.clone()
    hit[0, 1] = logits[0, 0].argmax()  # make at least one target the argmax
    hit[1, 2] = IGNORE_INDEX  # an ignored position inside a row
    for lab in (labels, hit):
        tgt = lab[:, 1:]
        expected = ((logits.argmax(-1) == tgt) & (tgt != IGNORE_INDEX)).sum()
        lp, correct = token_logprobs(policy, ids, mask, lab, return_correct=True)
        assert correct.dtype == torch.int64 and correct.dim() == 0 and not correct.requires_grad
        assert int(correct) == int(expected)
        lp_ent, ent, correct_ent = token_logprobs(policy, ids, mask, lab, return_entropy=True, return_correct=True)
        assert torch.equal(lp_ent, lp) and int(correct_ent) == int(expected) and ent.shape == lp.shape
    assert int(expected) >= 1
    # start > 0: only the targets labels[:, start+1:] are counted; the states come last
    *_, correct, states = token_logprobs(policy, ids, mask, hit, start=2, return_correct=True, return_hidden=True)
    tgt = hit[:, 3:]
    assert int(correct) == int(((logits[:, 2:].argmax(-1) == tgt) & (tgt != IGNORE_INDEX)).sum())
    assert states.hidden.shape[:2] == tgt.shape and states.model is policy


def _full_logits(model, ids, mask):
    """``(B, T, V)`` logits of the whole model, positions counted from the mask as the head does."""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def _grads(model):
    """The gradients the tests compare (the LM head and a backbone weight), cleared afterwards."""
    names = ("lm_head.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight")
    params = dict(model.named_parameters())
    out = {n: params[n].grad.clone() for n in names}
    model.zero_grad(set_to_none=True)
    return out


def test_ppo_loss_matches_full_logits_and_reference(policy, tokenizer):
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "left")  # prompts left-padded as in a rollout
    B, T = ids.shape
    P = 3
    R = T - P
    gen = torch.Generator().manual_seed(0)
    old = -3.0 - torch.rand(B, R, generator=gen)
    adv = torch.randn(B, R, generator=gen)
    response_mask = torch.ones(B, R, dtype=torch.bool)
    response_mask[1, -2:] = False  # a short response
    opts = dict(clip_low=0.2, clip_high=0.3, entropy_coef=0.01, agg="seq-mean-token-mean")
    loss, stats = HEAD.ppo_loss(
        policy, ids, mask, ids[:, P:], old, adv, response_mask, start=P - 1, normalizer=4, **opts
    )
    loss.backward()
    ours = _grads(policy)

    logits = _full_logits(policy, ids, mask)[:, P - 1 : -1]  # (B, R, V) predict tokens P .. T-1
    labels = ids[:, P:].masked_fill(~response_mask, IGNORE_INDEX)
    lp, ent = reference.logprobs(logits, labels)
    want, want_stats = reference.ppo_policy_loss(
        lp, old, adv, response_mask, opts["clip_low"], opts["clip_high"], agg=opts["agg"], normalizer=4
    )
    want = want - opts["entropy_coef"] * reference.aggregate_loss(ent, response_mask, opts["agg"], 4)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    for name in ("policy/clipfrac", "policy/approxkl"):
        torch.testing.assert_close(stats[name], want_stats[name], rtol=1e-4, atol=1e-6, msg=name)
    for name, grad in _grads(policy).items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss_type, average", [("sigmoid", False), ("ipo", True)])
def test_dpo_loss_matches_full_logits_and_reference(policy, tokenizer, loss_type, average):
    rows = _rows(tokenizer)
    chosen = [rows[0], rows[1], rows[0][:2] + rows[2]]
    rejected = [rows[1][:4] + rows[0][2:], rows[0][:4] + rows[2], rows[0][:2] + rows[1]]
    ids, mask = _pad(chosen + rejected, tokenizer.pad_token_id, "right")  # rows 0-2 chosen, rows 3-5 rejected
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # a two-token prompt
    ref_chosen, ref_rejected = torch.tensor([-20.0, -25.0, -3.0]), torch.tensor([-22.0, -21.0, -30.0])
    options = dict(beta=0.5, loss_type=loss_type)
    loss, _ = HEAD.dpo_loss(
        policy, ids, mask, labels, ref_chosen, ref_rejected, normalizer=6, average_log_prob=average, **options
    )
    loss.backward()
    ours = _grads(policy)

    lp, _ = reference.logprobs(_full_logits(policy, ids, mask)[:, :-1], labels[:, 1:])
    seq = lp.sum(-1)  # (2B,) sequence log-probs: sums, or means over the response tokens
    seq = seq / (labels[:, 1:] != IGNORE_INDEX).sum(-1) if average else seq
    want = reference.dpo_loss(seq[:3], seq[3:], ref_chosen, ref_rejected, **options).sum() / 6
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in _grads(policy).items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_call_on_an_unsharded_model_is_the_call(policy):
    calls = []

    def fn(a, b=0):
        calls.append((a, b))
        return torch.tensor(float(a + b)), "extra"

    with torch.no_grad():
        out = forward_call(policy, fn, 2, b=3)
    assert out == (torch.tensor(5.0), "extra") and calls == [(2, 3)]
    assert not is_sharded(policy)
    # with gradients: the value and its graph are fn's own
    weight = policy.lm_head.weight
    value = forward_call(policy, lambda: (weight * 2).sum())
    value.backward()
    torch.testing.assert_close(weight.grad, torch.full_like(weight, 2.0))


def test_kl_reads_each_model_once_and_is_zero_against_itself(policy, tokenizer, monkeypatch):
    other = load_causal_lm("builtin-small", tokenizer, seed=1)
    ids, mask = _pad(_rows(tokenizer), tokenizer.pad_token_id, "right")
    calls = []
    real = models.forward_call

    def counting(model, fn, *args, **kwargs):
        calls.append(model)
        return real(model, fn, *args, **kwargs)

    monkeypatch.setattr(models, "forward_call", counting)
    with torch.no_grad():
        states, ref_states = HEAD.hidden(policy, ids, mask), HEAD.hidden(other, ids, mask)
        calls.clear()
        kl = HEAD.kl(states, ref_states)
        assert calls == [policy, other]
        calls.clear()
        assert torch.equal(HEAD.kl(states, states), torch.zeros_like(kl))
        assert calls == [policy]  # the same model (a LoRA policy and its base): one call
    assert kl.shape == ids[:, 1:].shape and bool((kl > 0).all())


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
