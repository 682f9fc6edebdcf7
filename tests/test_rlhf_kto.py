"""`rlhf kto`: unpaired data and preference pairs split in two, the mismatched pairs, the step's reference point z
(one value per step, whatever the micro-batching), the loss of a micro-batch against rlhf_kernels.kto_loss on
plainly computed log-probs, training on the built-in data, precomputed = live reference, exact resume, errors."""

import contextlib
import csv
import json
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
from rlhf_cli_helpers import final_weights  # noqa: E402

import rlhf_kernels  # noqa: E402
from rlhf import kto  # noqa: E402
from rlhf.config import KTOConfig  # noqa: E402
from rlhf.data import detect_format, prepare  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.kto_data import KTOCollator, add_mismatched  # noqa: E402
from rlhf.models import IGNORE_INDEX, LMHead, load_causal_lm, load_tokenizer  # noqa: E402

QUIET = dict(progress=False, plots=False, tensorboard=False, num_threads=1)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


def test_unpaired_rows_and_split_pairs(tok):
    unpaired = [
        {"prompt": "Q1?", "completion": "yes", "label": True},
        {"prompt": "Q2?", "completion": "no", "label": 0},
    ]
    assert detect_format(unpaired, "unpaired") == "unpaired"
    rows = prepare(unpaired, tok, "unpaired", 64)
    assert [r["label"] for r in rows] == [True, False]
    sft = prepare([{"prompt": "Q1?", "completion": "yes"}], tok, "sft", 64)[0]
    assert rows[0]["input_ids"] == sft["input_ids"] and rows[0]["labels"] == sft["labels"]  # tokenised as SFT
    pairs = [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]
    assert detect_format(pairs, "unpaired") == "explicit"
    split = prepare(pairs, tok, "unpaired", 64)
    chosen = prepare([{"prompt": "Q?", "completion": "good"}], tok, "sft", 64)[0]
    assert [r["label"] for r in split] == [True, False] and split[0]["input_ids"] == chosen["input_ids"]


@pytest.mark.parametrize("label", ["yes", 2, None])
def test_bad_labels_are_named(tok, label):
    with pytest.raises(UserError, match="field 'label' must be true"):
        prepare([{"prompt": "Q?", "completion": "a", "label": label}], tok, "unpaired", 64)


def test_mismatched_pairs_take_another_prompts_completion(tok):
    data = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in (("A?", "a1", "a2"), ("B?", "b1", "b2"))]
    rows = add_mismatched(prepare(data, tok, "unpaired", 64), max_length=64)  # A+, A-, B+, B-

    def prompt_and_completion(ids, labels):
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        return ids[:start], ids[start:]

    parts = [prompt_and_completion(r["input_ids"], r["labels"]) for r in rows]
    partners = [1 + 1, 1 + 1, 0, 0]  # A+ and A- skip A- (same prompt) to B+; B+ skips B- to A+; B- wraps to A+
    for row, (prompt, _), j in zip(rows, parts, partners):
        kl_prompt, kl_completion = prompt_and_completion(row["kl_input_ids"], row["kl_labels"])
        assert kl_prompt == prompt and kl_completion == parts[j][1]
    short = add_mismatched(prepare(data, tok, "unpaired", 64), max_length=len(parts[0][0]) + 1)
    assert len(short[0]["kl_input_ids"]) == len(parts[0][0]) + 1  # cut to max_length, one completion token left


def plain_seq_logps(model, ids, mask, labels):
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].double()
    y = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    return (lp * (y != IGNORE_INDEX)).sum(-1)


