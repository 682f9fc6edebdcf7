"""The pipeline's last stage: every trained policy on the held-out prompts, then the report (reviews task: gold and
reward-model reward, exact KL to SFT, win rate, best-of-n; task=qa: pass@1 and pass@k)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .pipeline import PipelineConfig, is_done, mark_done, read_done, read_jsonl
from .pipeline_data import gold_function, gold_label_accuracy


def evaluate_stage(
    cfg: PipelineConfig, out: Path, paths: dict, policies: dict[str, Path], rm_dir: Path | None, pairs: dict
) -> dict:
    """Evaluate every trained policy (and best-of-n from SFT) on the held-out prompts; write the report."""
    import torch

    from . import evaluate as ev
    from .models import load_causal_lm, load_reward_model, load_tokenizer

    stage = out / "eval"
    if is_done(stage):
        return read_done(stage)
    has_gold = cfg.gold is not None or not (cfg.sft_dataset or cfg.prompt_dataset or cfg.eval_prompt_dataset)
    gold_fn = gold_function(cfg, paths) if has_gold else (lambda prompt, response: 0.0)  # gold columns dropped below
    prompts = read_jsonl(paths["eval_prompts"])
    tokenizer = load_tokenizer(str(policies["sft"]))
    sft_model = load_causal_lm(str(policies["sft"]), tokenizer).eval()
    rm = load_reward_model(str(rm_dir), tokenizer).eval() if rm_dir else None
    common = dict(
        sft_model=sft_model,
        reward_model=rm,
        gold_fn=gold_fn,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=64,
        seed=cfg.seed,
    )
    results: dict[str, Any] = {"policies": {}}
    with torch.no_grad():
        heldout = read_jsonl(paths["sft_heldout"]) if "sft_heldout" in paths else None
        base = ev.evaluate_policy(sft_model, tokenizer, prompts, **common)
        results["policies"]["sft"] = base
        for name, path in policies.items():
            model = sft_model if name == "sft" else load_causal_lm(str(path), tokenizer).eval()
            if name != "sft":
                results["policies"][name] = ev.evaluate_policy(
                    model, tokenizer, prompts, baseline_gold=base.get("per_prompt_gold"), **common
                )
            if heldout:
                results["policies"][name]["sft_nll"] = ev.heldout_nll(model, tokenizer, heldout)
        if rm is not None and cfg.best_of_n > 1:
            results["policies"][f"best-of-{cfg.best_of_n} (SFT + RM)"] = ev.best_of_n(
                sft_model,
                rm,
                tokenizer,
                prompts,
                n=cfg.best_of_n,
                baseline_gold=base.get("per_prompt_gold"),
                **{k: v for k, v in common.items() if k not in ("sft_model", "reward_model")},
            )
        if rm is not None and pairs.get("eval"):
            results["rm_accuracy"] = ev.reward_accuracy(rm, tokenizer, read_jsonl(Path(pairs["eval"])))
            results["rm_best_accuracy"] = pairs.get("best_accuracy")
            results["rm_k"] = cfg.rm_k
            if has_gold:  # the gold reward itself as a classifier of these particular (noisy) labels
                results["gold_accuracy"] = gold_label_accuracy(read_jsonl(Path(pairs["eval"])), gold_fn)
    for key in ("judge_gold_agreement", "judge_order_agreement", "gold_draw_agreement"):
        if pairs.get(key) is not None:
            results[key] = pairs[key]
    if cfg.labels == "ai":
        results["judge"] = cfg.judge
    for policy in results["policies"].values():
        policy.pop("per_prompt_gold", None)
        policy["examples"] = [[p["prompt"], r] for p, r in zip(prompts[:3], policy.pop("responses", [])[:3])]
        if not has_gold:
            for key in ("gold_reward", "gold_reward_sem", "win_rate_vs_sft"):
                policy.pop(key, None)
    write_report(cfg, results, out)
    mark_done(stage, results)
    return results


def evaluate_qa_stage(cfg: PipelineConfig, out: Path, paths: dict, policies: dict[str, Path]) -> dict:
    """task=qa: held-out pass@1 (with its standard error) and pass@k of every policy; write the report."""
    import torch

    from .models import load_causal_lm, load_tokenizer
    from .qa_task import evaluate_qa, paired_gain

    stage = out / "eval"
    if is_done(stage):
        return read_done(stage)
    rows = read_jsonl(paths["eval_prompts"])
    tokenizer = load_tokenizer(str(policies["sft"]))
    results: dict[str, Any] = {"policies": {}}
    with torch.no_grad():
        for name, path in policies.items():
            model = load_causal_lm(str(path), tokenizer).eval()
            results["policies"][name] = evaluate_qa(
                model, tokenizer, rows, k=cfg.pass_k, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed
            )
    base = results["policies"]["sft"]["per_question"] if "sft" in results["policies"] else None
    for name, policy in results["policies"].items():
        per_question = policy.pop("per_question")
        if base is not None and name != "sft":  # the same questions: a paired comparison
            policy.update(paired_gain(per_question, base))
    write_report(cfg, results, out)
    mark_done(stage, results)
    return results


def write_report(cfg: PipelineConfig, results: dict, out: Path) -> Path:
    """``results.json``, ``report.md`` and ``report.png`` (gold reward against KL to SFT per policy)."""
    from .report import render_report

    (out / "results.json").write_text(json.dumps(results, indent=2))
    return render_report(cfg, results, out)
