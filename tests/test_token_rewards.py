"""token_rewards: the KL penalty at every response token plus the score at the last one."""

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels


def test_hand_computed():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    scores = torch.tensor([1.0, 2.0, 3.0], device=DEVICE)
    kl = torch.full((3, 4), 0.5, device=DEVICE)
    # -0.1 * 0.5 = -0.05 at every masked token; the score lands on the last masked token (holes allowed);
    # the row without tokens stays zero (its score is dropped)
    expect = [[0, -0.05, -0.05 + 1, 0], [-0.05, 0, -0.05, -0.05 + 2], [0, 0, 0, 0]]
    out = rlhf_kernels.token_rewards(scores, mask, kl=kl, kl_coef=0.1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expect, device=DEVICE), atol=1e-6)
    plain = rlhf_kernels.token_rewards(scores.bfloat16(), mask.int())
    assert plain.tolist() == [[0, 0, 1, 0], [0, 0, 0, 2], [0, 0, 0, 0]]


def test_bad_inputs():
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"scores must have shape \(B,\)"):
        rlhf_kernels.token_rewards(torch.zeros(3, device=DEVICE), mask)
    with pytest.raises(ValueError, match="mask shape"):
        rlhf_kernels.token_rewards(torch.zeros(2, device=DEVICE), mask, kl=torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(TypeError, match="scores"):
        rlhf_kernels.token_rewards(torch.zeros(2, dtype=torch.long, device=DEVICE), mask)
