"""The pipeline's data: stage markers, JSONL files, the built-in task's files, and the preference pairs and
rankings sampled from the SFT policy and labelled by noisy draws on the gold reward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import PipelineConfig

HELDOUT_SFT_ROWS = 256  # built-in tasks: demonstrations held out from SFT, for the NLL of each policy
HELDOUT_SEED_OFFSET = 1_000_003  # their draw's seed offset from the run's seed


def is_done(path: Path) -> bool:
    return (path / "DONE").is_file()


def mark_done(path: Path, info: dict) -> None:
    """Write ``DONE`` (with what the stage produced) last, atomically."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "DONE.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    tmp.replace(path / "DONE")


def read_done(path: Path) -> dict:
    return json.loads((path / "DONE").read_text())


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def build_data(cfg: PipelineConfig, out: Path) -> dict[str, Path]:
    """The built-in task's files (unless the user gave datasets): sft.jsonl, prompts.jsonl, eval_prompts.jsonl."""
    from . import qa_task, task

    demos, prompt_rows = {  # task -> (demonstrations, prompts of a split); qa prompts carry their answer
        "reviews": (task.sft_demonstrations, lambda n, seed, split: task.task_prompts(n, seed, split=split)),
        "qa": (
            qa_task.sft_demonstrations,
            lambda n, seed, split: qa_task.qa_rows(n, split, seed, distinct=split == "eval"),
        ),
    }[cfg.task]

    data = out / "data"
    paths = {
        "sft": Path(cfg.sft_dataset) if cfg.sft_dataset else data / "sft.jsonl",
        "prompts": Path(cfg.prompt_dataset) if cfg.prompt_dataset else data / "prompts.jsonl",
        "eval_prompts": Path(cfg.eval_prompt_dataset) if cfg.eval_prompt_dataset else data / "eval_prompts.jsonl",
    }
    if not cfg.sft_dataset and not paths["sft"].is_file():
        write_jsonl(demos(cfg.sft_examples, cfg.seed), paths["sft"])
    if not cfg.prompt_dataset and not paths["prompts"].is_file():
        write_jsonl(prompt_rows(cfg.train_prompts, cfg.seed, "train"), paths["prompts"])
    if not cfg.sft_dataset:  # held-out demonstrations (a fresh draw) for the alignment tax: NLL before / after RL
        paths["sft_heldout"] = data / "sft_heldout.jsonl"
        if not paths["sft_heldout"].is_file():
            write_jsonl(demos(HELDOUT_SFT_ROWS, cfg.seed + HELDOUT_SEED_OFFSET), paths["sft_heldout"])
    if not cfg.eval_prompt_dataset and not paths["eval_prompts"].is_file():
        write_jsonl(prompt_rows(cfg.task_default("eval_prompts"), cfg.seed, "eval"), paths["eval_prompts"])
    return paths


def sample_pairs(
    cfg: PipelineConfig, out: Path, paths: dict, sft_dir: Path, *, round_: int = 1, method: str = ""
) -> dict[str, Any]:
    """Two samples per prompt from the SFT policy, labelled by a Bradley-Terry draw on the gold reward (or, with
    ``labels=ai``, by the judge). Round ``r > 1`` of ``rounds`` (``sft_dir`` then ``method``'s current policy):
    training pairs only, in ``pairs_<method>_round<r>``, with their own seeds; the held-out pairs are round 1's."""
    from . import task

    stage = out / ("pairs" if round_ == 1 else f"pairs_{method}_round{round_}")
    if cfg.preference_dataset:
        return {"train": cfg.preference_dataset, "eval": None, "best_accuracy": None}
    splits = (("train", paths["prompts"]), ("eval", paths["eval_prompts"]))[: 2 if round_ == 1 else 1]
    if not is_done(stage):
        info, gold = {}, gold_function(cfg, paths)
        for split, source in splits:
            prompts = read_jsonl(source)
            seed = cfg.seed + 1_000 * (round_ - 1)
            a, b = (
                sample_responses(sft_dir, prompts, max_new_tokens=cfg.max_new_tokens, seed=seed + k) for k in (1, 2)
            )
            rows, best = task.label_pairs(prompts, a, b, beta=cfg.label_beta, seed=seed, gold_fn=gold)
            info[f"{split}_best_accuracy"] = best
            if split == "train" and cfg.labels == "ai":  # the judge replaces the gold draw (held-out pairs stay)
                info["gold_draw_agreement"] = gold_label_accuracy(rows, gold)
                rows, info["judge_order_agreement"] = judge_pairs(cfg, prompts, a, b)
                info["judge_gold_agreement"] = gold_label_accuracy(rows, gold)
            write_jsonl(rows, stage / f"{split}.jsonl")
            info[f"{split}_pairs"] = len(rows)
        mark_done(stage, info)
    info = read_done(stage)
    if round_ > 1:
        return {"train": stage / "train.jsonl", "eval": out / "pairs" / "eval.jsonl", "best_accuracy": None}
    pairs = {"train": stage / "train.jsonl", "eval": stage / "eval.jsonl", "best_accuracy": info["eval_best_accuracy"]}
    pairs.update({k: info[k] for k in ("judge_gold_agreement", "judge_order_agreement", "gold_draw_agreement")
                  if k in info})  # fmt: skip
    if cfg.rm_k > 2:
        pairs["ranked"] = sample_rankings(cfg, stage, paths, sft_dir)
    return pairs


