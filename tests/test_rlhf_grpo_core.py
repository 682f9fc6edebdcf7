"""rlhf.grpo_core on hand-made batches: the advantage estimators, dynamic sampling's zero-variance groups, DAPO's
overlong penalty, and each rollout-correction mode with perturbed sampler log-probs."""

import math

import pytest
import torch

from rlhf import grpo_core


def test_advantages_by_hand():
    # two groups of 3: rewards (1, 2, 3) and (0, 0, 6)
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    # group means 2 and 2; centred (-1, 0, 1), (-2, -2, 4)
    centred = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    # group stds (unbiased): 1 and sqrt(12) = 3.4641
    want = centred / torch.tensor([1.0] * 3 + [math.sqrt(12)] * 3)
    torch.testing.assert_close(grpo_core.advantages(r, g, "grpo", "group", eps=0.0), want)
    torch.testing.assert_close(grpo_core.advantages(r, g, "dr_grpo", "group"), centred)  # never scaled
    torch.testing.assert_close(grpo_core.advantages(r, g, "grpo", "none"), centred)
    # batch std (unbiased) of the six rewards: mean 2, squares 1 + 0 + 1 + 4 + 4 + 16 = 26, / 5 -> sqrt(5.2)
    torch.testing.assert_close(grpo_core.advantages(r, g, "grpo", "batch", eps=0.0), centred / math.sqrt(5.2))
    # rloo: r minus the mean of the other two: 1 - 2.5, 2 - 2, 3 - 1.5, 0 - 3, 0 - 3, 6 - 0
    torch.testing.assert_close(grpo_core.advantages(r, g, "rloo"), torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    # reinforce_pp: whitened over the batch with the biased std sqrt(26 / 6)
    torch.testing.assert_close(grpo_core.advantages(r, g, "reinforce_pp", eps=0.0), (r - 2.0) / math.sqrt(26 / 6))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        grpo_core.advantages(r, g, "ppo")
    with pytest.raises(ValueError, match="unknown scale_rewards"):
        grpo_core.advantages(r, g, "grpo", "seq")


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5])
    g = torch.tensor([7, 7, 3, 3, 3, 9, 9])  # group 7 all 1, group 3 all 0, group 9 mixed
    assert grpo_core.zero_variance_groups(r, g).tolist() == [True, True, True, True, True, False, False]
    # their advantages are exactly 0 under every group estimator, which is why they carry no signal
    for est in ("grpo", "dr_grpo", "rloo"):
        assert (grpo_core.advantages(r, g, est)[:5] == 0).all()


def test_overlong_penalty_by_hand():
    # max 20 tokens, buffer 5: no penalty up to 15; 16 -> -1/5, 18 -> -3/5, 20 and beyond -> -1 (times penalty 2)
    lengths = torch.tensor([3, 15, 16, 18, 20, 25])
    got = grpo_core.overlong_penalty(lengths, 20, 5, penalty=2.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.4, -1.2, -2.0, -2.0]))
    with pytest.raises(ValueError, match="overlong_buffer must lie in"):
        grpo_core.overlong_penalty(lengths, 20, 0)


def _logprobs():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # the sampler's log-probs: token log-ratios old - sampler = (0.1, -0.9, 1.2, pad) and (0.3, 0.2)
    sampler = old - torch.tensor([[0.1, -0.9, 1.2, 9.0], [0.3, 0.2, 5.0, 5.0]])
    return old, sampler, mask


def test_rollout_correction_modes():
    old, sampler, mask = _logprobs()
    cap = 2.0
    w, stats = grpo_core.rollout_correction(old, sampler, mask, "none", cap)
    assert w is None and stats["rollout/logprob_diff_max"] == pytest.approx(1.2)
    assert stats["rollout/logprob_diff_mean"] == pytest.approx((0.1 + 0.9 + 1.2 + 0.3 + 0.2) / 5)
    e = math.exp
    # token_truncate: min(e^d, 2): e^0.1, e^-0.9, 2 (e^1.2 = 3.32 capped); e^0.3, e^0.2
    w, stats = grpo_core.rollout_correction(old, sampler, mask, "token_truncate", cap)
    torch.testing.assert_close(w, torch.tensor([[e(0.1), e(-0.9), 2.0, 0.0], [e(0.3), e(0.2), 0.0, 0.0]]))
    assert stats["rollout/is_capped_frac"] == pytest.approx(1 / 5)
    # token_mask: 1 inside [0.5, 2]: e^-0.9 = 0.41 and e^1.2 = 3.3 fall outside
    w, stats = grpo_core.rollout_correction(old, sampler, mask, "token_mask", cap)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert stats["rollout/is_capped_frac"] == pytest.approx(2 / 5)
    # sequence_truncate: sums 0.4 and 0.5: e^0.4 = 1.49 and e^0.5 = 1.65, both under the cap
    w, _ = grpo_core.rollout_correction(old, sampler, mask, "sequence_truncate", cap)
    torch.testing.assert_close(w, torch.tensor([[e(0.4)] * 3 + [0.0], [e(0.5)] * 2 + [0.0, 0.0]]))
    # sequence_mask with cap 1.6: sequence 1 (1.49) kept, sequence 2 (1.65) dropped
    w, stats = grpo_core.rollout_correction(old, sampler, mask, "sequence_mask", 1.6)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert stats["rollout/is_capped_frac"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="unknown rollout_correction"):
        grpo_core.rollout_correction(old, sampler, mask, "clip")
    with pytest.raises(ValueError, match="rollout_correction_cap must be > 1"):
        grpo_core.rollout_correction(old, sampler, mask, "token_mask", 1.0)


def test_rollout_correction_without_mismatch_is_neutral():
    old, _, mask = _logprobs()
    for mode in grpo_core.ROLLOUT_CORRECTIONS[1:]:
        w, stats = grpo_core.rollout_correction(old, old.clone(), mask, mode)
        assert torch.equal(w, mask.float()) and stats["rollout/logprob_diff_max"] == 0.0
        assert stats["rollout/is_capped_frac"] == 0.0
