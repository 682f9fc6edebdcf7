"""PPO on the built-in tiny model: a short run, rollout masking, the EOS penalty, the KL controller and estimators,
the ratio-1 check, the LoRA reference, micro-batch accumulation and kill-and-resume exactness."""

import copy
import csv
import math
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rlhf_cli_helpers import final_weights, finish, kill_then_resume, run_cli  # noqa: E402

from rlhf import ppo  # noqa: E402
from rlhf.checkpoint import read_weights  # noqa: E402
from rlhf.collators import PromptCollator  # noqa: E402
from rlhf.config import PPOConfig  # noqa: E402
from rlhf.generation import response_logprobs, response_mask_from  # noqa: E402
from rlhf.models import LMHead, load_causal_lm, load_tokenizer  # noqa: E402
from rlhf.ppo_core import (  # noqa: E402
    AdaptiveKLController,
    FixedKLController,
    compute_advantages,
    mini_batch_step,
    ppo_update,
    rollout,
    score,
)
from rlhf.train import build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1)
SMALL = dict(model="builtin-small", reward_model="builtin-small", device="cpu", max_new_tokens=8, **QUIET)
METRICS = (
    "objective/kl",
    "objective/entropy",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl_coef",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/num_eos_tokens",
    "response_length",
    "policy/ratio_dev_at_start",
    "learning_rate",
    "grad_norm",
)


def _head(cfg: PPOConfig) -> LMHead:
    return LMHead.from_config(cfg, temperature=cfg.temperature)


def _cfg(**overrides) -> PPOConfig:
    cfg = PPOConfig(**{**SMALL, "rollout_batch_size": 8, "mini_batch_size": 4, "batch_size": 2, **overrides})
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin-small")


def _setup(cfg, tokenizer, n=8):
    """(policy, ref, reward_model, critic, rows): the run's models and its first n prompt rows."""
    rows, _ = ppo.load_prompts(cfg, tokenizer)
    return (*ppo.build_models(cfg, tokenizer, "cpu"), rows[:n])


def _rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg):
    """The rollout batch (with ``scores``) of the first iteration on the prompt ``rows``."""
    collate = PromptCollator(tokenizer.pad_token_id)
    return rollout(policy, ref, critic, reward_model, tokenizer, rows, collate, cfg, _head(cfg), step=0)


def _make_eos_likely(policy, eos_id, scale=0.7):
    """Give the EOS row of the LM head a random direction, so some responses stop early and some do not."""
    head = policy.get_output_embeddings()
    with torch.no_grad():
        head.weight[eos_id] = torch.randn(head.weight.shape[1], generator=torch.Generator().manual_seed(0)) * scale


def _advantaged(batch):
    """``batch`` with the rewards, advantages and returns of its rollout ``scores``."""
    batch["rewards"], batch["advantages"], batch["returns"] = compute_advantages(
        batch["scores"], batch["kl"], batch["values"], batch["response_mask"], kl_coef=0.05, gamma=1.0, lam=0.95,
        whiten=True,
    )  # fmt: skip
    return batch


def test_a_few_iterations_train_policy_and_critic(tmp_path, tokenizer):
    cfg = _cfg(output_dir=str(tmp_path), max_steps=3, logging_steps=1, eval_steps=2, lr=1e-3, eval_fraction=0.05)
    initial = torch.nn.ModuleDict(dict(zip(("policy", "critic"), ppo.build_models(cfg, tokenizer, "cpu")[::3])))
    final = ppo.train(cfg)
    for name in METRICS:
        assert math.isfinite(final[f"train/{name}"]), name
    assert final["train/loss/value_avg"] > 0 and 0 < final["train/response_length"] <= cfg.max_new_tokens
    assert final["train/policy/ratio_dev_at_start"] < 1e-5
    assert {"eval/scores", "eval/response_length", "eval/eos_rate"} <= final.keys()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert [int(r["step"]) for r in rows if r["split"] == "eval"] == [2, 3]
    models = read_weights(tmp_path / "checkpoints" / "step-00000003")
    assert models.keys() == {"policy", "critic"}
    weights = {f"{name}.{key}": value for name, state in models.items() for key, value in state.items()}
    before = initial.state_dict()
    assert weights.keys() == before.keys()
    for part in ("policy", "critic"):
        changed = [k for k in weights if k.startswith(part) and not torch.equal(weights[k], before[k])]
        assert len(changed) > 5, f"{part}: {changed}"
    assert (tmp_path / "final" / "config.json").is_file()
    assert (tmp_path / "final" / "value_model" / "score_head.safetensors").is_file()


