"""`rlhf grpo` on the built-in tiny model: every recipe for a few steps, the advantages and dynamic sampling of a
hand-made reward, beta = 0 without a reference, user reward functions and their errors, rollout correction, the
sampler's log-probs, and kill-and-resume exactness."""

import csv
import math
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import torch  # noqa: E402
from rlhf_cli_helpers import final_weights, finish, kill_then_resume, run_cli  # noqa: E402

from rlhf import grpo  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.grpo_core import RECIPES, GRPOConfig, advantages, resolve_recipe  # noqa: E402
from rlhf.models import load_tokenizer  # noqa: E402

# the tests that replace the update by a recorder step the schedule without an optimizer step
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1, device="cpu")
SMALL = dict(model="builtin-small", max_completion_length=8, prompts_per_step=2, num_generations=4, batch_size=4,
             logging_steps=1, eval_steps=0, save_steps=0, eval_fraction=0.01, lr=1e-3, **QUIET)  # fmt: skip
METRICS = (
    "reward", "reward_std", "rewards/gold/mean", "frac_reward_zero_std", "completions/mean_length",
    "completions/clipped_ratio", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    "num_tokens", "loss", "grad_norm", "rollout/logprob_diff_max", "rollout/logprob_diff_mean",
)  # fmt: skip


def _cfg(tmp_path, **kw):
    cfg = GRPOConfig(**{**SMALL, "output_dir": str(tmp_path), **kw})
    cfg.validate()
    return cfg