def test_micro_batch_loss_and_the_reference_point(tok):
    policy = load_causal_lm("builtin-small", tok, seed=0)
    ref = load_causal_lm("builtin-small", tok, seed=1)  # another model: z > 0 is likely, r != 0
    data = [{"prompt": f"Question {i}?", "chosen": f"answer {i}", "rejected": f"wrong {i + 3}"} for i in range(3)]
    batch = KTOCollator(tok.pad_token_id)(add_mismatched(prepare(data, tok, "unpaired", 64), 64))
    head, options = LMHead(), dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)
    z = kto.reference_point(policy, [batch], ref, None, head, contextlib.nullcontext)
    kl_args = ("kl_input_ids", "kl_attention_mask", "kl_labels")
    plain_z = (
        plain_seq_logps(policy, *(batch[k] for k in kl_args)) - plain_seq_logps(ref, *(batch[k] for k in kl_args))
    ).mean()
    assert z.item() == pytest.approx(max(plain_z.item(), 0.0), abs=1e-4)
    loss, stats = kto.kto_loss(policy, batch, 6, torch.tensor(0.3), ref, None, head, options, (3, 3))
    main = ("input_ids", "attention_mask", "labels")
    pi, ref_lp = plain_seq_logps(policy, *(batch[k] for k in main)), plain_seq_logps(ref, *(batch[k] for k in main))
    expected, expected_stats = rlhf_kernels.kto_loss(pi, ref_lp, batch["desirable"], kl=0.3, **options)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert stats["rewards/chosen"].item() == pytest.approx(expected_stats["rewards/chosen"].item(), abs=1e-5)
    assert stats["kl"].item() == pytest.approx(0.3)


def _cfg(tmp_path, out, **kw):
    args = dict(model="builtin-small", output_dir=str(tmp_path / out), max_steps=8, lr=1e-3, logging_steps=4)
    args.update(eval_steps=4, save_steps=4, keep_checkpoints=0, batch_size=8)
    args.update(kw)
    return KTOConfig(**args, **QUIET)


def _csv(path):
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_kto_trains_on_the_builtin_pairs(tmp_path):
    final = kto.train(_cfg(tmp_path, "run", max_steps=30, logging_steps=10, eval_steps=0, save_steps=0))
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert f"train/{key}" in final and f"eval/{key}" in final, key
    assert final["eval/rewards/margins"] > 0.5, final  # desirable completions pulled above undesirable ones
    assert final["train/num_examples"] == 30 * 8
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_grad_accum_gives_the_same_step(tmp_path):
    """z comes from the whole step, so one micro-batch of 8 and two of 4 compute the same update."""
    one = _cfg(tmp_path, "one", max_steps=1, save_steps=1, eval_fraction=0.0, max_grad_norm=0.0)
    two = _cfg(
        tmp_path, "two", max_steps=1, save_steps=1, eval_fraction=0.0, max_grad_norm=0.0, batch_size=4, grad_accum=2
    )
    kto.train(one)
    kto.train(two)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    kl_one, kl_two = (float(_csv(tmp_path / d)[-1]["kl"]) for d in ("one", "two"))
    assert kl_one == pytest.approx(kl_two, abs=1e-6)


def test_precomputed_reference_equals_the_live_one(tmp_path):
    kto.train(_cfg(tmp_path, "live", max_steps=3, save_steps=3, eval_fraction=0.0))
    kto.train(_cfg(tmp_path, "pre", max_steps=3, save_steps=3, eval_fraction=0.0, precompute_ref_logps=True))
    a, b = final_weights(tmp_path / "live"), final_weights(tmp_path / "pre")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_resume_from_checkpoint_is_bitwise_exact(tmp_path):
    kto.train(_cfg(tmp_path, "straight"))
    step4 = tmp_path / "straight" / "checkpoints" / "step-00000004"
    shutil.copytree(step4, tmp_path / "resumed" / "checkpoints" / step4.name)
    torch.manual_seed(1234)  # the checkpoint's RNG states must win
    kto.train(_cfg(tmp_path, "resumed"), resume=True)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _csv(tmp_path / "straight")[-1] == _csv(tmp_path / "resumed")[-1]  # the final evaluation


def test_one_sided_data_is_refused(tmp_path):
    path = tmp_path / "all_good.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Q{i}?", "completion": "yes", "label": True}) + "\n" for i in range(20))
    )
    with pytest.raises(UserError, match="holds only desirable examples"):
        kto.train(_cfg(tmp_path, "x", dataset=str(path)))
    with pytest.raises(ValueError, match="desirable_weight must be"):
        KTOConfig(desirable_weight=0.0).validate()