def test_rollout_masks_and_pads_after_eos(tokenizer):
    """8 prompts generated in 4 chunks of batch_size=2, padded to the longest prompt and response."""
    cfg = _cfg(max_new_tokens=12, missing_eos_penalty=2.5)
    policy, ref, reward_model, critic, rows = _setup(cfg, tokenizer)
    _make_eos_likely(policy, tokenizer.eos_token_id)
    batch = _advantaged(_rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg))
    P, mask, ended = batch["prompt_length"], batch["response_mask"], batch["ended"]
    lengths = mask.sum(-1)
    assert bool(ended.any()) and not bool(ended.all()), ended  # both kinds of rows are exercised
    assert bool(((lengths > 1) & (lengths < 12) & ended).any()), lengths  # an EOS in the middle of a response
    responses = batch["input_ids"][:, P:]
    for b in range(len(lengths)):
        n = int(lengths[b])
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert tokenizer.eos_token_id not in responses[b, : n - 1].tolist()  # the first EOS ends the mask
        if ended[b]:
            assert responses[b, n - 1] == tokenizer.eos_token_id
            assert (responses[b, n:] == tokenizer.pad_token_id).all()
            assert not batch["attention_mask"][b, P + n :].any()
        else:
            assert n == 12
    prompt_lengths = [len(r["input_ids"]) for r in rows]
    assert batch["prompt_length"] == max(prompt_lengths)  # the 4 chunks are padded to the longest prompt
    assert batch["attention_mask"][:, :P].sum(-1).tolist() == prompt_lengths
    for key in ("logprobs", "ref_logprobs", "entropy", "kl", "values", "rewards", "advantages", "returns"):
        assert (batch[key][~mask] == 0).all(), key
    assert (batch["logprobs"][mask] < 0).all()
    # the rollout log-probs are the policy's own on those tokens; the reference is the initial policy
    torch.testing.assert_close(batch["logprobs"], response_logprobs(_head(cfg), policy, batch), atol=1e-5, rtol=0)
    assert (batch["kl"][mask].abs() > 0).any()  # the EOS row differs between the policy and its reference
    # the reward model's scores, read at the last real token of the padded rows, minus the penalty without EOS
    raw = score(reward_model, batch)
    torch.testing.assert_close(batch["scores"], torch.where(ended, raw, raw - 2.5), atol=1e-5, rtol=0)


def test_missing_eos_penalty_applies_exactly_to_unended_responses(tokenizer):
    cfg = _cfg()
    reward_model = ppo.build_models(cfg, tokenizer, "cpu")[2]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = torch.tensor([[pad, 1, 40, 41], [1, 42, 43, 44], [pad, pad, 1, 45]])
    responses = torch.tensor([[50, 51, eos, 52], [60, 61, 62, 63], [eos, 70, 71, 72]])
    mask, ended = response_mask_from(responses, eos)
    batch = {
        "input_ids": torch.cat([prompts, responses.masked_fill(~mask, pad)], 1),
        "attention_mask": torch.cat([(prompts != pad).long(), mask.long()], 1),
        "response_mask": mask,
        "ended": ended,
        "prompt_length": 4,
    }
    assert ended.tolist() == [True, False, True]
    raw = score(reward_model, batch)
    penalised = score(reward_model, batch, missing_eos_penalty=2.5, batch_size=2)
    assert torch.equal(penalised[ended], raw[ended])
    assert torch.equal(penalised[~ended], raw[~ended] - 2.5)
    # the score is read at the last real token: the EOS of row 0, the last sampled token of row 1
    direct = reward_model(batch["input_ids"][:1, :7], batch["attention_mask"][:1, :7])
    torch.testing.assert_close(raw[:1], direct, atol=1e-6, rtol=0)


