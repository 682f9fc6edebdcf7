"""The loss variants of rlhf_kernels.fused_linear_ppo_loss (loss_type cispo / sapo, sequence-level ratios,
importance weights) against the public unfused composition on the same backend and against the fp64 reference:
value, statistics and gradients, with chunks smaller than a sequence, several sequences per chunk, and one chunk."""

import pytest
import torch
from conftest import DEVICE, assert_within_torch_error, op_backends
from test_fused_linear_ppo_loss import B, T, make_batch, run

import rlhf_kernels
from rlhf_kernels import reference

VARIANTS = {  # name: (policy options, per-sequence advantages, importance weights, chunk_size)
    "cispo token": (dict(loss_type="cispo", clip_low=0.2, clip_high=0.28), 0, False, 5),
    "sapo token is": (dict(loss_type="sapo", sapo_tau_pos=0.8, sapo_tau_neg=1.3), 0, True, None),
    "gspo seq": (dict(ratio_level="sequence", clip_low=0.05, clip_high=0.05), 1, False, 1),
    "gspo seq chunks": (dict(ratio_level="sequence", clip_low=0.05, clip_high=0.05), 1, True, 12),
    "gspo-token is": (dict(ratio_level="sequence_token", clip_low=0.05, clip_high=0.08), 0, True, 20),
    "gspo cispo": (dict(ratio_level="sequence", loss_type="cispo", clip_low=0.05, clip_high=0.05), 1, False, None),
    "gspo sapo": (dict(ratio_level="sequence", loss_type="sapo"), 0, True, 7),
}


def _is_weights():
    g = torch.Generator().manual_seed(11)
    c = 0.5 + torch.rand(B, T, generator=g)
    c[0, 5] = c[3, :3] = 0.0  # dropped tokens
    return c.to(DEVICE)


@pytest.mark.parametrize("backend", op_backends("ppo_policy_fwd") + ["reference"])
@pytest.mark.parametrize("case", list(VARIANTS))
def test_variant_matches_composition_and_reference(backend, case):
    opts, per_seq, use_c, chunk = VARIANTS[case]
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32, per_seq)
    c = _is_weights() if use_c else None
    o = dict(agg="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.01, temperature=0.9, **opts)
    leaves = [hidden, weight, bias]

    def fused(h, w, b):
        return rlhf_kernels.fused_linear_ppo_loss(
            h, w, labels, old, adv, mask, bias=b, ref_logprobs=ref, is_weights=c, chunk_size=chunk, backend=backend,
            **o,
        )  # fmt: skip

    policy = {k: v for k, v in o.items() if k not in ("kl_coef", "entropy_coef", "temperature")}

    def unfused(h, w, b):  # the public ops on full logits: log-probs and entropy -> policy loss + KL - entropy
        y = torch.where(mask, labels, -100)
        lp, ent = rlhf_kernels.fused_linear_logprobs(h, w, y, bias=b, temperature=0.9, return_entropy=True,
                                                     backend=backend)  # fmt: skip
        loss, stats = rlhf_kernels.ppo_policy_loss(lp, old, adv, mask, is_weights=c, backend=backend, **policy)
        kl = rlhf_kernels.kl_penalty(lp, torch.where(mask, ref, 0.0), "k3")
        loss = loss + 0.1 * rlhf_kernels.aggregate_loss(kl, mask, o["agg"])
        return loss - 0.01 * rlhf_kernels.aggregate_loss(ent, mask, o["agg"]), stats

    ours, ours_stats = run(fused, leaves)
    comp, comp_stats = run(unfused, leaves)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    clean = [torch.where(mask, x, 0.0).double() for x in (old, ref)]
    adv64 = (adv.unsqueeze(-1).expand(B, T) if per_seq else torch.where(mask, adv, 0.0)).double()
    ref_out, _ = run(
        lambda h, w, b: reference.fused_linear_ppo_loss(
            h, w, labels, clean[0], adv64, mask, bias=b, ref_logprobs=clean[1], kl_estimator="k3",
            is_weights=None if c is None else c.double(), **o,
        ),
        leaves64,
    )  # fmt: skip
    for name, x, u, r in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], ours, comp, ref_out):
        assert torch.isfinite(x).all(), name
        # fused and unfused run the same kernels on the same log-probs: equal up to the order of the sums
        assert torch.allclose(x, u, rtol=1e-5, atol=1e-6), f"{case} {name} vs unfused"
        assert_within_torch_error(x, u, r, 1e-5, f"{backend} {case} {name}")
    assert set(ours_stats) >= set(comp_stats) | {"policy/entropy", "policy/kl", "policy/max_abs_log_ratio"}
    for k, v in comp_stats.items():
        assert ours_stats[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    if use_c:
        assert ours_stats["policy/is_weight_zero_frac"] > 0


@pytest.mark.parametrize("backend", op_backends("ppo_policy_fwd"))
def test_sequence_chunks_do_not_change_the_result(backend):
    """Sequence-level ratios need whole sequences per chunk: every chunk size gives the one-chunk result."""
    hidden, weight, bias, labels, old, adv, mask, ref = make_batch(torch.float32, 1)
    leaves = [hidden, weight, bias]
    outs = []
    for chunk in (1, 4, 9, None):
        loss, stats = run(
            lambda h, w, b, chunk=chunk: rlhf_kernels.fused_linear_ppo_loss(
                h, w, labels, old, adv, mask, bias=b, ratio_level="sequence", clip_low=0.05, clip_high=0.05,
                chunk_size=chunk, backend=backend,
            ),
            leaves,
        )  # fmt: skip
        outs.append((loss, stats))
    for loss, stats in outs[:-1]:
        for x, y in zip(loss, outs[-1][0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert stats["policy/clipfrac"] == outs[-1][1]["policy/clipfrac"]
    assert 0 < outs[-1][1]["policy/clipfrac"] < 1
