"""PPO-ptx (rlhf.ptx): mixing changes the policy gradient by exactly ptx_coef x the LM-loss gradient of the update's
ptx rows; the rows follow the resumable data order; PPO and GRPO train with it and resume bit for bit; errors."""

import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from rlhf_cli_helpers import final_weights  # noqa: E402

from rlhf import grpo, ppo  # noqa: E402
from rlhf.config import PPOConfig  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.grpo_core import GRPOConfig  # noqa: E402
from rlhf.models import LMHead, load_causal_lm, load_tokenizer  # noqa: E402
from rlhf.ptx import PTX_KEY, SEED_OFFSET, build_ptx, with_ptx  # noqa: E402
from rlhf.sft import sft_loss  # noqa: E402
from rlhf.train import step_rows  # noqa: E402

QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1, device="cpu")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin-small")


def grads(model, micros, loss_fn):
    model.zero_grad(set_to_none=True)
    for micro in micros:
        loss_fn(micro, 3.0)[0].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_gradient_changes_by_exactly_coef_times_the_lm_gradient(tok):
    cfg = PPOConfig(model="builtin-small", ptx_coef=0.25, ptx_batch_size=6, batch_size=4, **QUIET)
    ptx = build_ptx(cfg, tok)
    model = load_causal_lm("builtin-small", tok, seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (2, 10), generator=generator)
    rl_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def rl_loss(batch, normalizer):  # any differentiable loss of the policy stands in for the PPO loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.float().square().mean() / normalizer, {}

    micros, mixed = with_ptx([rl_batch], rl_loss, ptx, model, update=5, device=torch.device("cpu"))
    assert len(micros) == 1 + 2 and all(PTX_KEY in m for m in micros[1:])  # 6 ptx rows in micro-batches of 4
    both = grads(model, micros, mixed)
    rl_only = grads(model, [rl_batch], rl_loss)
    # the LM loss of update 5's rows: the mean NLL over all their response tokens
    indices, _ = step_rows(len(ptx.rows), 6, cfg.seed + SEED_OFFSET, 5)
    rows = [ptx.rows[i] for i in indices]
    full = ptx.collate(rows)
    tokens = int((full["labels"][:, 1:] != -100).sum())
    assert micros[1][PTX_KEY] == tokens
    lm = grads(model, [full], lambda b, _: sft_loss(model, b, tokens, False, head=LMHead()))
    for name in both:
        torch.testing.assert_close(both[name], rl_only[name] + 0.25 * lm[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(lm[name].abs().sum() > 0 for name in lm)
    # another update reads other rows; the same update the same rows (a resumed run)
    again, _ = with_ptx([rl_batch], rl_loss, ptx, model, update=5, device=torch.device("cpu"))
    other, _ = with_ptx([rl_batch], rl_loss, ptx, model, update=6, device=torch.device("cpu"))
    assert torch.equal(again[1]["input_ids"], micros[1]["input_ids"])
    assert not torch.equal(other[1]["input_ids"][:, :5], micros[1]["input_ids"][:, :5])


def test_no_ptx_leaves_the_update_alone(tok):
    cfg = PPOConfig(model="builtin-small", **QUIET)
    assert build_ptx(cfg, tok) is None
    micros, fn = with_ptx(["batch"], "loss", None, None, 0, None)
    assert micros == ["batch"] and fn == "loss"


def test_errors_are_named(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "Q?", "completion": "A."}\n' * 3)
    cfg = PPOConfig(model="builtin-small", ptx_coef=0.1, ptx_dataset=str(path), ptx_batch_size=8, **QUIET)
    with pytest.raises(UserError, match="ptx_dataset has 3 rows, fewer than ptx_batch_size = 8"):
        build_ptx(cfg, tok)
    with pytest.raises(ValueError, match="ptx_coef must be >= 0"):
        PPOConfig(ptx_coef=-1.0).validate()


PPO_SMALL = dict(model="builtin-small", reward_model="builtin-small", max_new_tokens=8, rollout_batch_size=8,
                 mini_batch_size=4, batch_size=2, logging_steps=2, eval_steps=0, eval_fraction=0.0, lr=1e-3,
                 ptx_coef=0.5, ptx_batch_size=4, **QUIET)  # fmt: skip


def test_ppo_ptx_trains_and_resumes_bitwise(tmp_path):
    def cfg(out):
        return PPOConfig(**PPO_SMALL, output_dir=str(tmp_path / out), max_steps=4, save_steps=2, keep_checkpoints=0)

    final = ppo.train(cfg("straight"))
    assert final["train/ptx/loss"] > 0
    step2 = tmp_path / "straight" / "checkpoints" / "step-00000002"
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    torch.manual_seed(4321)  # the checkpoint's RNG states must win
    ppo.train(cfg("resumed"), resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    without = ppo.train(PPOConfig(**{**PPO_SMALL, "ptx_coef": 0.0}, output_dir=str(tmp_path / "plain"), max_steps=1))
    assert "train/ptx/loss" not in without


def test_grpo_ptx_trains(tmp_path):
    cfg = GRPOConfig(model="builtin-small", max_completion_length=8, prompts_per_step=2, num_generations=4,
                     batch_size=4, logging_steps=1, eval_steps=0, save_steps=0, eval_fraction=0.01, lr=1e-3,
                     max_steps=2, ptx_coef=0.5, ptx_batch_size=4, output_dir=str(tmp_path / "g"), **QUIET)  # fmt: skip
    final = grpo.train(cfg)
    assert final["train/ptx/loss"] > 0