def test_adaptive_kl_controller_on_hand_made_numbers():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 64)  # error = clip(9/6 - 1 = 0.5) = 0.2; x (1 + 0.2 * 64 / 10000) = 1.00128
    assert ctl.value == pytest.approx(0.2 * 1.00128, rel=1e-12)
    ctl.update(5.4, 100)  # error = 5.4/6 - 1 = -0.1; x (1 - 0.1 * 100 / 10000) = 0.999
    assert ctl.value == pytest.approx(0.2 * 1.00128 * 0.999, rel=1e-12)
    ctl.update(0.0, 1000)  # error clipped to -0.2: x (1 - 0.2 * 1000 / 10000) = 0.98
    assert ctl.value == pytest.approx(0.2 * 1.00128 * 0.999 * 0.98, rel=1e-12)
    restored = AdaptiveKLController(1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


def test_ratio_check_is_zero_normally_and_warns_on_stale_logprobs(tokenizer):
    cfg = _cfg(ppo_epochs=1, lr=1e-3)
    policy, ref, reward_model, critic, rows = _setup(cfg, tokenizer)
    batch = _advantaged(_rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg))

    def update(old_logprobs):
        p, c = copy.deepcopy(policy), copy.deepcopy(critic)
        optimizers = {"policy": build_optimizer(p, cfg), "critic": build_optimizer(c, cfg)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models = {"policy": p, "critic": c}
            stats = ppo_update(models, optimizers, {**batch, "logprobs": old_logprobs}, cfg, _head(cfg), seed=0)
        return stats, [w for w in caught if "ratio check" in str(w.message)]

    stats, caught = update(batch["logprobs"])
    assert stats["policy/ratio_dev_at_start"] < 1e-5 and not caught
    stale = batch["logprobs"] + 0.01 * batch["response_mask"]
    stats, caught = update(stale)
    assert stats["policy/ratio_dev_at_start"] == pytest.approx(0.01, abs=1e-4) and len(caught) == 1


def test_micro_batches_add_up_to_the_mini_batch(tokenizer):
    """One update on 4 sequences is the same whether it runs as 1 micro-batch of 4 or 4 of 1 (token-mean and
    seq-mean weights). Plain SGD with lr 1, so the weight change is the gradient (Adam's first step is its sign)."""
    for agg in ("token-mean", "seq-mean-token-mean"):
        cfg = _cfg(mini_batch_size=4, agg=agg)
        policy, ref, reward_model, critic, rows = _setup(cfg, tokenizer, n=4)
        _make_eos_likely(policy, tokenizer.eos_token_id)  # responses of different lengths
        batch = _advantaged(_rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg))
        results = []
        for micro in (4, 1):
            p, c = copy.deepcopy(policy), copy.deepcopy(critic)
            optimizers = {
                "policy": torch.optim.SGD(p.parameters(), lr=1.0),
                "critic": torch.optim.SGD(c.parameters(), lr=1.0),
            }
            micro_cfg = _cfg(batch_size=micro, agg=agg, max_grad_norm=0.0)
            stats = mini_batch_step({"policy": p, "critic": c}, optimizers, batch, micro_cfg, _head(cfg))
            before = {**policy.state_dict(), **critic.state_dict()}
            results.append((stats, {k: v - before[k] for k, v in {**p.state_dict(), **c.state_dict()}.items()}))
        (s_big, big), (s_small, small) = results
        assert s_big["loss/policy"] == pytest.approx(s_small["loss/policy"], abs=1e-6), agg
        assert s_big["loss/value"] == pytest.approx(s_small["loss/value"], rel=1e-5), agg
        assert s_big["grad_norm"] == pytest.approx(s_small["grad_norm"], rel=1e-5), agg
        for name in big:  # the weight changes (= the gradients) agree to fp32 rounding (of the weights too)
            tol = 1e-5 * big[name].abs().max().item() + 4e-7 * before[name].abs().max().item()
            assert (big[name] - small[name]).abs().max().item() <= tol, f"{agg} {name}"


