"""``rlhf frontier``: methods compared the way the papers do, by the frontier of gold reward against exact KL to SFT.

Each method's strength is swept over a grid, each point over several seeds: DPO's, IPO's and KTO's ``beta``,
PPO's ``kl_coef`` or (``ppo_target_kl``) the target of its adaptive KL controller, GRPO's ``beta`` (its KL to the
reference), best-of-n's ``n``. Pipeline policies without a strength to sweep (rejection sampling, PPO-ptx) are
listed in the report as not swept. Every point starts from the same SFT policy, reward model and preference pairs
(the pipeline's, built once in ``<output_dir>/base``; GRPO learns from that reward model, ``grpo_reward=rm``, as
PPO and best-of-n do, so no method sees more than the labelled pairs) and is evaluated as the pipeline evaluates a
policy: gold reward, proxy (reward-model) reward, exact sequence KL to SFT, win rate against SFT, on the held-out
prompts, with the point's seed. A point is one directory with a ``point.json`` written atomically last: a killed
sweep continues where it stopped, a finished point is never recomputed, ``--restart`` starts over; a resumed
sweep with another model, preset, ``pipeline_args`` or ``kl_horizon`` is refused. On a user's task,
``pipeline_args`` names the datasets and the task's gold reward (``gold=module:function``,
:func:`rlhf.rewards.gold_function`); without a gold reward there is no frontier.

From the points, computed and not written by hand: per (method, strength) the mean and standard error over seeds;
per method the best mean gold reward within each KL budget; and for each pair of methods whether one's frontier
dominates the other's: every point of B has a point of A with no more KL and no less gold reward, and at least one
of them with more gold reward by more than the two points' standard errors combined. Outputs: ``frontier.json``
(every point and the summary), ``frontier.md`` (tables) and ``frontier.png`` (gold reward against KL, one curve
per method, error bars over seeds; best-of-n at its analytic KL bound).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import _opt, load_config, validate_fields


@dataclass(frozen=True)
class Method:
    """A swept method: the option that is its strength, the pipeline stage that trains it (None: sampling only),
    the stage's pipeline option that carries the strength, and fixed stage options of the method."""

    strength: str
    stage: str | None = None
    option: str | None = None
    extra: str = ""


METHODS = {
    "dpo": Method("beta", "dpo", "dpo_args"),
    "ipo": Method("beta", "dpo", "dpo_args", "loss_type=ipo"),
    "kto": Method("beta", "kto", "kto_args"),
    "ppo": Method("kl_coef", "ppo", "ppo_args"),
    "ppo_target_kl": Method("target_kl", "ppo", "ppo_args", "adaptive_kl=true"),
    "grpo": Method("beta", "grpo", "grpo_args"),
    "best_of_n": Method("n"),
}
SWEEP_SETTINGS = ("model", "preset", "pipeline_args", "kl_horizon")  # a resumed sweep must keep these
KL_IS_BOUND = ("best_of_n",)  # methods whose KL is the analytic upper bound, not a measurement
CURVE_STAGES = ("ppo", "grpo")  # RL runs evaluated along training (over-optimisation)
CURVE_POINTS = 4  # checkpoints evaluated along each such run, besides step 0
NOT_SWEPT = {  # pipeline policies the sweep leaves out, and why
    "rs": "rejection sampling has no KL strength of its own (its n is best-of-n's; the SFT on the kept samples is "
    "fixed)",
    "ppo-ptx": "its coefficient trades reward for SFT likelihood, not KL (a ppo sweep takes ptx_coef in ppo_args)",
}
PRESETS = {  # preset -> pipeline options of the base and of every point (sizes and steps)
    "default": "",
    "quick": "model=builtin-small sft_examples=128 train_prompts=32 eval_prompts=16 max_new_tokens=8 sft_steps=6 "
    "rm_steps=4 ppo_steps=2 dpo_steps=4 kto_steps=3 grpo_steps=2 "
    "ppo_args='rollout_batch_size=8 mini_batch_size=4 ppo_epochs=1 plots=false tensorboard=false' "
    "kto_args='batch_size=8 plots=false tensorboard=false' dpo_args='plots=false tensorboard=false' "
    "grpo_args='prompts_per_step=4 num_generations=2 plots=false tensorboard=false' "
    "sft_args='plots=false tensorboard=false' rm_args='plots=false tensorboard=false'",
}


