"""``rlhf label``: preference or ranking data labelled by a judge instead of people (RLAIF).

Input (``dataset``): prompts (``prompt`` or ``messages``), or rows that already hold ``responses`` (a list of
strings); for prompts without responses ``policy`` samples ``k`` per prompt. A judge (:mod:`rlhf.judges`: the
gold reward, a reward model, a Python function, or an LLM with a ``rubric``) scores each prompt's responses.
Output (``output``, JSON Lines): with k = 2 preference rows ``{"prompt", "chosen", "rejected", "scores"}`` (a tie
is no label and is skipped), with k > 2 ranked rows ``{"prompt", "responses" (best first), "scores"}`` (equal
scores tie), the formats ``rlhf rm`` and ``rlhf dpo`` read. Empty and repeated responses of a prompt are dropped
first; a prompt left with fewer than two is skipped.

The output is complete or absent: prompts are labelled in chunks of ``chunk_prompts``, each written atomically to
``<output>.parts/``; a killed run resumes from the chunks already written (same configuration, same results: each
chunk samples from its own seed), and the parts become the output file by one atomic rename at the end.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import _opt
from .errors import UserError
from .judges import DEFAULT_RUBRIC


@dataclass
class LabelConfig:
    """AI-feedback labelling: a judge turns prompts and sampled responses into preference or ranking data."""

    dataset: str = _opt("builtin:prompt", "prompts (prompt or messages), or rows with responses: a list of strings")
    output: str = _opt("runs/label/labels.jsonl", "the labelled dataset (JSON Lines), written atomically")
    judge: str = _opt("gold", "gold | llm:<causal LM> | a reward model directory | module:function")
    rubric: str = _opt(DEFAULT_RUBRIC, "llm judge: what makes an answer better (a constitution)")
    policy: str = _opt("builtin", "the model that samples k responses for prompts that have none")
    k: int = _opt(2, "responses per prompt (2: preference pairs; more: rankings)")
    split: str = _opt("train", "dataset split")
    max_new_tokens: int = _opt(24, "longest sampled response")
    temperature: float = _opt(1.0, "sampling temperature")
    chunk_prompts: int = _opt(64, "prompts per atomically written chunk (the unit of resume)")
    batch_size: int = _opt(32, "prompts per sampling batch")
    seed: int = _opt(0, "seed of the sampling")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _opt("float32", "dtype of the policy and the judge")
    trust_remote_code: bool = _opt(False, "allow custom model code from the hub")
    progress: bool = _opt(True, "show a progress bar")

    def validate(self) -> None:
        from .config import validate_fields

        validate_fields(self, required=("dataset", "output", "judge"))
        for name in ("k", "max_new_tokens", "chunk_prompts", "batch_size"):
            if getattr(self, name) < (2 if name == "k" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'k' else 1}; got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")


def label_rows(prompt, responses: list[str], scores: list[float], k: int) -> dict | None:
    """The output row of one judged prompt (module docstring), or None for a tied pair."""
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    if k == 2 and len(responses) == 2:
        if scores[0] == scores[1]:
            return None
        best, worst = order
        return {"prompt": prompt, "chosen": responses[best], "rejected": responses[worst],
                "scores": [scores[best], scores[worst]]}  # fmt: skip
    return {"prompt": prompt, "responses": [responses[i] for i in order], "scores": [scores[i] for i in order]}


def usable(responses) -> list[str]:
    """The non-empty responses, each once, in order."""
    if not isinstance(responses, (list, tuple)) or not all(isinstance(r, str) for r in responses):
        raise UserError(f"field 'responses' must be a list of strings, got {responses!r}")
    return list(dict.fromkeys(r for r in responses if r.strip()))


def _write_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def _parts_dir(cfg: LabelConfig) -> Path:
    """``<output>.parts``: the chunks written so far and the configuration they were made with."""
    parts = Path(cfg.output).with_name(Path(cfg.output).name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    manifest, settings = parts / "config.json", json.dumps(asdict(cfg), sort_keys=True)
    if manifest.is_file() and manifest.read_text() != settings:
        raise UserError(f"{parts} holds chunks labelled with another configuration; delete it to start over")
    manifest.write_text(settings)
    return parts


def train(cfg: LabelConfig, resume: bool = True) -> dict:
    """Label ``cfg.dataset`` into ``cfg.output`` (the CLI's ``rlhf label``; always resumes from finished
    chunks). Returns the counts and the judge's order agreement (pairwise judges)."""
    from tqdm.auto import tqdm

    from .data import load_rows
    from .evaluate import sample_responses
    from .judges import build_judge
    from .models import load_causal_lm, load_tokenizer, resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    rows = list(load_rows(cfg.dataset, cfg.split))
    if not rows:
        raise UserError(f"{cfg.dataset} has no rows")
    given = "responses" in rows[0]
    if not given and not ("prompt" in rows[0] or "messages" in rows[0]):
        raise UserError(f"{cfg.dataset}: rows need a 'prompt' (or 'messages') column, got {sorted(rows[0])}")
    judge = build_judge(cfg.judge, rubric=cfg.rubric, device=device, dtype=cfg.dtype,
                        trust_remote_code=cfg.trust_remote_code)  # fmt: skip
    policy = tokenizer = None
    if not given:
        tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        policy = load_causal_lm(cfg.policy, tokenizer, dtype=cfg.dtype, device=device,
                                trust_remote_code=cfg.trust_remote_code).eval()  # fmt: skip
    parts = _parts_dir(cfg)
    chunks = range(0, len(rows), cfg.chunk_prompts)
    counts = {"prompts": len(rows), "labelled": 0, "skipped": 0}
    for c, start in enumerate(tqdm(chunks, disable=not cfg.progress, desc="label")):
        path = parts / f"part-{c:05d}.jsonl"
        if path.is_file():
            continue  # labelled by an earlier run
        chunk = rows[start : start + cfg.chunk_prompts]
        prompts = [r.get("prompt", r.get("messages")) for r in chunk]
        if given:
            candidates = [r["responses"] for r in chunk]
        else:
            candidates = sample_responses(policy, tokenizer, chunk, n=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                          temperature=cfg.temperature, batch_size=cfg.batch_size,
                                          seed=cfg.seed * 1_000_003 + c)  # fmt: skip
        out = []
        for row, prompt, responses in zip(chunk, prompts, candidates, strict=True):
            responses = usable(responses)
            if len(responses) < 2:
                continue
            columns = {k: v for k, v in row.items() if k not in ("prompt", "messages", "responses")}
            labelled = label_rows(prompt, responses, judge.scores(prompt, responses, columns), cfg.k)
            if labelled is not None:
                out.append(labelled)
        _write_atomic(path, out)
    labelled = []
    for c in range(len(chunks)):
        with open(parts / f"part-{c:05d}.jsonl") as f:
            labelled += [json.loads(line) for line in f if line.strip()]
    output = Path(cfg.output)
    _write_atomic(output, labelled)
    shutil.rmtree(parts)
    counts["labelled"], counts["skipped"] = len(labelled), len(rows) - len(labelled)
    if judge.agreement:
        counts["order_agreement"] = sum(judge.agreement) / len(judge.agreement)
    summary = f"rlhf label: {counts['labelled']} of {len(rows)} prompts labelled by {judge.name} -> {output}"
    if "order_agreement" in counts:
        summary += f"; the two orders agreed on {counts['order_agreement']:.1%} of this run's pairs"
    print(summary)
    return counts
