"""PPO maths on hand-computed numbers: KL-penalised per-token rewards and GAE, the positions of a rollout's values
and log-probs, the reported objective, and the loss aggregation modes on rows shorter than T."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

import rlhf_kernels  # noqa: E402
from rlhf.collators import PromptCollator  # noqa: E402
from rlhf.config import PPOConfig  # noqa: E402
from rlhf.models import LMHead, load_causal_lm, load_reward_model, load_tokenizer  # noqa: E402
from rlhf.ppo_core import compute_advantages, response_values, rollout, rollout_stats  # noqa: E402

NAN = float("nan")
PAD = 9.0  # garbage in the padding of the inputs: it must never reach a result

# Two responses padded to R = 3: row 0 has 3 real tokens, row 1 has 2 (its last real token is t = 1).
MASK = torch.tensor([[True, True, True], [True, True, False]])
SCORES = torch.tensor([1.0, 2.0])
KL = torch.tensor([[0.5, 0.25, 1.0], [1.0, -0.5, PAD]])
VALUES = torch.tensor([[0.5, 1.0, 0.25], [1.5, 0.5, PAD]])
KL_COEF, GAMMA, LAM = 0.5, 0.5, 0.5  # gamma * lam = 0.25; every number below is exact in binary


def _advantages(kl=KL, kl_coef=KL_COEF):
    return compute_advantages(
        SCORES, kl, VALUES, MASK, kl_coef=kl_coef, gamma=GAMMA, lam=LAM, whiten=False
    )  # fmt: skip


def test_rewards_and_gae_of_a_tiny_rollout_by_hand():
    rewards, advantages, returns = _advantages()
    # rewards_t = -kl_coef * kl_t, plus the score on the last real token:
    #   row 0: -0.5 * [0.5, 0.25, 1.0] = [-0.25, -0.125, -0.5]; + 1.0 at t = 2        -> [-0.25, -0.125, 0.5]
    #   row 1: -0.5 * [1.0, -0.5]      = [-0.5, 0.25];         + 2.0 at t = 1, 0 pad   -> [-0.5, 2.25, 0]
    expected_rewards = torch.tensor([[-0.25, -0.125, 0.5], [-0.5, 2.25, 0.0]])
    # GAE from the end, next value 0 after the last real token; delta_t = r_t + gamma V_{t+1} - V_t,
    # A_t = delta_t + gamma lam A_{t+1}:
    #   row 0: delta_2 = 0.5 + 0 - 0.25 = 0.25                      A_2 = 0.25
    #          delta_1 = -0.125 + 0.5 * 0.25 - 1.0 = -1.0            A_1 = -1.0 + 0.25 * 0.25 = -0.9375
    #          delta_0 = -0.25 + 0.5 * 1.0 - 0.5 = -0.25             A_0 = -0.25 + 0.25 * -0.9375 = -0.484375
    #   row 1: delta_1 = 2.25 + 0 - 0.5 = 1.75                       A_1 = 1.75
    #          delta_0 = -0.5 + 0.5 * 0.5 - 1.5 = -1.75              A_0 = -1.75 + 0.25 * 1.75 = -1.3125
    expected_advantages = torch.tensor([[-0.484375, -0.9375, 0.25], [-1.3125, 1.75, 0.0]])
    # returns = A + V: [-0.484375 + 0.5, -0.9375 + 1.0, 0.25 + 0.25], [-1.3125 + 1.5, 1.75 + 0.5, 0]
    expected_returns = torch.tensor([[0.015625, 0.0625, 0.5], [0.1875, 2.25, 0.0]])
    torch.testing.assert_close(rewards, expected_rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages, expected_advantages, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns, expected_returns, atol=1e-6, rtol=0)


def test_a_positive_kl_lowers_the_reward():
    """The sign of the penalty: the same rollout without KL has higher rewards wherever kl > 0, lower where kl < 0."""
    penalised = _advantages()
    free = _advantages(kl_coef=0.0)
    # without the penalty the rewards are the scores alone: [0, 0, 1], [0, 2, 0]
    torch.testing.assert_close(free[0], torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), atol=0, rtol=0)
    # with it: 0.5 * kl lower, e.g. row 0 t = 2: 1.0 - 0.5 * 1.0 = 0.5; row 1 t = 1 (kl = -0.5): 2.0 + 0.25 = 2.25
    torch.testing.assert_close(penalised[0] - free[0], -KL_COEF * KL * MASK, atol=1e-6, rtol=0)
    up, down = MASK & (KL > 0), MASK & (KL < 0)
    assert (penalised[0][up] < free[0][up]).all() and (penalised[0][down] > free[0][down]).all()
    # row 0 has kl > 0 at every token, so every advantage of that row goes down too
    assert (penalised[1][0] < free[1][0]).all()


def test_rollout_stats_objective_by_hand():
    batch = {
        "response_mask": MASK,
        "kl": KL * MASK,  # the rollout's kl is 0 off the mask: sums 0.5 + 0.25 + 1.0 = 1.75 and 1.0 - 0.5 = 0.5
        "scores": SCORES,
        "entropy": torch.tensor([[1.0, 0.5, 0.25], [2.0, 1.0, 0.0]]),  # sums 1.75 and 3.0
        "ended": torch.tensor([True, False]),
    }
    stats = rollout_stats(batch, KL_COEF)
    assert stats["objective/kl"] == pytest.approx((1.75 + 0.5) / 2)  # 1.125
    # -kl_coef * sequence KL: -0.5 * 1.75 = -0.875 and -0.5 * 0.5 = -0.25 -> mean -0.5625
    assert stats["objective/non_score_reward"] == pytest.approx(-0.5625)
    # score - kl_coef * sequence KL: 1.0 - 0.875 = 0.125 and 2.0 - 0.25 = 1.75 -> mean 0.9375
    assert stats["objective/rlhf_reward"] == pytest.approx(0.9375)
    assert stats["objective/scores"] == pytest.approx(1.5)
    assert stats["objective/entropy"] == pytest.approx((1.75 + 3.0) / 2)
    assert stats["objective/kl_coef"] == KL_COEF
    assert stats["val/num_eos_tokens"] == 1
    assert stats["response_length"] == pytest.approx((3 + 2) / 2)


# ---------------------------------------------------------------------------------------------------------
# Positions in a real rollout: value t is the state before response token t; log-prob t predicts token P + t
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[3, 0], ids=["one-chunk", "two-chunks"])
def rolled_out(request):
    """A rollout of 3 prompts of 12, 2 and 8 tokens (left-padded), scored in pieces of ``batch_size=2``.

    ``generation_batch_size=3``: one generate call (prompts padded to 12), its tokens scored in two pieces (2 + 1).
    ``generation_batch_size=0`` (= batch_size): two generate calls of 2 and 1 prompts (padded to 12 and to 8); the
    second chunk gets 4 more pad columns on the left when the chunks are concatenated.
    """
    tokenizer = load_tokenizer("builtin-small")
    policy = load_causal_lm("builtin-small", tokenizer, seed=0).eval()
    ref = load_causal_lm("builtin-small", tokenizer, seed=1).eval()  # a different model: its log-probs differ
    critic = load_reward_model("builtin-small", tokenizer, seed=2).eval()
    texts = ["what is two plus three", "hi", "reverse the word cat please"]  # left-padded to different lengths
    rows = [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths == [12, 2, 8], lengths
    # log-probs are taken at the sampling temperature
    cfg = PPOConfig(
        model="builtin-small",
        device="cpu",
        max_new_tokens=5,
        batch_size=2,
        generation_batch_size=request.param,
        temperature=0.7,
    )
    head = LMHead.from_config(cfg, temperature=cfg.temperature)
    collate = PromptCollator(tokenizer.pad_token_id)
    # the critic doubles as the reward model: the scores are not what these tests check
    batch = rollout(policy, ref, critic, critic, tokenizer, rows, collate, cfg, head, step=0)
    assert batch["prompt_length"] == max(lengths)  # the chunks are padded to the longest prompt of the batch
    P = batch["prompt_length"]
    # every prompt's real tokens end at position P - 1, the padding before them is pad tokens with attention 0
    prompt_attention = batch["attention_mask"][:, :P]
    assert prompt_attention.sum(-1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert prompt_attention[b, P - n :].all() and not prompt_attention[b, : P - n].any()
        assert batch["input_ids"][b, P - n : P].tolist() == rows[b]["input_ids"]
        assert (batch["input_ids"][b, : P - n] == tokenizer.pad_token_id).all()
    return policy, ref, critic, batch, cfg


@pytest.mark.parametrize("t", [0, 3])
def test_rollout_values_are_the_critic_at_the_state_before_each_token(rolled_out, t):
    _, _, critic, batch, _ = rolled_out
    P, mask = batch["prompt_length"], batch["response_mask"]
    assert mask[:, t].any()
    # the state before response token t is the sequence up to position P - 1 + t (for t = 0, the last prompt
    # token); the critic's forward reads its last real token
    with torch.no_grad():
        expected = critic(batch["input_ids"][:, : P + t], batch["attention_mask"][:, : P + t])
    rows = mask[:, t]
    torch.testing.assert_close(batch["values"][rows, t], expected[rows], atol=1e-5, rtol=1e-5)
    # the value one position later is a different number, so a shift by one cannot pass
    with torch.no_grad():
        later = critic(batch["input_ids"][:, : P + t + 1], batch["attention_mask"][:, : P + t + 1])
    assert ((later[rows] - expected[rows]).abs() > 1e-3).all()


def test_update_values_line_up_with_the_rollout_values(rolled_out):
    """``response_values`` (the update's new values, clipped around the rollout's) at the same positions."""
    _, _, critic, batch, _ = rolled_out
    mask = batch["response_mask"]
    with torch.no_grad():
        values = response_values(critic, batch)
    assert values.shape == mask.shape
    torch.testing.assert_close(values[mask], batch["values"][mask], atol=1e-5, rtol=1e-5)


def test_rollout_logprobs_match_full_logits(rolled_out):
    policy, ref, _, batch, cfg = rolled_out
    P, mask = batch["prompt_length"], batch["response_mask"]
    ids, attention = batch["input_ids"], batch["attention_mask"]
    positions = (attention.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens only
    for model, key in ((policy, "logprobs"), (ref, "ref_logprobs")):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        # response token t (position P + t) is predicted by the logits at position P - 1 + t
        logp = torch.log_softmax(logits[:, P - 1 : -1].double() / cfg.temperature, -1)
        expected = logp.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1) * mask
        torch.testing.assert_close(batch[key].double(), expected, atol=1e-5, rtol=1e-5, msg=key)
    # policy and ref differ far beyond the tolerance above, so the check would catch the two keys swapped (one
    # token may differ little by chance: the median is what matters)
    assert (batch["logprobs"] - batch["ref_logprobs"])[mask].abs().median() > 1e-2
    torch.testing.assert_close(batch["kl"], (batch["logprobs"] - batch["ref_logprobs"]) * mask, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Aggregation on rows shorter than T = 4 (NaN padding), and a third row with no token at all
# ---------------------------------------------------------------------------------------------------------

AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
# policy tokens (old log-prob -0.7, ratio r = exp(lp - old), A), per-token loss max(-A r, -A clip(r, 0.8, 1.2)):
#   row 0: r = 1,   A = 1   -> -1 (unclipped, gradient -A r = -1)
#          r = 1.5, A = 2   -> max(-3, -2.4) = -2.4 (clipped, gradient 0)
#          r = 0.5, A = -1  -> max(0.5, 0.8) = 0.8 (clipped, gradient 0)
#   row 1: r = 1,   A = -0.5 -> 0.5 (unclipped, gradient 0.5)
RATIOS = [[1.0, 1.5, 0.5, NAN], [1.0, NAN, NAN, NAN], [NAN] * 4]
ADVANTAGES = [[1.0, 2.0, -1.0, NAN], [-0.5, NAN, NAN, NAN], [NAN] * 4]
# per-token sums: row 0 -1 - 2.4 + 0.8 = -2.6 (3 tokens), row 1 0.5 (1 token); 4 tokens, 2 sequences with a token
# mode -> (loss, weight of a row-0 token, weight of a row-1 token)
POLICY_AGG = {
    "token-mean": ((-2.6 + 0.5) / 4, 1 / 4, 1 / 4),  # -0.525
    "seq-mean-token-sum": ((-2.6 + 0.5) / 2, 1 / 2, 1 / 2),  # -1.05
    "seq-mean-token-mean": ((-2.6 / 3 + 0.5 / 1) / 2, 1 / 6, 1 / 2),  # -0.18333
    "seq-mean-token-sum-norm": ((-2.6 + 0.5) / (2 * 4), 1 / 8, 1 / 8),  # -0.2625
}
# value tokens (v, old, R), clip 0.2, per-token 0.5 max((v - R)^2, (clip(v, old - 0.2, old + 0.2) - R)^2):
#   row 0: (1, 1, 0)     -> 0.5 max(1, 1) = 0.5
#          (2, 1.5, 1.5) -> 0.5 max(0.25, (1.7 - 1.5)^2 = 0.04) = 0.125
#          (1, 0, 1)     -> 0.5 max(0, (0.2 - 1)^2 = 0.64) = 0.32 (clipped)
#   row 1: (0.5, 0.5, -0.5) -> 0.5 max(1, 1) = 0.5
V_NEW = [[1.0, 2.0, 1.0, NAN], [0.5, NAN, NAN, NAN], [NAN] * 4]
V_OLD = [[1.0, 1.5, 0.0, NAN], [0.5, NAN, NAN, NAN], [NAN] * 4]
V_RET = [[0.0, 1.5, 1.0, NAN], [-0.5, NAN, NAN, NAN], [NAN] * 4]
# row sums 0.5 + 0.125 + 0.32 = 0.945 (3 tokens) and 0.5 (1 token)
VALUE_AGG = {
    "token-mean": (0.945 + 0.5) / 4,  # 0.36125
    "seq-mean-token-sum": (0.945 + 0.5) / 2,  # 0.7225
    "seq-mean-token-mean": (0.945 / 3 + 0.5) / 2,  # 0.4075
    "seq-mean-token-sum-norm": (0.945 + 0.5) / (2 * 4),  # 0.180625
}


def test_the_hand_tables_cover_every_agg_mode():
    assert set(POLICY_AGG) == set(VALUE_AGG) == set(rlhf_kernels.AGG_MODES)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("agg", rlhf_kernels.AGG_MODES)
def test_policy_loss_aggregation_by_hand(agg, backend):
    old = torch.full((3, 4), -0.7)
    logprobs = (old + torch.tensor(RATIOS).log()).requires_grad_()
    loss, _ = rlhf_kernels.ppo_policy_loss(
        logprobs, old, torch.tensor(ADVANTAGES), AGG_MASK, clip_low=0.2, clip_high=0.2, agg=agg, backend=backend
    )
    expected, w0, w1 = POLICY_AGG[agg]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # gradient w_t * (-A r) on the unclipped tokens: row 0 t = 0 (-1) and row 1 t = 0 (0.5); 0 elsewhere
    expected_grad = torch.zeros(3, 4)
    expected_grad[0, 0], expected_grad[1, 0] = -1.0 * w0, 0.5 * w1
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("agg", rlhf_kernels.AGG_MODES)
def test_value_loss_aggregation_by_hand(agg, backend):
    values = torch.tensor(V_NEW).requires_grad_()
    loss, stats = rlhf_kernels.ppo_value_loss(
        values, torch.tensor(V_OLD), torch.tensor(V_RET), AGG_MASK, clip=0.2, agg=agg, backend=backend
    )
    assert loss.item() == pytest.approx(VALUE_AGG[agg], rel=1e-6)
    assert stats["val/clipfrac"].item() == pytest.approx(1 / 4)  # one of the 4 tokens is clipped
    loss.backward()
    # gradient w_t * (v - R) on the unclipped tokens: row 0 t = 0 (1), t = 1 (0.5), row 1 t = 0 (1); the weights
    # depend only on the mask, so they are the policy table's
    _, w0, w1 = POLICY_AGG[agg]
    expected_grad = torch.zeros(3, 4)
    expected_grad[0, 0], expected_grad[0, 1], expected_grad[1, 0] = 1.0 * w0, 0.5 * w0, 1.0 * w1
    torch.testing.assert_close(values.grad, expected_grad, atol=1e-6, rtol=1e-6)
