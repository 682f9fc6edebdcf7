"""SFT and reward-model training on the built-in tiny model: learning, accumulation, LoRA, CLI, exact resume."""

import csv
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from rlhf_cli_helpers import final_weights, finish, kill_then_resume, run_cli  # noqa: E402

from rlhf import reward, sft  # noqa: E402
from rlhf.checkpoint import WEIGHTS_DIR, is_single_model, load_training_checkpoint, save_checkpoint  # noqa: E402
from rlhf.config import RewardConfig, SFTConfig  # noqa: E402
from rlhf.models import load_causal_lm, load_tokenizer  # noqa: E402
from rlhf.train import build_optimizer  # noqa: E402

QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1)


def _rows(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train_losses(path: Path) -> list[float]:
    return [float(r["loss"]) for r in _rows(path) if r["split"] == "train"]


def test_sft_loss_decreases(tmp_path):
    cfg = SFTConfig(
        model="builtin-small",
        output_dir=str(tmp_path),
        max_steps=40,
        batch_size=8,
        lr=3e-3,
        warmup_ratio=0.0,
        logging_steps=5,
        eval_steps=20,
        save_steps=0,
        plots=True,
        **{k: v for k, v in QUIET.items() if k != "plots"},
    )
    final = sft.train(cfg)
    losses = _train_losses(tmp_path)
    assert len(losses) == 8
    assert losses[-1] < 0.6 * losses[0], losses
    evals = [r for r in _rows(tmp_path) if r["split"] == "eval"]
    assert len(evals) == 2 and float(evals[-1]["loss"]) < float(evals[0]["loss"])
    for key in ("train/loss", "train/mean_token_accuracy", "train/entropy", "train/num_tokens", "train/grad_norm"):
        assert key in final, key
    assert "train/learning_rate" in final and final["eval/mean_token_accuracy"] > 0
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "final" / "tokenizer.json").is_file()
    assert (tmp_path / "plots").is_dir() and any((tmp_path / "plots").glob("*.png"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def one_step(batch_size, grad_accum, out):
        cfg = SFTConfig(
            model="builtin-small",
            output_dir=str(tmp_path / out),
            max_steps=1,
            batch_size=batch_size,
            grad_accum=grad_accum,
            eval_fraction=0.0,
            save_steps=1,
            max_grad_norm=0.0,
            **QUIET,
        )
        sft.train(cfg)
        return final_weights(tmp_path / out)

    big, accum = one_step(8, 1, "big"), one_step(2, 4, "accum")
    for name in big:
        torch.testing.assert_close(big[name], accum[name], atol=1e-6, rtol=1e-5, msg=name)


def test_reward_model_learns_preferences(tmp_path):
    cfg = RewardConfig(
        model="builtin-small",
        output_dir=str(tmp_path),
        max_steps=60,
        batch_size=8,
        lr=2e-3,
        warmup_ratio=0.0,
        logging_steps=10,
        eval_steps=0,
        save_steps=0,
        eval_fraction=0.2,
        **QUIET,
    )
    final = reward.train(cfg)
    assert final["eval/accuracy"] > 0.8, final
    for key in ("loss", "accuracy", "margin", "reward/mean", "reward/min", "reward/max"):
        assert f"train/{key}" in final, key
    assert final["train/reward/min"] <= final["train/reward/mean"] <= final["train/reward/max"]
    assert (tmp_path / "final" / "score_head.safetensors").is_file()


def test_reward_center_coef_pulls_rewards_to_zero(tmp_path):
    def mean_abs_reward(center_coef, out):
        cfg = RewardConfig(
            model="builtin-small",
            output_dir=str(tmp_path / out),
            max_steps=30,
            lr=2e-3,
            center_coef=center_coef,
            eval_fraction=0.2,
            eval_steps=0,
            save_steps=0,
            **QUIET,
        )
        return abs(reward.train(cfg)["eval/reward/mean"])

    assert mean_abs_reward(1.0, "centred") < mean_abs_reward(0.0, "free")


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_lora_training_keeps_base_weights(tmp_path, stage):
    pytest.importorskip("peft")
    Config, module = (SFTConfig, sft) if stage == "sft" else (RewardConfig, reward)
    cfg = Config(model="builtin-small", output_dir=str(tmp_path), max_steps=3, lora_r=4, save_steps=0, **QUIET)
    module.train(cfg)
    weights = final_weights(tmp_path)
    lora = [k for k in weights if "lora_" in k]
    assert lora, "no adapter weights in the checkpoint"
    assert any(not torch.all(weights[k] == 0) for k in lora if "lora_B" in k), "lora_B never moved"
    assert (tmp_path / "final" / "config.json").is_file()


def test_cli_short_run(tmp_path):
    finish(run_cli(["rm", "model=builtin-small", "max_steps=2", "eval_steps=0", "tensorboard=false"], tmp_path))
    assert (tmp_path / "final" / "score_head.safetensors").is_file()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.csv").is_file()


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    """SIGKILL a run after its step-4 checkpoint, resume it, compare with an uninterrupted run bit for bit."""
    args = ["sft", "model=builtin-small", "max_steps=24", "save_steps=4", "keep_checkpoints=2", "logging_steps=2"]
    args += ["eval_steps=8", "tensorboard=false", "plots=false", "lr=1e-3"]
    finish(run_cli(args, tmp_path / "straight"))
    killed_dir = tmp_path / "killed"
    kill_then_resume(args, killed_dir, step=4)

    a, b = final_weights(tmp_path / "straight"), final_weights(killed_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # the killed part of the run is not logged twice
    def train_steps(path):
        return [int(r["step"]) for r in _rows(path) if r["split"] == "train"]

    assert train_steps(killed_dir) == train_steps(tmp_path / "straight") == list(range(2, 25, 2))


def test_resume_reads_a_checkpoint_written_before_the_training_core(tmp_path):
    """One-model stages used to save a single-model checkpoint (``model.safetensors``, ``optimizer``/``scheduler``
    in ``trainer_state.pt``, no ``totals``); such a checkpoint still resumes exactly."""
    args = dict(model="builtin-small", max_steps=3, save_steps=1, batch_size=4, keep_checkpoints=0, **QUIET)
    sft.train(SFTConfig(output_dir=str(tmp_path / "straight"), **args))
    legacy = tmp_path / "legacy"
    cfg = SFTConfig(output_dir=str(legacy), **args)
    sft.train(cfg)
    for step in (2, 3):  # keep the step-1 checkpoint only
        shutil.rmtree(legacy / "checkpoints" / f"step-{step:08d}")
    shutil.rmtree(legacy / "final")
    # read the step-1 checkpoint into a model and an optimizer (this restores its RNG states too) ...
    step_dir = legacy / "checkpoints" / "step-00000001"
    model = load_causal_lm("builtin-small", load_tokenizer("builtin-small"), seed=cfg.seed)
    opt = build_optimizer(model, cfg)
    state = load_training_checkpoint(step_dir, {"model": model}, {"model": opt})
    assert state["step"] == 1 and opt.state_dict()["state"], "the optimizer state was not restored"
    # ... and write them back in the old layout in its place
    shutil.rmtree(step_dir)
    old = {
        "step": 1,
        "data_position": state["data_position"],
        "config": state["config"],
        "optimizer": opt.state_dict(),
        "scheduler": state["schedulers"]["model"],
    }
    save_checkpoint(legacy, 1, model, old, keep=0)
    assert is_single_model(step_dir) and not (step_dir / WEIGHTS_DIR).exists()
    sft.train(SFTConfig(output_dir=str(legacy), **args), resume=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(legacy)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
