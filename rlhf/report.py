"""The pipeline's report: a Markdown summary of the evaluation and a plot of gold reward against KL to SFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = (
    ("pass@1", "pass@1"),
    ("pass@1_sem", "pass@1 s.e."),
    ("pass@k", "pass@k"),
    ("pass@1_gain", "pass@1 gain vs SFT"),
    ("pass@1_gain_sem", "gain s.e. (paired)"),
    ("gold_reward", "gold reward"),
    ("rm_reward", "RM reward"),
    ("kl_to_sft", "KL to SFT (nats/seq)"),
    ("win_rate_vs_sft", "win rate vs SFT (gold)"),
    ("sft_nll", "NLL on held-out SFT data"),
    ("response_length", "response length"),
    ("eos_rate", "EOS rate"),
)
CURVES = (
    ("sft", "loss"),
    ("rm", "accuracy"),
    ("ppo", "objective_scores"),
    ("ppo", "objective_kl"),
    ("ppo_ptx", "ptx_loss"),
    ("dpo", "rewards_accuracies"),
    ("dpo", "rewards_margins"),
    ("kto", "rewards_margins"),
    ("kto", "kl"),
    ("rs", "loss"),
    ("grpo", "reward"),
    ("grpo", "completions_mean_length"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def results_table(results: dict) -> list[str]:
    """Markdown rows: one per policy, the columns that any policy reported."""
    policies = results["policies"]
    cols = [(k, title) for k, title in COLUMNS if any(k in p for p in policies.values())]
    lines = ["| policy | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, metrics in policies.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(k)) for k, _ in cols) + " |")
    return lines


def summary(results: dict, out: Path, models: dict[str, Path], seconds: float) -> str:
    """The few lines that end `rlhf pipeline`: the policies' reward (gold, else RM), KL to SFT and win rate, then
    where the report and the trained models are."""
    lines = [f"rlhf pipeline: done in {int(seconds // 60)}m{int(seconds % 60):02d}s"]
    policies = results.get("policies", {})
    if (out / "report.md").is_file() and policies:
        lines[0] += f"; report: {out / 'report.md'}"
    reward = next((k for k in ("pass@1", "gold_reward") if any(k in p for p in policies.values())), "rm_reward")
    titles = dict(COLUMNS)
    cols = [k for k in (reward, "pass@k", "kl_to_sft", "win_rate_vs_sft") if any(k in p for p in policies.values())]
    if cols:
        width = max(len("policy"), *map(len, policies))
        lines.append("policy".ljust(width) + "".join(f"  {titles[k]}" for k in cols))
        for name, metrics in policies.items():
            lines.append(name.ljust(width) + "".join(f"  {_fmt(metrics.get(k)):>{len(titles[k])}}" for k in cols))
    if models:
        lines.append("final models: " + ", ".join(f"{name} {path}" for name, path in models.items()))
    return "\n".join(lines)


def plot_gold_vs_kl(results: dict, path: Path) -> Path | None:
    """Scatter of mean gold reward (or RM reward) against KL to SFT, one point per policy."""
    from matplotlib.figure import Figure

    key = "gold_reward" if any("gold_reward" in p for p in results["policies"].values()) else "rm_reward"
    points = [(n, p.get("kl_to_sft"), p.get(key)) for n, p in results["policies"].items()]
    points = [(n, kl, r) for n, kl, r in points if kl is not None and r is not None]
    if not points:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, kl, r in points:
        ax.scatter([kl], [r], s=40)
        ax.annotate(name, (kl, r), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("KL to SFT (nats per sequence)")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def render_report(cfg: Any, results: dict, out: Path) -> Path:
    """Write ``report.md`` (and ``report.png``) into ``out``; returns the Markdown path."""
    lines = ["# rlhf pipeline report", "", f"Output directory: `{out}`; model `{cfg.model}`; seed {cfg.seed}.", ""]
    lines += ["## Policies on held-out prompts", ""]
    verifiable = any("pass@1" in p for p in results["policies"].values())
    lines += [
        "pass@1: the mean over distinct held-out questions of the fraction of k samples (temperature 1) that are "
        "the exact answer, with its standard error over questions; pass@k: the fraction of questions with a "
        "correct sample; gain: the mean per-question pass@1 difference to SFT on the same questions, with the "
        "standard error of that mean (paired)."
        if verifiable
        else "Means over one sampled response per held-out prompt (temperature 1). KL to SFT: the exact sequence KL "
        "(sum over response tokens of the full-vocabulary KL) on the policy's own samples; for best-of-n it is the "
        "analytic bound log n - (n-1)/n. Win rate: the share of prompts where the policy's gold reward beats the "
        "SFT sample's (ties count half). NLL on held-out SFT data: nats per response token of demonstrations "
        "no stage trained on (the alignment tax: its rise from SFT).",
        "",
    ]
    lines += results_table(results)
    if "rm_accuracy" in results:
        best = results.get("rm_best_accuracy")
        k = results.get("rm_k", 2)
        trained_on = "pairs" if k == 2 else f"rankings of {k} responses per prompt (as many labelled responses)"
        lines += ["", f"Reward model (trained on {trained_on}) held-out pair accuracy: {_fmt(results['rm_accuracy'])}"]
        if best is not None:
            lines[-1] += f" (best reachable on these noisy labels: {_fmt(best)} expected over label draws"
            if "gold_accuracy" in results:
                lines[-1] += f"; the gold reward itself scores {_fmt(results['gold_accuracy'])} on this draw"
            lines[-1] += ")"
    if "judge" in results:
        lines += ["", f"Training pairs labelled by the judge `{results['judge']}`: its preference agrees with the gold "
                  f"reward on {_fmt(results.get('judge_gold_agreement'))} of them (the gold Bradley-Terry draw on "
                  f"the same samples: {_fmt(results.get('gold_draw_agreement'))})"]  # fmt: skip
        if results.get("judge_order_agreement") is not None:
            lines[-1] += f"; its two orders agreed on {_fmt(results['judge_order_agreement'])} of the pairs"
    png = plot_gold_vs_kl(results, out / "report.png")
    if png is not None:
        lines += ["", "![gold reward against KL](report.png)"]
    curves = [
        f"{stage}/plots/{name}.png" for stage, name in CURVES if (out / stage / "plots" / f"{name}.png").is_file()
    ]
    if curves:
        lines += ["", "## Training curves", ""] + [f"![{c}]({c})" for c in curves]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
