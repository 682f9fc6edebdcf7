"""Under torch.no_grad() the fused heads do no gradient work: their autograd Functions see no input needing grad."""

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.ops import _sequence_loss, fused_linear_kl, fused_linear_logprobs, fused_linear_ppo_loss

B, T, H, V = 2, 5, 8, 13


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    return hidden, weight, labels


def _calls():
    h, w, y = _inputs()
    flat_mask = y != -100
    zeros = torch.zeros(2 * B, T)
    return {
        fused_linear_logprobs.FusedLinearLogprobsFunction: lambda: rlhf_kernels.fused_linear_logprobs(h, w, y),
        fused_linear_kl.FusedLinearKLFunction: lambda: rlhf_kernels.fused_linear_kl(h, w, h.detach() + 0.1, w),
        fused_linear_ppo_loss.FusedLinearPPOLossFunction: lambda: rlhf_kernels.fused_linear_ppo_loss(
            h, w, y, zeros - 2.0, zeros + 1.0, flat_mask
        )[0],
        _sequence_loss.FusedLinearSequenceLossFunction: lambda: rlhf_kernels.fused_linear_dpo_loss(
            h,
            w,
            y,
            torch.zeros(B),
            torch.zeros(B),
            backend="cpu" if "cpu" in rlhf_kernels.available_backends("cpu") else None,
        )[0],
    }


@pytest.mark.parametrize("index", range(4))
def test_no_grad_skips_gradient_work(monkeypatch, index):
    fn_cls, call = list(_calls().items())[index]
    seen = []
    forward = fn_cls.forward

    def spy(ctx, *args):
        seen.append(tuple(ctx.needs_input_grad[:3]))
        return forward(ctx, *args)

    monkeypatch.setattr(fn_cls, "forward", staticmethod(spy))
    with_grad = call()
    with torch.no_grad():
        without = call()
    assert seen[0][:2] == (True, True) and not any(seen[-1])
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