def test_lora_reference_is_the_adapter_disabled_base(tmp_path, tokenizer):
    pytest.importorskip("peft")
    cfg = _cfg(lora_r=4, output_dir=str(tmp_path), max_steps=2, eval_fraction=0.0, lr=1e-2)
    policy, ref, reward_model, critic, rows = _setup(cfg, tokenizer)
    assert ref is None and hasattr(policy, "disable_adapter")
    assert not any(p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)
    with torch.no_grad():  # move the adapters away from their zero start, so the policy differs from its base
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    batch = _rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg)
    base = load_causal_lm("builtin-small", tokenizer, seed=cfg.seed)  # the initial policy, never wrapped
    torch.testing.assert_close(batch["ref_logprobs"], response_logprobs(_head(cfg), base, batch), atol=1e-5, rtol=0)
    mask = batch["response_mask"]
    assert (batch["logprobs"] - batch["ref_logprobs"])[mask].abs().max() > 1e-2
    assert torch.equal(batch["kl"], (batch["logprobs"] - batch["ref_logprobs"]) * mask)
    # a short LoRA run trains the adapters of the policy and of the critic (and its head), nothing else
    ppo.train(cfg)
    weights = read_weights(tmp_path / "checkpoints" / "step-00000002")
    initial = dict(zip(("policy", "critic"), ppo.build_models(cfg, tokenizer, "cpu")[::3]))
    assert weights.keys() == initial.keys()
    moved = set()
    for part, state in weights.items():
        assert state.keys() == initial[part].state_dict().keys(), part
        for key, value in state.items():
            if not torch.equal(value, initial[part].state_dict()[key]):
                moved.add(f"{part}.{key}")
    frozen = [n for n in moved if "lora_" not in n and not n.startswith("critic.score.")]
    assert not frozen, frozen
    for prefix in ("policy.", "critic.backbone."):
        assert any(n.startswith(prefix) and "lora_B" in n for n in moved), prefix
    assert "critic.score.weight" in moved
    assert (tmp_path / "final" / "config.json").is_file()


def test_exact_kl_matches_full_logits_and_trains(tmp_path, tokenizer):
    cfg = _cfg(kl_estimator="exact", temperature=0.7)
    policy, ref, reward_model, critic, rows = _setup(cfg, tokenizer)
    batch = _rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg)
    assert torch.equal(batch["kl"], torch.zeros_like(batch["kl"]))  # the policy is still its reference: exactly 0
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    batch = _rollout(policy, ref, critic, reward_model, tokenizer, rows, cfg)
    P, mask = batch["prompt_length"], batch["response_mask"]
    with torch.no_grad():
        logits = [
            m(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, P - 1 : -1] for m in (policy, ref)
        ]
    logp, logq = (F.log_softmax(x.double() / cfg.temperature, -1) for x in logits)
    expected = (logp.exp() * (logp - logq)).sum(-1) * mask
    torch.testing.assert_close(batch["kl"].double(), expected, atol=1e-5, rtol=1e-4)
    assert (batch["kl"][mask] > 0).all()
    final = ppo.train(_cfg(kl_estimator="exact", output_dir=str(tmp_path), max_steps=2, eval_fraction=0.0))
    assert math.isfinite(final["train/objective/kl"]) and final["train/objective/kl"] >= 0


def _train_rows(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    """SIGKILL a PPO run after its step-2 checkpoint, resume it, compare with an uninterrupted run bit for bit."""
    args = ["ppo", "model=builtin-small", "reward_model=builtin-small", "max_steps=6", "save_steps=2"]
    args += ["logging_steps=2", "eval_steps=4", "rollout_batch_size=4", "mini_batch_size=2", "batch_size=1"]
    args += ["ppo_epochs=2", "max_new_tokens=8", "adaptive_kl=true", "kl_horizon=50", "missing_eos_penalty=1.0"]
    args += ["lr=1e-3", "tensorboard=false", "plots=false", "device=cpu"]
    straight = run_cli(args, tmp_path / "straight")  # runs alongside the killed one
    killed_dir = tmp_path / "killed"
    kill_then_resume(args, killed_dir, step=2)
    finish(straight)

    a, b = final_weights(tmp_path / "straight"), final_weights(killed_dir)
    assert a.keys() == b.keys() and any(k.startswith("critic.") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the same samples, scores and KL coefficients, logged once per step
    rows_a, rows_b = _train_rows(tmp_path / "straight"), _train_rows(killed_dir)
    assert [int(r["step"]) for r in rows_a] == [int(r["step"]) for r in rows_b] == list(range(2, 7, 2))
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "seconds_per_step"} == {
            k: v for k, v in rb.items() if k != "seconds_per_step"
        }
    assert float(rows_a[-1]["objective/kl_coef"]) != 0.05  # the adaptive controller moved (and was restored)