def judge_pairs(cfg: PipelineConfig, prompts: list[dict], a: list[str], b: list[str]) -> tuple[list[dict], float]:
    """``labels=ai``: the pairs (a, b) labelled by ``cfg.judge`` (:mod:`rlhf.judges`); ties, repeated and empty
    responses give no row. Returns the rows and how often an LLM judge's two orders agreed (None otherwise)."""
    from .judges import build_judge
    from .models import resolve_device

    spec = cfg.gold if cfg.judge == "gold" and cfg.gold else cfg.judge  # "gold": the run's gold reward
    judge = build_judge(spec, rubric=cfg.rubric, device=resolve_device(cfg.device))
    rows = []
    for prompt, x, y in zip(prompts, a, b, strict=True):
        if x == y or not x.strip() or not y.strip():
            continue
        sx, sy = judge.scores(prompt["prompt"], [x, y], {k: v for k, v in prompt.items() if k != "prompt"})
        if sx != sy:
            chosen, rejected = (x, y) if sx > sy else (y, x)
            rows.append({"prompt": prompt["prompt"], "chosen": chosen, "rejected": rejected})
    agreement = sum(judge.agreement) / len(judge.agreement) if judge.agreement else None
    return rows, agreement


def gold_function(cfg: PipelineConfig, paths: dict):
    """The run's gold reward, ``gold(prompt, response) -> float``: the built-in task's, or the user's ``gold``
    function called with each prompt row's other columns (:func:`rlhf.rewards.gold_function`)."""
    from .rewards import gold_function as build

    rows = [] if cfg.gold is None else read_jsonl(paths["prompts"]) + read_jsonl(paths["eval_prompts"])
    return build(cfg.gold, rows)


def gold_label_accuracy(rows: list[dict], gold_fn) -> float:
    """Share of preference rows whose chosen response has the higher gold reward (ties count half)."""
    score = 0.0
    for row in rows:
        chosen, rejected = gold_fn(row["prompt"], row["chosen"]), gold_fn(row["prompt"], row["rejected"])
        score += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return score / max(len(rows), 1)


def sample_rankings(cfg: PipelineConfig, stage: Path, paths: dict, sft_dir: Path) -> Path:
    """``rm_k`` = K > 2: K samples from the SFT policy for each of the first 2/K of the training prompts (as many
    labelled responses as the pairs hold), ranked by a Plackett-Luce draw on the gold reward."""
    from . import task

    path = stage / f"ranked_k{cfg.rm_k}.jsonl"
    if not path.is_file():
        prompts = read_jsonl(paths["prompts"])
        prompts = prompts[: max(len(prompts) * 2 // cfg.rm_k, 1)]
        samples = [
            sample_responses(sft_dir, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + k)
            for k in range(1, cfg.rm_k + 1)
        ]
        ranked = task.rank_responses(
            prompts, list(zip(*samples)), beta=cfg.label_beta, seed=cfg.seed, gold_fn=gold_function(cfg, paths)
        )
        write_jsonl(ranked, path)
    return path


def sample_responses(model_dir: Path, prompts: list[dict], *, max_new_tokens: int, seed: int, batch_size: int = 64):
    """One sampled response text per prompt row from the model saved in ``model_dir`` (deterministic per seed)."""
    import torch

    from .collators import PromptCollator
    from .data import prepare
    from .generation import generate
    from .models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), tokenizer)
    rows = prepare(prompts, tokenizer, "prompt", max_length=10_000, overlong="error")
    collate = PromptCollator(tokenizer.pad_token_id)
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            batch = generate(model, tokenizer, collate(rows[i : i + batch_size]), max_new_tokens=max_new_tokens)
            P = batch["prompt_length"]
            for ids, mask in zip(batch["input_ids"][:, P:], batch["response_mask"]):
                texts.append(tokenizer.decode(ids[mask], skip_special_tokens=True))
    return texts


def best_of_n_rows(cfg: PipelineConfig, path: Path, paths: dict, sft_dir: Path, judge) -> Path:
    """Rejection sampling's data: for each training prompt the best of ``best_of_n`` SFT samples by ``judge``
    (the reward model, or the ``labels=ai`` judge), as SFT rows ``{"prompt", "completion"}``."""
    if not path.is_file():
        prompts = read_jsonl(paths["prompts"])
        samples = [
            sample_responses(sft_dir, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 500 + k)
            for k in range(cfg.best_of_n)
        ]
        rows = []
        for i, prompt in enumerate(prompts):
            candidates = list(dict.fromkeys(s[i] for s in samples if s[i].strip()))
            if candidates:
                scores = judge.scores(prompt["prompt"], candidates, {})
                best = max(range(len(candidates)), key=lambda j: scores[j])
                rows.append({"prompt": prompt["prompt"], "completion": candidates[best]})
        write_jsonl(rows, path)
    return path
