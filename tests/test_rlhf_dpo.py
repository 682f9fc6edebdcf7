"""DPO on the built-in tiny model: learning and metrics, the loss against full logits, the three reference paths,
kill-and-resume exactness."""

import csv
import math
import shutil
import types
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from rlhf_cli_helpers import final_weights, kill_then_resume  # noqa: E402

import rlhf_kernels  # noqa: E402
from rlhf import dpo  # noqa: E402
from rlhf.config import DPOConfig, load_config  # noqa: E402
from rlhf.models import IGNORE_INDEX, LMHead, load_causal_lm, load_tokenizer, position_ids_from_mask  # noqa: E402
from rlhf.sft import build_policy  # noqa: E402
from rlhf.train import autocast_context, load_splits  # noqa: E402

HEAD = LMHead()

QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
METRICS += ("logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def rows(tokenizer):
    return load_splits(DPOConfig(model="builtin-small", eval_fraction=0.0), tokenizer, "preference")[0]


def _csv(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_dpo_learns_and_logs_every_metric(tmp_path, tokenizer):
    cfg = DPOConfig(
        model="builtin-small",
        output_dir=str(tmp_path),
        max_steps=30,
        lr=2e-4,
        warmup_ratio=0.0,
        logging_steps=1,
        eval_steps=15,
        save_steps=0,
        **QUIET,
    )
    final = dpo.train(cfg)
    for split in ("train", "eval"):
        for name in METRICS:
            assert math.isfinite(final[f"{split}/{name}"]), (split, name)
    train = [r for r in _csv(tmp_path) if r["split"] == "train"]
    assert len(train) == 30
    # Step 1 scores the initial policy, which is the reference: rewards 0 up to fp32 rounding, loss log 2.
    assert abs(float(train[0]["rewards/margins"])) < 1e-4 and abs(float(train[0]["rewards/chosen"])) < 1e-4
    assert float(train[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)
    last = train[-10:]
    assert sum(float(r["rewards/accuracies"]) for r in last) / len(last) > 0.9
    assert all(float(r["rewards/margins"]) > 0.2 for r in last) and float(train[-1]["loss"]) < 0.55
    assert final["eval/rewards/accuracies"] > 0.9 and final["eval/loss"] < 0.55
    assert final["eval/rewards/chosen"] > final["eval/rewards/rejected"]
    initial = build_policy(cfg, tokenizer, "cpu").state_dict()
    weights = final_weights(tmp_path)
    assert weights.keys() == initial.keys()
    assert all(not torch.equal(weights[k], initial[k]) for k in weights if k.endswith("q_proj.weight"))
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "final" / "tokenizer.json").is_file()


def _full_logits_logps(model, batch, average):
    """Oracle: sequence log-probs (2B,) from the full logits of the plain forward."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
    ).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    token = logits.float().log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    total = (token * keep).sum(-1)
    return total / keep.sum(-1) if average else total


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="sigmoid"),
        dict(loss_type="robust", label_smoothing=0.2),
        dict(loss_type="hinge", beta=0.5),
        dict(loss_type="ipo"),
        dict(loss_type="apo_zero"),
        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
        dict(loss_type="sigmoid", average_log_prob=True),
    ],
)
def test_loss_and_gradient_match_full_logits(tokenizer, rows, options):
    cfg = DPOConfig(model="builtin-small", **options)
    policy = load_causal_lm("builtin-small", tokenizer, seed=1)
    ref = load_causal_lm("builtin-small", tokenizer, seed=2)
    batch = dpo.DPOCollator(tokenizer.pad_token_id)(rows[:4])
    average = dpo.uses_average(cfg)
    rc, rr = dpo.reference_logps(ref, batch, average=average, head=HEAD)
    loss, stats = dpo.dpo_loss(policy, batch, 8, rc, rr, options=dpo.loss_options(cfg), head=HEAD)
    (loss * 2).backward()  # 4 pairs of a step of 8: loss * 2 is this batch's mean
    grad = policy.lm_head.weight.grad.clone()
    policy.zero_grad()

    seq = _full_logits_logps(policy, batch, average)
    ref_seq = _full_logits_logps(ref, batch, average).detach()
    torch.testing.assert_close(torch.cat([rc, rr]), ref_seq, rtol=1e-5, atol=1e-4)
    kw = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma)
    want, want_stats = rlhf_kernels.dpo_loss(seq[:4], seq[4:], rc, rr, **kw)
    want.backward()
    torch.testing.assert_close(loss * 2, want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, policy.lm_head.weight.grad, rtol=1e-3, atol=1e-6)
    assert stats["num_pairs"] == 4 and stats["loss"] == loss.detach()
    for name, value in want_stats.items():
        torch.testing.assert_close(stats[name] * 2, value, rtol=1e-4, atol=1e-4, msg=name)


def test_precomputed_reference_equals_live(tokenizer, rows):
    cfg = DPOConfig(model="builtin-small", eval_batch_size=16)
    policy = build_policy(cfg, tokenizer, "cpu")
    ref, context = dpo.build_reference(cfg, policy, tokenizer, "cpu")
    assert ref is not policy and context is None and not any(p.requires_grad for p in ref.parameters())
    collate = dpo.DPOCollator(tokenizer.pad_token_id)
    autocast = autocast_context(cfg, torch.device("cpu"))
    stored = dpo.precompute_reference(rows[:40], ref, collate, cfg, autocast, head=HEAD)
    assert [r["chosen_input_ids"] for r in stored] == [r["chosen_input_ids"] for r in rows[:40]]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    for i in range(0, 40, 5):  # other batch compositions (and paddings) than the precomputing pass
        batch = collate([stored[j] for j in order[i : i + 5]])
        live = dpo.reference_logps(ref, batch, average=False, head=HEAD)
        torch.testing.assert_close(live[0], batch["ref_chosen_logps"], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(live[1], batch["ref_rejected_logps"], rtol=1e-6, atol=1e-5)
        assert dpo.batch_reference(batch, None, None, cfg, HEAD)[0] is batch["ref_chosen_logps"]


def test_ref_model_path_is_loaded_frozen(tmp_path, tokenizer, rows):
    other = load_causal_lm("builtin-small", tokenizer, seed=3)
    other.save_pretrained(tmp_path / "ref")
    cfg = DPOConfig(model="builtin-small", ref_model=str(tmp_path / "ref"), lora_r=4)
    policy = load_causal_lm("builtin-small", tokenizer)
    ref, context = dpo.build_reference(cfg, policy, tokenizer, "cpu")
    assert context is None and not ref.training and not any(p.requires_grad for p in ref.parameters())
    batch = dpo.DPOCollator(tokenizer.pad_token_id)(rows[:4])
    pairs = [dpo.reference_logps(m, batch, average=True, head=HEAD) for m in (ref, other)]
    for a, b in zip(*pairs):
        assert torch.equal(a, b)
    simpo = DPOConfig(model="builtin-small", ref_model=str(tmp_path / "ref"), loss_type="simpo")
    assert dpo.build_reference(simpo, policy, tokenizer, "cpu") == (None, None)


def test_options_the_loss_type_ignores_are_rejected_before_loading(tmp_path):
    for bad in (dict(loss_type="hinge", label_smoothing=0.1), dict(loss_type="sigmoid", simpo_gamma=1.0)):
        with pytest.raises(ValueError, match="applies to"):
            dpo.train(DPOConfig(model="does/not-exist", output_dir=str(tmp_path), **bad))
    assert not any(tmp_path.iterdir())


def test_precomputed_run_keeps_no_reference_and_matches_live(tmp_path, monkeypatch):
    def run(out, **kw):
        cfg = DPOConfig(model="builtin-small", output_dir=str(tmp_path / out), max_steps=4, lr=2e-4, **kw, **QUIET)
        dpo.train(cfg)
        return [r for r in _csv(tmp_path / out) if r["step"] == "4"]

    live = run("live", logging_steps=4, eval_steps=0)
    no_copy = types.SimpleNamespace(deepcopy=lambda *a: pytest.fail("precompute_ref_logps copied the policy"))
    monkeypatch.setattr(dpo, "copy", no_copy)
    pre = run("pre", logging_steps=4, eval_steps=0, precompute_ref_logps=True)
    assert [r["split"] for r in pre] == [r["split"] for r in live] == ["train", "eval"]
    for a, b in zip(live, pre, strict=True):
        for name in METRICS:
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-4, abs=1e-5), (a["split"], name)


def test_lora_reference_is_the_adapter_disabled_base(tmp_path, tokenizer, rows):
    pytest.importorskip("peft")
    cfg = DPOConfig(model="builtin-small", lora_r=4)
    policy = build_policy(cfg, tokenizer, "cpu")
    with torch.no_grad():  # a trained-looking adapter, so the adapted policy differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ref, context = dpo.build_reference(cfg, policy, tokenizer, "cpu")
    assert ref is policy and context is not None
    batch = dpo.DPOCollator(tokenizer.pad_token_id)(rows[:6])
    base = load_causal_lm("builtin-small", tokenizer, seed=cfg.seed)
    disabled = dpo.reference_logps(policy, batch, average=False, head=HEAD, context=context)
    plain = dpo.reference_logps(base, batch, average=False, head=HEAD)
    for a, b in zip(disabled, plain, strict=True):
        assert torch.equal(a, b)
    adapted = dpo.reference_logps(policy, batch, average=False, head=HEAD)
    assert (adapted[0] - plain[0]).abs().max() > 1e-2
    assert policy.training and any(p.requires_grad for p in policy.parameters())

    run_cfg = DPOConfig(
        model="builtin-small", output_dir=str(tmp_path), lora_r=4, lr=1e-3, max_steps=3, eval_steps=0, **QUIET
    )
    final = dpo.train(run_cfg)
    assert all(math.isfinite(final[f"train/{name}"]) for name in METRICS)
    weights = final_weights(tmp_path)
    assert any(not torch.all(weights[k] == 0) for k in weights if "lora_B" in k), "lora_B never moved"


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    """SIGKILL a CLI run after its step-4 checkpoint, resume it with the CLI, compare with an uninterrupted run (in
    this process, one thread like the CLI's) bit for bit."""
    args = ["model=builtin-small", "max_steps=12", "save_steps=4", "keep_checkpoints=2", "logging_steps=2"]
    args += ["eval_steps=6", "tensorboard=false", "plots=false", "lr=1e-3"]
    straight = [*args, f"output_dir={tmp_path / 'straight'}", "progress=false", "num_threads=1"]
    dpo.train(load_config(DPOConfig, None, straight))

    killed_dir = tmp_path / "killed"
    kill_then_resume(["dpo", *args], killed_dir, step=4)
    _assert_same_run(tmp_path / "straight", killed_dir, list(range(2, 13, 2)))


def _assert_same_run(a_dir: Path, b_dir: Path, train_steps: list[int]):
    """Final checkpoints equal bit for bit; b logged each train step once; the final eval metrics equal."""
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a, rows_b = _csv(a_dir), _csv(b_dir)
    assert [int(r["step"]) for r in rows_b if r["split"] == "train"] == train_steps
    assert rows_a[-1]["split"] == rows_b[-1]["split"] == "eval"
    assert all(rows_a[-1][name] == rows_b[-1][name] for name in METRICS), (rows_a[-1], rows_b[-1])


@pytest.mark.parametrize("reference", ["precomputed", "lora"])
def test_resume_from_checkpoint_is_bitwise_exact(tmp_path, reference):
    """The other reference paths, resumed in-process from a copy of an uninterrupted run's step-4 checkpoint."""
    if reference == "lora":
        pytest.importorskip("peft")
    extra = dict(precompute_ref_logps=True) if reference == "precomputed" else dict(lora_r=4)

    def cfg(out):
        return DPOConfig(
            model="builtin-small",
            output_dir=str(tmp_path / out),
            max_steps=8,
            save_steps=4,
            keep_checkpoints=0,
            logging_steps=4,
            eval_steps=4,
            lr=1e-3,
            **extra,
            **QUIET,
        )

    dpo.train(cfg("straight"))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    step4 = tmp_path / "straight" / "checkpoints" / "step-00000004"
    shutil.copytree(step4, tmp_path / "resumed" / "checkpoints" / step4.name)
    torch.manual_seed(1234)  # the checkpoint's RNG states must win
    dpo.train(cfg("resumed"), resume=True)
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed", [8])