def _train_rows(path: Path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A user reward module on sys.path: ``length`` (the completion's length in characters, so groups differ),
    ``flat_for_sums`` (1.0 for the prompts of the addition task, else the length), ``broken`` (raises on every row),
    ``short`` (one value too few), ``text`` (a string value)."""
    source = textwrap.dedent(
        """
        def length(prompts, completions, **columns):
            return [float(len(c)) for c in completions]

        def flat_for_sums(prompts, completions, **columns):
            return [1.0 if "plus" in p or "add" in p.lower() else float(len(c)) for p, c in zip(prompts, completions)]

        def broken(prompts, completions, **columns):
            return [float(len(c)) / 0 for c in completions]

        def short(prompts, completions, **columns):
            return [0.0] * (len(completions) - 1)

        def text(prompts, completions, **columns):
            return ["good"] * len(completions)
        """
    )
    (tmp_path / "user_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_rewards", None)
    return "user_rewards"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_trains(tmp_path, recipe, reward_module):
    cfg = _cfg(tmp_path, recipe=recipe, max_steps=2, reward_funcs=f"gold,{reward_module}:length",
               reward_weights="1.0,0.01")  # fmt: skip
    before = grpo.build_models(resolve_recipe(cfg), grpo.load_tokenizer("builtin-small"), torch.device("cpu"))[0]
    before = {k: v.clone() for k, v in before.state_dict().items()}
    final = grpo.train(cfg)
    rows = _train_rows(tmp_path)
    assert len(rows) == 2
    for key in METRICS + ("rewards/user_rewards:length/mean",):
        assert key in rows[-1] and math.isfinite(float(rows[-1][key])), key
    assert math.isfinite(final["train/loss"]) and "eval/reward" in final
    after = final_weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    if resolve_recipe(cfg).beta > 0:
        assert "kl" in rows[-1]


def _captured(monkeypatch):
    """Replaces the update by a recorder of the batches it receives."""
    seen = []

    def update(models, optimizers, batch, cfg, head, **_):
        seen.append(batch)
        return {}

    monkeypatch.setattr(grpo, "grpo_update", update)
    return seen


def test_advantages_of_the_trainer_batch(tmp_path, reward_module, monkeypatch):
    seen = _captured(monkeypatch)
    grpo.train(_cfg(tmp_path, max_steps=1, reward_funcs=f"{reward_module}:length", advantage="grpo",
                    scale_rewards="group"))  # fmt: skip
    batch = seen[0]
    G = 4
    assert batch["group"].tolist() == [0] * G + [1] * G
    # the rewards are the completions' lengths in characters; each group's advantages by hand
    for g in range(2):
        r = batch["rewards"][g * G : (g + 1) * G].double()
        want = (r - r.mean()) / (r.std() + 1e-4) if r.std() > 0 else torch.zeros(G, dtype=torch.float64)
        torch.testing.assert_close(batch["advantages"][g * G : (g + 1) * G].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["advantages"], advantages(batch["rewards"], batch["group"]))


def test_dynamic_sampling_drops_exactly_the_flat_groups(tmp_path, reward_module):
    cfg = _cfg(tmp_path, max_steps=1, reward_funcs=f"{reward_module}:flat_for_sums", dynamic_sampling=True,
               max_resample_rounds=0, prompts_per_step=8, num_generations=2, temperature=1.5)  # fmt: skip
    tokenizer = grpo.load_tokenizer("builtin-small")
    rows = grpo.load_prompts(resolve_recipe(cfg), tokenizer)[0]
    policy, _ = grpo.build_models(resolve_recipe(cfg), tokenizer, torch.device("cpu"))
    functions = grpo.build_reward_functions(cfg.reward_funcs, None, None)
    sums = [("plus" in r["prompt"] or "add" in r["prompt"].lower()) for r in rows]
    chosen = [r for r, s in zip(rows, sums) if s][:3] + [r for r, s in zip(rows, sums) if not s][:5]
    batch, stats = grpo.sample_step(policy, tokenizer, chosen, resolve_recipe(cfg), functions, rows, step=0, first=0)
    # the three addition groups are flat (reward 1.0 for every sample); the others are flat only by chance (all
    # samples of the same length)
    lengths = [len(t) for t in tokenizer.batch_decode(batch["input_ids"][:, batch["prompt_length"] :])]
    assert len(lengths) == 16 and stats["dynamic_sampling/dropped_groups"] >= 3
    kept = [i for i in range(8) if batch["rewards"][2 * i] != batch["rewards"][2 * i + 1]]
    assert len(kept) == 8 - stats["dynamic_sampling/filled_with_flat"]
    # the kept groups come first, in order, and carry non-flat rewards; fillers (all flat) after them
    assert all(batch["rewards"][2 * i] != batch["rewards"][2 * i + 1] for i in range(len(kept)))
    assert stats["frac_reward_zero_std"] == pytest.approx(stats["dynamic_sampling/dropped_groups"] / 8)


def test_beta_zero_loads_no_reference(tmp_path, monkeypatch):
    calls = []
    real = grpo.frozen  # every reference model is made by frozen()
    monkeypatch.setattr(grpo, "frozen", lambda model: calls.append(model) or real(model))
    cfg = resolve_recipe(_cfg(tmp_path, recipe="dapo"))
    assert cfg.beta == 0
    policy, ref = grpo.build_models(cfg, grpo.load_tokenizer("builtin-small"), torch.device("cpu"))
    assert ref is False and not calls
    seen = _captured(monkeypatch)
    grpo.train(_cfg(tmp_path, recipe="dapo", max_steps=1))
    assert "ref_logprobs" not in seen[0]
    _, ref = grpo.build_models(resolve_recipe(_cfg(tmp_path, beta=0.1)), grpo.load_tokenizer("builtin-small"),
                               torch.device("cpu"))  # fmt: skip
    assert ref is not False and calls


@pytest.mark.parametrize(
    "name,message",
    [
        ("broken", r"reward function 'user_rewards:broken' raised ZeroDivisionError: float division by zero at row 0"),
        ("short", r"returned 7 values for 8 completions"),
        ("text", r"row 0 is 'good', not a number or None"),
        ("missing", r"module 'user_rewards' has no function 'missing'"),
    ],
)
def test_user_reward_function_errors(tmp_path, reward_module, name, message):
    with pytest.raises(UserError, match=message):
        grpo.train(_cfg(tmp_path, max_steps=1, reward_funcs=f"{reward_module}:{name}"))


def test_unknown_reward_spec(tmp_path):
    with pytest.raises(UserError, match="neither 'gold', an existing reward model directory, nor module:function"):
        grpo.train(_cfg(tmp_path, max_steps=1, reward_funcs="gold,nonsense"))


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_rollout_correction_through_the_trainer(tmp_path, mode, monkeypatch):
    """Top-k sampling truncates the sampler's distribution: its log-probs differ from the trainer's by the log of
    the kept mass, and the correction weights arrive in the loss."""
    seen = _captured(monkeypatch)
    grpo.train(_cfg(tmp_path, max_steps=1, top_k=5, rollout_correction=mode, rollout_correction_cap=1.5))
    batch = seen[0]
    mask = batch["response_mask"]
    diff = (batch["logprobs"] - batch["sampler_logprobs"])[mask]
    assert (diff < 0).all()  # log pi_old - log pi_sampler = log of the kept mass < 0 under top-k
    w = batch["is_weights"]
    assert w.shape == mask.shape and (w[~mask] == 0).all()
    if mode == "token_truncate":
        torch.testing.assert_close(w[mask], diff.exp().clamp(max=1.5))


def test_sampler_logprobs_match_without_truncation(tmp_path, monkeypatch):
    """Without top-k / top-p the sampler's log-probs are the trainer's up to the rounding of two forward paths
    (the generation's cached decoding against one full forward), in fp32 below 1e-5."""
    seen = _captured(monkeypatch)
    grpo.train(_cfg(tmp_path, max_steps=1, temperature=0.7, old_logprobs="recompute"))
    batch = seen[0]
    mask = batch["response_mask"]
    assert (batch["logprobs"] - batch["sampler_logprobs"])[mask].abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_are_the_trainers_bitwise_with_batch_invariant_attention(tmp_path, monkeypatch, temperature):
    """batch_invariant=true: the sampler (cached decoding, one query per step) and the trainer (one forward over
    the whole batch, fused head) compute the same log-prob for every sampled token, bit for bit: the mismatch is
    exactly 0 and so are its statistics."""
    seen = _captured(monkeypatch)
    grpo.train(_cfg(tmp_path, max_steps=1, temperature=temperature, batch_invariant=True, old_logprobs="recompute"))
    batch = seen[0]
    mask = batch["response_mask"]
    assert mask.sum() > 20 and batch["prompt_length"] > 0
    assert torch.equal(batch["logprobs"][mask], batch["sampler_logprobs"][mask])
    row = _train_rows(tmp_path)[0]
    assert float(row["rollout/logprob_diff_max"]) == 0.0 and float(row["rollout/logprob_diff_mean"]) == 0.0


def test_on_policy_update_reuses_the_sampler_logprobs(tmp_path, monkeypatch):
    """One on-policy optimizer step (the defaults): no old-log-prob pass, the sampler's log-probs are the old ones,
    and the entropy metric comes from the update."""
    calls = []
    original = grpo.response_logprobs
    monkeypatch.setattr(grpo, "response_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    seen = []
    update = grpo.grpo_update
    monkeypatch.setattr(
        grpo, "grpo_update", lambda m, o, batch, *a, **k: seen.append(batch) or update(m, o, batch, *a, **k)
    )
    grpo.train(_cfg(tmp_path, max_steps=1, beta=0.0))  # no reference either: no log-prob pass at all
    assert calls == [] and torch.equal(seen[0]["logprobs"], seen[0]["sampler_logprobs"])
    row = _train_rows(tmp_path)[0]
    assert 0 < float(row["entropy"]) < math.log(len(load_tokenizer("builtin")))


def test_reusing_the_sampler_logprobs_changes_nothing_under_batch_invariance(tmp_path):
    """With batch-invariant attention the recomputed old log-probs are the sampler's bit for bit, so skipping
    their pass gives the same weights; the entropy metric agrees up to the two kernels' rounding."""
    runs = {}
    for mode in ("recompute", "sampler"):
        out = tmp_path / mode
        grpo.train(_cfg(out, max_steps=2, batch_invariant=True, old_logprobs=mode, save_steps=2))
        runs[mode] = (final_weights(out), _train_rows(out))
    (wa, ra), (wb, rb) = runs["recompute"], runs["sampler"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for a, b in zip(ra, rb, strict=True):
        assert float(a["loss"]) == float(b["loss"]) and float(a["reward"]) == float(b["reward"])
        assert float(a["entropy"]) == pytest.approx(float(b["entropy"]), rel=1e-5)


@pytest.mark.parametrize(
    ("options", "reuses"),
    [
        ({}, True),
        ({"num_iterations": 2}, False),
        ({"mini_batch_size": 4}, False),
        ({"mini_batch_size": 8}, True),
        ({"top_k": 5}, False),
        ({"top_p": 0.9}, False),
        ({"rollout_correction": "token_mask"}, False),
        ({"old_logprobs": "recompute"}, False),
        ({"old_logprobs": "sampler", "num_iterations": 2}, True),
    ],
)
def test_when_the_sampler_logprobs_are_reused(tmp_path, options, reuses):
    from rlhf.grpo_core import reuses_sampler_logprobs

    assert reuses_sampler_logprobs(_cfg(tmp_path, **options)) is reuses


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 5}, "old_logprobs=sampler needs untruncated sampling"),
        ({"rollout_correction": "token_mask"}, "old_logprobs=sampler with a rollout_correction"),
    ],
)
def test_sampler_logprobs_refused_where_they_are_not_the_old_ones(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, old_logprobs="sampler", **options)


def test_kill_and_resume_is_bitwise_exact(tmp_path):
    args = ["grpo", "model=builtin-small", "max_steps=4", "save_steps=2", "logging_steps=1", "eval_steps=0"]
    args += ["prompts_per_step=2", "num_generations=3", "batch_size=3", "max_completion_length=6", "lr=1e-3"]
    args += ["recipe=dapo", "mini_batch_size=2", "num_iterations=2", "tensorboard=false", "plots=false"]
    args += ["device=cpu", "eval_fraction=0.01"]
    straight = run_cli(args, tmp_path / "straight")
    killed = tmp_path / "killed"
    kill_then_resume(args, killed, step=2)
    finish(straight)
    a, b = final_weights(tmp_path / "straight"), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = _train_rows(tmp_path / "straight"), _train_rows(killed)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == ["1", "2", "3", "4"]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "seconds_per_step"} == {
            k: v for k, v in rb.items() if k != "seconds_per_step"
        }