@dataclass
class FrontierConfig:
    """Reward-KL frontiers: each method's strength swept over a grid and several seeds, evaluated on gold reward."""

    output_dir: str = _opt("runs/frontier", "directory of the base stages, the points and the figures")
    model: str = _opt("builtin", "initial model (as the pipeline's model option)")
    methods: str = _opt("dpo,ipo,kto,ppo,grpo,best_of_n", "methods to sweep: " + ", ".join(METHODS))
    dpo: str = _opt("0.03,0.1,1.0", "DPO beta grid")
    ipo: str = _opt("0.1,1.0", "IPO beta grid (DPO stage, loss_type=ipo)")
    kto: str = _opt("0.03,0.1,1.0", "KTO beta grid")
    ppo: str = _opt("0.02,0.2", "PPO kl_coef grid")
    ppo_target_kl: str = _opt("1,4", "PPO target_kl grid (adaptive KL controller from kl_coef; see kl_horizon)")
    kl_horizon: int = _opt(
        160, "ppo_target_kl: the controller's horizon in sequences (the pipeline's PPO samples 100 x 16 = 1600: "
        "160 lets kl_coef move by up to e^2 over a run)")  # fmt: skip
    grpo: str = _opt("0.0,0.04,0.2", "GRPO beta grid (its KL to the reference)")
    best_of_n: str = _opt("2,4,8,16,32", "best-of-n grid of n")
    seeds: str = _opt("0,1", "seeds of every point")
    budgets: str = _opt("1,2,5", "KL budgets (nats per sequence) for the best gold reward within each")
    preset: str = _opt("default", "sizes: default (the pipeline's) | quick (a few steps; tests)")
    pipeline_args: str = _opt("", "more pipeline options for the base and every point, 'key=value ...'")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    num_threads: int = _opt(0, "torch CPU threads (0 = torch default)")
    workers: int = _opt(0, "points run at once, each in its own process; the CPU threads (num_threads, or torch's "
                        "default) are split among them; on a GPU they share the device (0 = auto: 2 on a CPU "
                        "with 2 or more threads, else 1)")  # fmt: skip
    progress: bool = _opt(True, "show progress bars")

    def validate(self) -> None:
        validate_fields(self, required=("output_dir", "methods", "seeds"))
        unknown = [m for m in self.method_list() if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        for name in [*self.method_list(), "seeds", "budgets"]:
            values = self.grid(name)
            if not values:
                raise ValueError(f"{name} must list at least one value")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = auto); got {self.workers}")
        if any(n < 1 or n != int(n) for n in self.grid("best_of_n")):
            raise ValueError("best_of_n values must be integers >= 1")
        from .pipeline import STAGE_CONFIGS

        for method in self.method_list():  # each strength through its stage's own checks, now, not minutes later
            spec = METHODS[method]
            for value in self.grid(method) if spec.stage else ():
                try:
                    load_config(STAGE_CONFIGS[spec.stage], None, [*spec.extra.split(), f"{spec.strength}={value:g}"])
                except ValueError as err:
                    raise ValueError(f"{method}={value:g}: {err}") from None

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def grid(self, name: str) -> list[float]:
        try:
            return [float(v) for v in str(getattr(self, name)).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated numbers, got {getattr(self, name)!r}") from None


def points(cfg: FrontierConfig) -> list[tuple[str, float, int]]:
    """Every point of the sweep: ``(method, strength, seed)``, the SFT baseline of each seed first."""
    seeds = [int(s) for s in cfg.grid("seeds")]
    out = [("sft", 0.0, s) for s in seeds]
    for method in cfg.method_list():
        out += [(method, value, s) for value in cfg.grid(method) for s in seeds]
    return out


def point_name(method: str, value: float, seed: int) -> str:
    return f"{method}-{value:g}-s{seed}"


# ---------------------------------------------------------------------------------------------------- analysis


def summarise(records: list[dict]) -> list[dict]:
    """Mean and standard error over seeds of gold reward, proxy reward and KL, per (method, strength)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["strength"]), []).append(r)
    out = []
    for (method, strength), rows in groups.items():
        entry = {"method": method, "strength": strength, "seeds": len(rows)}
        for key in ("gold_reward", "rm_reward", "kl_to_sft", "win_rate_vs_sft"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
                entry[key], entry[f"{key}_sem"] = mean, math.sqrt(var / len(values)) if len(values) > 1 else 0.0
        out.append(entry)
    return sorted(out, key=lambda e: (e["method"], e["strength"]))


def best_within(summary: list[dict], method: str, budget: float) -> dict | None:
    """The point of ``method`` with the highest mean gold reward among those with mean KL <= ``budget``."""
    inside = [e for e in summary if e["method"] == method and e.get("kl_to_sft", math.inf) <= budget]
    return max(inside, key=lambda e: e["gold_reward"], default=None)


def dominates(summary: list[dict], a: str, b: str) -> bool:
    """Whether method ``a``'s frontier dominates ``b``'s within the seeds' error (module docstring). Never claimed
    over a method whose KL is only an upper bound (best-of-n): its true points may lie left of ``a``'s."""
    pa = [e for e in summary if e["method"] == a]
    pb = [e for e in summary if e["method"] == b]
    if not pa or not pb or b in KL_IS_BOUND:
        return False
    clear = False
    for q in pb:
        covering = [p for p in pa if p["kl_to_sft"] <= q["kl_to_sft"] and p["gold_reward"] >= q["gold_reward"]]
        if not covering:
            return False
        error = [math.hypot(p.get("gold_reward_sem", 0.0), q.get("gold_reward_sem", 0.0)) for p in covering]
        clear = clear or any(p["gold_reward"] - q["gold_reward"] > e for p, e in zip(covering, error, strict=True))
    return clear


def conclusions(summary: list[dict], methods: list[str], budgets: list[float]) -> dict[str, Any]:
    best = {m: {f"{b:g}": best_within(summary, m, b) for b in budgets} for m in methods}
    dominance = [[a, b] for a in methods for b in methods if a != b and dominates(summary, a, b)]
    return {"best_within_budget": best, "dominates": dominance}


# ---------------------------------------------------------------------------------------------------- the sweep


def run_point(cfg, base, pcfg, method: str, value: float, seed: int, point_dir: Path) -> dict:
    """Train (unless best-of-n or SFT) and evaluate one point; returns its record."""
    import torch

    from . import evaluate as ev
    from .models import load_causal_lm, load_reward_model, load_tokenizer
    from .pipeline import run_dpo, run_grpo, run_kto, run_ppo
    from .pipeline_data import read_jsonl

    spec = METHODS.get(method, Method("none"))  # "sft": the baseline, nothing trained
    point_cfg = dataclasses.replace(pcfg, seed=seed)
    if spec.option is not None:
        extra = f"{spec.extra} {spec.strength}={value:g}"
        if spec.strength == "target_kl":
            extra += f" kl_horizon={cfg.kl_horizon}"
        if spec.stage in CURVE_STAGES:  # checkpoints along training, every one kept: the over-optimisation curve
            steps = pcfg.ppo_steps if spec.stage == "ppo" else pcfg.task_default("grpo_steps")
            extra += f" save_steps={max(steps // CURVE_POINTS, 1)} keep_checkpoints=0"
        point_cfg = dataclasses.replace(point_cfg, **{spec.option: f"{getattr(pcfg, spec.option)} {extra}"})
    runs = {"dpo": lambda: run_dpo(point_cfg, point_dir, base["sft"], base["pairs"]),
            "kto": lambda: run_kto(point_cfg, point_dir, base["sft"], base["pairs"]),
            "ppo": lambda: run_ppo(point_cfg, point_dir, base["paths"], base["sft"], base["rm"]),
            "grpo": lambda: run_grpo(point_cfg, point_dir, base["paths"], base["sft"], base["rm"])}  # fmt: skip
    trained = runs[spec.stage]() if spec.stage else None  # training first, with gradients
    tokenizer = load_tokenizer(str(base["sft"]))
    sft_model = load_causal_lm(str(base["sft"]), tokenizer).eval()
    rm = load_reward_model(str(base["rm"]), tokenizer).eval()
    prompts = read_jsonl(base["paths"]["eval_prompts"])
    common = dict(max_new_tokens=pcfg.max_new_tokens, batch_size=64, seed=seed, gold_fn=base["gold"])
    with torch.no_grad():
        baseline = ev.evaluate_policy(sft_model, tokenizer, prompts, **common)["per_prompt_gold"]
        if method == "best_of_n":
            metrics = ev.best_of_n(sft_model, rm, tokenizer, prompts, n=int(value), baseline_gold=baseline, **common)
        else:
            model = sft_model if trained is None else load_causal_lm(str(trained), tokenizer).eval()
            metrics = ev.evaluate_policy(model, tokenizer, prompts, sft_model=sft_model, reward_model=rm,
                                         baseline_gold=None if method == "sft" else baseline, **common)  # fmt: skip
        curve = training_curve(point_dir / spec.stage, base, tokenizer, sft_model, rm, prompts, common) if (
            spec.stage in CURVE_STAGES) else None  # fmt: skip
    keep = ("gold_reward", "gold_reward_sem", "rm_reward", "kl_to_sft", "win_rate_vs_sft", "response_length")
    out = {"method": method, "strength": value, "seed": seed, **{k: metrics[k] for k in keep if k in metrics}}
    if curve is not None:
        out["curve"] = curve
    return out


def training_curve(stage: Path, base: dict, tokenizer, sft_model, rm, prompts, common: dict) -> list[dict]:
    """Gold reward, proxy (reward-model) reward and exact KL to SFT of the policy at each checkpoint of a PPO or
    GRPO run (from the SFT policy at step 0): the over-optimisation curve of the point."""
    from . import evaluate as ev
    from .checkpoint import checkpoint_step, list_checkpoints, read_weights
    from .models import load_causal_lm

    policy = load_causal_lm(str(base["sft"]), tokenizer).eval()
    curve = []
    for step, ckpt in [(0, None)] + [(checkpoint_step(p), p) for p in list_checkpoints(stage)]:
        if ckpt is not None:
            policy.load_state_dict(read_weights(ckpt)["policy"])
        metrics = ev.evaluate_policy(policy, tokenizer, prompts, sft_model=sft_model, reward_model=rm, **common)
        curve.append({"step": step, **{k: metrics[k] for k in ("gold_reward", "rm_reward", "kl_to_sft")}})
    return curve


def train(cfg: FrontierConfig, resume: bool = True) -> dict:
    """Run the sweep (resuming unless ``resume=False``), then write ``frontier.json``, ``frontier.md`` and
    ``frontier.png``; returns the summary and the conclusions."""
    import shlex

    from tqdm.auto import tqdm

    from .config import load_config
    from .errors import UserError
    from .pipeline import PipelineConfig, run_rm, run_sft
    from .pipeline_data import build_data, gold_function, sample_pairs
    from .train import seed_everything

    cfg.validate()
    out = Path(cfg.output_dir)
    if not resume and out.exists():
        shutil.rmtree(out)
    # GRPO learns from the reward model, as PPO and best-of-n do: every method sees only the labelled pairs
    overrides = shlex.split(PRESETS[cfg.preset]) + ["grpo_reward=rm"] + shlex.split(cfg.pipeline_args)
    overrides += [f"model={cfg.model}", f"device={cfg.device}", f"num_threads={cfg.num_threads}",
                  f"progress={cfg.progress}", f"output_dir={out / 'base'}", "seed=0"]  # fmt: skip
    try:
        pcfg = load_config(PipelineConfig, None, overrides)
    except ValueError as err:
        raise UserError(f"pipeline_args: {err}") from None
    settings = {k: getattr(cfg, k) for k in SWEEP_SETTINGS}  # what every point depends on besides its own values
    recorded = out / "sweep.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        old = json.loads(recorded.read_text())
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        raise UserError(f"{out} holds a sweep with other settings ({changed}): its points would not compare; "
                        "use --restart or another output_dir")  # fmt: skip
    if pcfg.gold is None and (pcfg.sft_dataset or pcfg.prompt_dataset or pcfg.eval_prompt_dataset):
        raise UserError("a frontier measures gold reward: with your datasets, name your task's gold reward "
                        "(pipeline_args='gold=module:function ...')")  # fmt: skip
    seed_everything(0, cfg.num_threads)
    base_dir = out / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(recorded, json.dumps(settings, indent=2))
    paths = build_data(pcfg, base_dir)
    sft_dir = run_sft(pcfg, base_dir, paths)
    pairs = sample_pairs(pcfg, base_dir, paths, sft_dir)
    base = {"paths": paths, "sft": sft_dir, "pairs": pairs, "rm": run_rm(pcfg, base_dir, sft_dir, pairs),
            "gold": gold_function(pcfg, paths)}  # fmt: skip
    todo = [p for p in points(cfg) if not (out / "points" / point_name(*p) / "point.json").is_file()]
    bar = tqdm(total=len(points(cfg)), initial=len(points(cfg)) - len(todo), disable=not cfg.progress, desc="frontier")
    workers = cfg.workers or auto_workers(cfg.device, cfg.num_threads)
    if workers == 1 or len(todo) < 2:
        for method, value, seed in todo:
            bar.set_postfix_str(point_name(method, value, seed))
            finish_point(cfg, base, pcfg, method, value, seed, out)
            bar.update()
    else:
        run_in_workers(cfg, base, pcfg, todo, out, bar, workers)
    bar.close()
    records = [json.loads((out / "points" / point_name(*p) / "point.json").read_text()) for p in points(cfg)]
    summary = summarise(records)
    result = {"points": records, "summary": summary,
              **conclusions(summary, cfg.method_list(), cfg.grid("budgets")), "not_swept": NOT_SWEPT}  # fmt: skip
    write_atomically(out / "frontier.json", json.dumps(result, indent=2))
    write_outputs(result, out)
    print(f"rlhf frontier: {len(records)} points; report: {out / 'frontier.md'}")
    return result


def finish_point(cfg: FrontierConfig, base: dict, pcfg, method: str, value: float, seed: int, out: Path) -> None:
    """Run one point and write its ``point.json`` (atomically, last), with its wall time."""
    point_dir = out / "points" / point_name(method, value, seed)
    start = time.perf_counter()
    record = run_point(cfg, base, pcfg, method, value, seed, point_dir)
    record["seconds"] = round(time.perf_counter() - start, 1)  # training and evaluation of the point
    point_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(point_dir / "point.json", json.dumps(record, indent=2))


def _worker_point(cfg: FrontierConfig, base: dict, pcfg, method: str, value: float, seed: int, out: Path) -> None:
    """A point in a worker process (spawned: a fresh interpreter): its threads, the run's gold reward, the point."""
    import torch

    from .pipeline_data import gold_function

    torch.set_num_threads(pcfg.num_threads)
    finish_point(cfg, {**base, "gold": gold_function(pcfg, base["paths"])}, pcfg, method, value, seed, out)


def auto_workers(device: str, num_threads: int) -> int:
    """``workers=0``: two processes on a CPU with two or more threads (measured on 2 cores: the default sweep in
    22 min 39 s with two single-thread workers, 29 min 4 s with one two-thread process), else one (on a GPU each
    worker would hold its own copy of every model)."""
    import torch

    from .models import resolve_device

    threads = num_threads or torch.get_num_threads()
    return 2 if resolve_device(device).type == "cpu" and threads >= 2 else 1


def run_in_workers(cfg: FrontierConfig, base: dict, pcfg, todo: list, out: Path, bar, workers: int) -> None:
    """``workers`` processes run the points of ``todo``; each writes its own ``point.json``. The first failure
    stops the sweep once the running points end (their results are kept; the rest run on resume)."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch

    threads = max(1, (cfg.num_threads or torch.get_num_threads()) // workers)
    wcfg = dataclasses.replace(pcfg, num_threads=threads, progress=False)  # one bar: the sweep's
    plain = {k: v for k, v in base.items() if k != "gold"}  # the gold function is rebuilt in each worker
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_worker_point, cfg, plain, wcfg, *p, out) for p in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            bar.update(len(done))
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                raise failed[0].exception()


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` by one rename: a reader or a killed run never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_outputs(result: dict, out: Path) -> None:
    """``frontier.md`` (the points' means and the conclusions), ``frontier.png`` and ``overoptimisation.png``."""

    def fmt(e, key):
        return "-" if key not in e else f"{e[key]:.3f} ± {e.get(key + '_sem', 0.0):.3f}"

    lines = ["# Reward-KL frontier", "",
             "| method | strength | seeds | gold reward | KL to SFT | RM reward | win rate vs SFT |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for e in result["summary"]:
        lines.append(f"| {e['method']} | {e['strength']:g} | {e['seeds']} | {fmt(e, 'gold_reward')} | "
                     f"{fmt(e, 'kl_to_sft')} | {fmt(e, 'rm_reward')} | {fmt(e, 'win_rate_vs_sft')} |")  # fmt: skip
    lines += ["", "Best mean gold reward within each KL budget (nats per sequence):", ""]
    for method, budgets in result["best_within_budget"].items():
        name = METHODS[method].strength
        cells = [f"{b}: " + ("-" if e is None else f"{e['gold_reward']:.3f} ({name} {e['strength']:g})")
                 for b, e in budgets.items()]  # fmt: skip
        lines.append(f"- {method}: " + "; ".join(cells))
    pairs = result["dominates"]
    lines += ["", "Dominance within the seeds' error: " + (", ".join(f"{a} over {b}" for a, b in pairs) or "none")
              + " (never claimed over best-of-n, whose KL is an upper bound)"]  # fmt: skip
    lines += ["", "Not swept:", "", *(f"- {name}: {why}" for name, why in result["not_swept"].items())]
    write_atomically(out / "frontier.md", "\n".join(lines) + "\n")
    for name, figure in (
        ("frontier.png", frontier_figure(result)),
        ("overoptimisation.png", overoptimisation_figure(result)),
    ):
        if figure is not None:  # atomically, as the JSON and Markdown
            tmp = out / (name + ".tmp")
            figure.savefig(tmp, format="png", dpi=100)
            tmp.replace(out / name)


def frontier_figure(result: dict):
    """Gold reward against exact KL to SFT: one curve per method (its points by KL), error bars over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method in dict.fromkeys(e["method"] for e in result["summary"]):
        curve = sorted((e for e in result["summary"] if e["method"] == method), key=lambda e: e["kl_to_sft"])
        kl, gold = [e["kl_to_sft"] for e in curve], [e["gold_reward"] for e in curve]
        sem = [e.get("gold_reward_sem", 0.0) for e in curve]
        ax.errorbar(kl, gold, yerr=sem, marker="o", capsize=3, label=method)
    ax.set_xlabel("exact KL to SFT (nats per sequence; best-of-n: analytic bound)")
    ax.set_ylabel("gold reward (mean ± s.e. over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def overoptimisation_figure(result: dict):
    """Gold (left) and proxy (right) reward against exact KL along every PPO and GRPO point's run; None without
    such points."""
    from matplotlib.figure import Figure

    curves = [p for p in result["points"] if p.get("curve")]
    if not curves:
        return None
    fig = Figure(figsize=(10, 4))
    gold_ax, proxy_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for p in curves:
        kl = [c["kl_to_sft"] for c in p["curve"]]
        label = f"{p['method']} {METHODS[p['method']].strength}={p['strength']:g} seed {p['seed']}"
        gold_ax.plot(kl, [c["gold_reward"] for c in p["curve"]], marker="o", label=label)
        proxy_ax.plot(kl, [c["rm_reward"] for c in p["curve"]], marker="o", label=label)
    for ax, name in ((gold_ax, "gold reward"), (proxy_ax, "proxy (reward-model) reward")):
        ax.set_xlabel("exact KL to SFT (nats per sequence)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    proxy_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
