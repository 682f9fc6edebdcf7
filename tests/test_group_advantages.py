"""group_advantages (GRPO, RLOO) with groups in any order, and broadcast_to_tokens."""

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels


def test_hand_computed():
    # groups (in mixed order): id 4 -> scores 1, 2, 3; id 9 -> 5 (alone); id 2 -> 7, 11
    scores = torch.tensor([1.0, 5.0, 2.0, 7.0, 3.0, 11.0], device=DEVICE)
    ids = torch.tensor([4, 9, 4, 2, 4, 2], device=DEVICE)
    # grpo: id 4: mean 2, unbiased std 1 -> -1, 0, 1 (divided by 1 + eps); id 2: mean 9, std sqrt(8) = 2.8284271
    # -> -2 / 2.8284271 = -0.7071068 and +0.7071068; the single sample gets 0
    grpo = rlhf_kernels.group_advantages(scores, ids)
    assert grpo.tolist() == pytest.approx([-1, 0, 0, -0.7071068, 1, 0.7071068], abs=1e-5)
    plain = rlhf_kernels.group_advantages(scores, ids, scale_by_std=False)
    assert plain.tolist() == pytest.approx([-1, 0, 0, -2, 1, 2])
    # rloo: 1 - (2 + 3) / 2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; 7 - 11 = -4, 11 - 7 = 4; alone -> 0
    rloo = rlhf_kernels.group_advantages(scores, ids, mode="rloo")
    assert rloo.tolist() == pytest.approx([-1.5, 0, 0, -4, 1.5, 4])
    assert rloo.dtype == torch.float32


def test_equal_scores_and_broadcast():
    scores = torch.tensor([0.5, 0.5, 0.5], dtype=torch.bfloat16, device=DEVICE)
    ids = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    assert rlhf_kernels.group_advantages(scores, ids).tolist() == [0, 0, 0]  # std 0: eps keeps it finite
    adv = torch.tensor([1.0, -2.0], device=DEVICE)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], device=DEVICE)
    assert rlhf_kernels.broadcast_to_tokens(adv, mask).tolist() == [[1, 1, 0], [0, -2, -2]]


def test_bad_inputs():
    s = torch.randn(4, device=DEVICE)
    ids = torch.tensor([0, 0, 1, 1], device=DEVICE)
    with pytest.raises(ValueError, match="unknown group advantage mode 'ppo'; valid modes are grpo, rloo"):
        rlhf_kernels.group_advantages(s, ids, mode="ppo")
    with pytest.raises(TypeError, match="integer"):
        rlhf_kernels.group_advantages(s, ids.float())
    with pytest.raises(ValueError, match="does not match"):
        rlhf_kernels.group_advantages(s, ids[:3])
