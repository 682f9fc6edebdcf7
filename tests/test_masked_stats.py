"""masked_mean / masked_var / masked_whiten: hand-computed values, empty selections, dtypes."""

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels


def test_hand_computed():
    # selected: 1, 2, 3 (100 is masked out): mean 2; deviations -1, 0, 1 -> sum of squares 2
    # unbiased variance 2 / 2 = 1, biased 2 / 3; whitening (x - 2) / sqrt(1 + 1e-8)
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], device=DEVICE)
    mask = torch.tensor([True, True, True, False], device=DEVICE)
    assert rlhf_kernels.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert rlhf_kernels.masked_var(x, mask).item() == pytest.approx(1.0)
    assert rlhf_kernels.masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert rlhf_kernels.masked_whiten(x, mask).tolist() == pytest.approx([-1.0, 0.0, 1.0, 98.0], abs=1e-6)
    assert rlhf_kernels.masked_whiten(x, mask, shift_mean=False).tolist() == pytest.approx([1, 2, 3, 100], abs=1e-6)
    assert rlhf_kernels.masked_mean(x, mask.long()).item() == pytest.approx(2.0)  # a 0/1 integer mask


def test_dim_and_empty_rows():
    x = torch.tensor([[1.0, 3.0, 8.0], [4.0, 5.0, 6.0]], device=DEVICE)
    mask = torch.tensor([[True, True, False], [False, False, False]], device=DEVICE)
    assert rlhf_kernels.masked_mean(x, mask, dim=1).tolist() == [2.0, 0.0]  # an empty row gives 0, not NaN
    assert rlhf_kernels.masked_mean(x, mask, dim=0).tolist() == [1.0, 3.0, 0.0]


def test_empty_selection_is_an_error():
    x = torch.randn(3, 4, device=DEVICE)
    none = torch.zeros(3, 4, dtype=torch.bool, device=DEVICE)
    one = none.clone()
    one[1, 2] = True
    with pytest.raises(ValueError, match="selects 0 elements; masked_mean"):
        rlhf_kernels.masked_mean(x, none)
    with pytest.raises(ValueError, match="selects 1 element; masked_var with unbiased=True needs at least 2"):
        rlhf_kernels.masked_var(x, one)
    assert rlhf_kernels.masked_var(x, one, unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="masked_whiten"):
        rlhf_kernels.masked_whiten(x, one)
    with pytest.raises(ValueError, match="mask shape"):
        rlhf_kernels.masked_mean(x, none[:2])
    with pytest.raises(TypeError, match="floating-point"):
        rlhf_kernels.masked_mean(x.long(), none)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_matches_fp64_and_keeps_precision(dtype):
    x = (torch.randn(64, 500, device=DEVICE) * 2 + 1000).to(dtype)  # a large mean: the variance must not cancel
    mask = torch.rand(64, 500, device=DEVICE) > 0.4
    sel = x.double()[mask]
    assert rlhf_kernels.masked_mean(x, mask).item() == pytest.approx(sel.mean().item(), rel=1e-6)
    assert rlhf_kernels.masked_var(x, mask).item() == pytest.approx(sel.var().item(), rel=1e-3)
    white = rlhf_kernels.masked_whiten(x, mask)
    assert white.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expect = (x.double() - sel.mean()) / (sel.var() + 1e-8).sqrt()
    assert torch.allclose(white.double(), expect, atol=1e-3)
