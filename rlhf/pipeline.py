"""The whole recipe in one command: SFT -> reward model -> PPO, SFT -> DPO, SFT -> KTO and SFT -> GRPO, then
evaluation and a report.

``rlhf pipeline`` with no arguments runs the built-in task (:mod:`rlhf.task`) on the built-in tiny Llama: it
writes the task's data, fine-tunes on mixed-quality demonstrations, samples response pairs from the SFT policy
and labels them with a Bradley-Terry draw on the task's programmatic gold reward (noisy labels, as human labels
are), trains a reward model on them, runs PPO against that reward model, DPO on the same pairs and KTO on the
same labels turned unpaired (each pair a desirable and an undesirable example), and evaluates SFT, PPO, DPO, KTO
and best-of-n sampling from SFT on held-out prompts: gold reward, reward-model reward, exact KL to
the SFT policy, response length, win rate against SFT. GRPO trains on the gold reward itself as a verifiable reward
(``grpo_reward=rm``: on the learned reward model) and is evaluated beside them. The report (``report.md``,
``results.json``, PNG plots) goes to ``output_dir``.

``task=qa`` runs SFT -> GRPO on the built-in verifiable task (:mod:`rlhf.qa_task`: questions with one exact answer)
and reports held-out pass@1 and pass@k of SFT and GRPO.

Every stage writes into its own directory and a ``DONE`` marker at its end, so re-running the command skips the
finished stages and resumes an interrupted one from its checkpoints; ``--restart`` starts over. Your own model,
datasets or reward model replace the built-in ones through the config; ``gold=module:function`` gives your task's
gold reward (it labels the sampled pairs, is GRPO's reward and the report's gold metric; without it, your prompts
need a preference dataset and the gold-reward metrics drop out).
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig, _opt, load_config, validate_fields
from .grpo_core import GRPOConfig
from .judges import DEFAULT_RUBRIC
from .pipeline_data import (  # noqa: F401  (is_done ... read_jsonl re-exported for pipeline_eval)
    best_of_n_rows,
    build_data,
    is_done,
    mark_done,
    read_done,
    read_jsonl,
    sample_pairs,
    write_jsonl,
)

STAGE_NAMES = ("sft", "pairs", "rm", "ppo", "dpo", "kto", "rs", "grpo", "eval")
STAGE_CONFIGS = {
    "sft": SFTConfig,
    "rm": RewardConfig,
    "ppo": PPOConfig,
    "dpo": DPOConfig,
    "kto": KTOConfig,
    "grpo": GRPOConfig,
}
# The pipeline's GRPO update on the tiny model (stage defaults: lr 1e-5, one update per batch): 8 optimizer steps
# per iteration (2 passes x 4 mini-batches of 16 samples). With one update per batch at lr 2e-5 the gold reward
# moved from -0.10 to -0.02 in 30 iterations; a fresh Adam's first steps move every weight by ~lr whatever the
# gradient, so a large lr with few updates mostly adds noise (lr 1e-3 wrecked the SFT policy in one step).
GRPO_UPDATE = dict(lr=5e-5, num_iterations=2, mini_batch_size=16)
TASK_DEFAULTS = {  # task -> the defaults of the options left at None
    "reviews": {"sft_steps": 300, "grpo_steps": 30, "eval_prompts": 128, "grpo_options": {}},
    # the qa task's SFT needs more steps to copy numbers and words; its 0/1 reward leaves many groups without
    # signal, which dynamic sampling replaces (measured: benchmarks/results/cpu_2core_pipeline_qa.md)
    # held out: 256 of the task's 348 distinct eval questions; 200 GRPO iterations: +0.077 +- 0.017 held-out pass@1
    # (100: +0.048 +- 0.015)
    "qa": {"sft_steps": 1000, "grpo_steps": 200, "eval_prompts": 256, "grpo_options": {"dynamic_sampling": True}},
}
TASKS = {  # task -> its default stages
    "reviews": "sft,pairs,rm,ppo,dpo,kto,rs,grpo,eval",
    "qa": "sft,grpo,eval",
}
USER_DATA = {  # option -> the kind of data it holds
    "sft_dataset": "sft",
    "prompt_dataset": "prompt",
    "eval_prompt_dataset": "prompt",
    "preference_dataset": "preference",
}


@dataclass
class PipelineConfig:
    """The whole pipeline: SFT -> RM -> PPO and SFT -> DPO on the built-in task, evaluated and reported."""

    output_dir: str = _opt("runs/pipeline", "directory of the stages, the data and the report")
    task: str = _opt("reviews", "built-in task: reviews (gold reward, RM, PPO, DPO, GRPO) | qa (verifiable: SFT, GRPO)")
    model: str = _opt("builtin", "initial model: hub name, local path, 'builtin' or 'builtin-small'")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    seed: int = _opt(0, "seed of the data, every stage and the evaluation")
    num_threads: int = _opt(0, "torch CPU threads (0 = torch default)")
    sft_dataset: str | None = _opt(None, "SFT data (None = the built-in task's mixed-quality demonstrations)")
    prompt_dataset: str | None = _opt(None, "PPO/pair-sampling prompts (None = the built-in task's prompts)")
    eval_prompt_dataset: str | None = _opt(None, "held-out prompts (None = the built-in task's held-out prompts)")
    preference_dataset: str | None = _opt(
        None, "preference pairs for RM and DPO (None = sampled from the SFT policy, labelled by the gold reward)"
    )
    reward_model: str | None = _opt(None, "a trained RewardModel directory (None = train one on the pairs)")
    gold: str | None = _opt(
        None, "your task's gold reward, module:function with the signature of a GRPO reward function (fn(prompts, "
        "completions, **columns) -> numbers; each prompt row's other columns passed): labels the sampled pairs and "
        "rankings, is GRPO's reward and the report's gold reward (None = the built-in task's)")  # fmt: skip
    sft_examples: int = _opt(2048, "built-in task: SFT demonstrations")
    train_prompts: int = _opt(512, "built-in task: prompts for pair sampling and PPO")
    eval_prompts: int | None = _opt(None, "built-in task: held-out prompts for the evaluation (None = the task's: "
                                    + ", ".join(f"{t}: {d['eval_prompts']}" for t, d in TASK_DEFAULTS.items())
                                    + "; qa: distinct questions)")  # fmt: skip
    label_beta: float = _opt(4.0, "built-in task: Bradley-Terry sharpness of the gold labels (higher = less noise)")
    labels: str = _opt(
        "gold", "training pairs labelled by: gold (a Bradley-Terry draw on the gold reward) | ai (judge)"
    )
    judge: str | None = _opt(None, "labels=ai: the judge (see rlhf label --help): llm:<model>, an RM directory, "
                             "module:function or gold")  # fmt: skip
    rubric: str = _opt(DEFAULT_RUBRIC, "labels=ai with an llm judge: what makes an answer better")
    max_new_tokens: int = _opt(24, "longest sampled response (pairs, PPO and evaluation)")
    best_of_n: int = _opt(4, "n of the best-of-n baseline (0 = skip)")
    sft_steps: int | None = _opt(None, "SFT optimizer steps (None = the task's: " + ", ".join(
        f"{t}: {d['sft_steps']}" for t, d in TASK_DEFAULTS.items()) + ")")  # fmt: skip
    rm_steps: int = _opt(200, "reward-model optimizer steps")
    rm_k: int = _opt(
        2,
        "responses per prompt ranked for the reward model: 2 = the pairs; K > 2 = K samples of train_prompts * 2 / K "
        "prompts (as many labelled responses) ranked by a Plackett-Luce draw on the gold reward",
    )
    ppo_steps: int = _opt(100, "PPO iterations (rollout + update)")
    ptx_coef: float = _opt(
        0.0,
        "> 0: also train PPO-ptx (policy 'ppo-ptx': PPO plus ptx_coef x the LM loss on the SFT data) to compare "
        "the alignment tax (NLL on held-out SFT data) with and without",
    )
    dpo_steps: int = _opt(200, "DPO optimizer steps")
    kto_steps: int = _opt(200, "KTO optimizer steps (32 examples each: the labels of 16 pairs, as a DPO step)")
    rounds: int = _opt(1, "DPO and KTO rounds: each samples pairs from the current policy, labels them and trains on")
    rs_steps: int = _opt(100, "rejection sampling: SFT steps on the best of best_of_n SFT samples per prompt")
    grpo_steps: int | None = _opt(None, "GRPO iterations of 8 prompts x 8 samples (None = the task's: " + ", ".join(
        f"{t}: {d['grpo_steps']}" for t, d in TASK_DEFAULTS.items()) + ")")  # fmt: skip
    grpo_reward: str = _opt(
        "gold", "GRPO's reward: gold (the task's verifiable reward) | rm (the learned reward model)"
    )
    pass_k: int = _opt(8, "task=qa: samples per held-out question for pass@1 and pass@k")
    sft_args: str = _opt("", "extra SFT options, 'key=value key=value' (see rlhf sft --help)")
    rm_args: str = _opt("", "extra reward-model options (see rlhf rm --help)")
    ppo_args: str = _opt("", "extra PPO options (see rlhf ppo --help)")
    dpo_args: str = _opt("", "extra DPO options (see rlhf dpo --help)")
    kto_args: str = _opt("", "extra KTO options (see rlhf kto --help)")
    grpo_args: str = _opt("", "extra GRPO options (see rlhf grpo --help)")
    stages: str | None = _opt(None, "stages to run, comma-separated, in order (None = the task's: " + "; ".join(
        f"{t}: {s}" for t, s in TASKS.items()) + ")")  # fmt: skip
    progress: bool = _opt(True, "show progress bars")

    def validate(self) -> None:
        validate_fields(self, required=("output_dir", "model"))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.grpo_reward not in ("gold", "rm"):
            raise ValueError(f"grpo_reward must be gold or rm; got {self.grpo_reward!r}")
        if self.task == "qa" and set(self.stage_list()) & {"pairs", "rm", "ppo", "dpo", "kto", "rs"}:
            raise ValueError("task=qa runs the stages sft, grpo and eval (no preference pairs or reward model)")
        unknown = [s for s in self.stage_list() if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; choose from {', '.join(STAGE_NAMES)}")
        for name in ("sft_examples", "train_prompts", "eval_prompts", "max_new_tokens", "sft_steps", "grpo_steps",
                     "pass_k"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.labels not in ("gold", "ai"):
            raise ValueError(f"labels must be gold or ai; got {self.labels!r}")
        if self.labels == "ai" and (not self.judge or self.preference_dataset):
            raise ValueError("labels=ai needs judge= and labels the sampled pairs (not a preference_dataset)")
        if self.rounds < 1 or (self.rounds > 1 and self.preference_dataset):
            raise ValueError(f"rounds must be >= 1, and > 1 only with sampled pairs (no preference_dataset); got "
                             f"{self.rounds}")  # fmt: skip
        if "rs" in self.stage_list() and self.best_of_n < 2:
            raise ValueError("stage rs (rejection sampling) needs best_of_n >= 2")
        if self.ptx_coef < 0:
            raise ValueError(f"ptx_coef must be >= 0; got {self.ptx_coef}")
        if self.rm_k < 2:
            raise ValueError(f"rm_k must be >= 2; got {self.rm_k}")
        if self.rm_k > 2 and self.preference_dataset:
            raise ValueError("rm_k > 2 ranks samples by the gold reward; it cannot use preference_dataset")
        user_prompts = self.prompt_dataset or self.eval_prompt_dataset
        sampled_pairs = set(self.stage_list()) & {"pairs", "rm", "dpo", "kto"} and not self.preference_dataset
        if user_prompts and sampled_pairs and not self.gold and self.labels == "gold":
            raise ValueError("pairs sampled for your prompts need a gold reward to label them: set gold=module:function"
                             ", labels=ai with a judge, or preference_dataset")  # fmt: skip
        if self.gold is not None and (":" not in self.gold or self.task == "qa"):
            raise ValueError(f"gold must be module:function (and task=qa keeps its own exact-match reward); got "
                             f"{self.gold!r}")  # fmt: skip
        if self.gold is not None:  # importable now, not after the SFT stage (rows and columns come later)
            from .rewards import gold_function

            gold_function(self.gold)
        if self.label_beta <= 0:
            raise ValueError(f"label_beta must be > 0; got {self.label_beta}")
        needs_rm = "ppo" in self.stage_list() or ("grpo" in self.stage_list() and self.grpo_reward == "rm")
        needs_rm = needs_rm or ("rs" in self.stage_list() and self.labels == "gold")
        if needs_rm and "rm" not in self.stage_list() and not self.reward_model:
            raise ValueError(
                "stages ppo, rs and grpo_reward=rm need a reward model: add 'rm' to stages or set reward_model"
            )
        for stage, cls in STAGE_CONFIGS.items():  # now, not when the stage starts minutes later
            try:
                load_config(cls, None, shlex.split(getattr(self, f"{stage}_args")))
            except ValueError as err:
                raise ValueError(f"{stage}_args: {err}") from None

    def task_default(self, name: str):
        """Option ``name`` (``sft_steps``, ``grpo_steps``, ``eval_prompts``) or, left at None, the task's default."""
        value = getattr(self, name, None)
        return TASK_DEFAULTS[self.task][name] if value is None else value

    def stage_list(self) -> list[str]:
        return [s.strip() for s in (self.stages or TASKS[self.task]).split(",") if s.strip()]


# ------------------------------------------------------------------------------------------------ stage plumbing


def stage_config(cls, cfg: PipelineConfig, extra: str, **values):
    """A stage's config from the pipeline's shared values, the stage's defaults here, then the user's extras."""
    shared = dict(device=cfg.device, seed=cfg.seed, num_threads=cfg.num_threads, progress=cfg.progress)
    overrides = [f"{k}={v}" for k, v in {**shared, **values}.items()] + shlex.split(extra)
    return load_config(cls, None, overrides)


def check_user_data(cfg: PipelineConfig) -> None:
    """Load the user's datasets and check their columns, before anything is written: a UserError names the file
    and line. (Row contents are checked by each stage when it tokenises them.)"""
    from .data import detect_format, load_rows

    for option, kind in USER_DATA.items():
        if getattr(cfg, option):
            detect_format(load_rows(str(getattr(cfg, option))), kind)


# ------------------------------------------------------------------------------------------------------ stages


def run_sft(cfg: PipelineConfig, out: Path, paths: dict) -> Path:
    from . import sft
    from .config import SFTConfig

    stage = out / "sft"
    if not is_done(stage):
        scfg = stage_config(
            SFTConfig,
            cfg,
            cfg.sft_args,
            model=cfg.model,
            dataset=paths["sft"],
            output_dir=stage,
            max_steps=cfg.task_default("sft_steps"),
            lr=1e-3,
            batch_size=16,
            warmup_ratio=0.05,
            eval_steps=0,
            save_steps=100,
            logging_steps=10,
        )
        mark_done(stage, sft.train(scfg, resume=True))
    return stage / "final"


def run_rm(cfg: PipelineConfig, out: Path, sft_dir: Path, pairs: dict) -> Path:
    from . import reward
    from .config import RewardConfig

    if cfg.reward_model:
        return Path(cfg.reward_model)
    stage = out / "rm"
    if not is_done(stage):
        held_out = dict(eval_dataset=pairs["eval"]) if pairs["eval"] else {}
        rcfg = stage_config(
            RewardConfig,
            cfg,
            cfg.rm_args,
            model=sft_dir,
            dataset=pairs.get("ranked", pairs["train"]),
            output_dir=stage,
            max_steps=cfg.rm_steps,
            lr=3e-4,
            batch_size=16,
            warmup_ratio=0.05,
            eval_steps=0,
            save_steps=100,
            **held_out,
        )
        mark_done(stage, reward.train(rcfg, resume=True))
    return stage / "final"


def run_ppo(cfg: PipelineConfig, out: Path, paths: dict, sft_dir: Path, rm_dir: Path, *, ptx: bool = False) -> Path:
    """PPO against the reward model; with ``ptx``, PPO-ptx (``ptx_coef`` x the LM loss on the SFT data)."""
    from . import ppo
    from .config import PPOConfig

    stage = out / ("ppo_ptx" if ptx else "ppo")
    extra = dict(ptx_coef=cfg.ptx_coef, ptx_dataset=paths["sft"]) if ptx else {}
    if not is_done(stage):
        pcfg = stage_config(
            PPOConfig,
            cfg,
            cfg.ppo_args,
            model=sft_dir,
            reward_model=rm_dir,
            dataset=paths["prompts"],
            output_dir=stage,
            max_steps=cfg.ppo_steps,
            max_new_tokens=cfg.max_new_tokens,
            eval_fraction=0.0,
            eval_steps=0,
            save_steps=25,
            logging_steps=5,
            **extra,
        )
        mark_done(stage, ppo.train(pcfg, resume=True))
    return stage / "final"


def run_dpo(cfg: PipelineConfig, out: Path, sft_dir: Path, pairs: dict, *, round_: int = 1) -> Path:
    """DPO from ``sft_dir`` (round 1: SFT; round r: round r-1's policy, also the reference) on ``pairs``."""
    from . import dpo
    from .config import DPOConfig

    stage = out / ("dpo" if round_ == 1 else f"dpo_round{round_}")
    if not is_done(stage):
        held_out = dict(eval_dataset=pairs["eval"]) if pairs["eval"] else {}
        dcfg = stage_config(
            DPOConfig,
            cfg,
            cfg.dpo_args,
            model=sft_dir,
            dataset=pairs["train"],
            output_dir=stage,
            max_steps=cfg.dpo_steps,
            batch_size=16,
            eval_steps=0,
            save_steps=100,
            **held_out,
        )
        mark_done(stage, dpo.train(dcfg, resume=True))
    return stage / "final"


def run_kto(cfg: PipelineConfig, out: Path, sft_dir: Path, pairs: dict, *, round_: int = 1) -> Path:
    """KTO on the DPO pairs turned unpaired (the chosen response desirable, the rejected one undesirable)."""
    from . import kto

    stage = out / ("kto" if round_ == 1 else f"kto_round{round_}")
    if not is_done(stage):
        held_out = dict(eval_dataset=pairs["eval"]) if pairs["eval"] else {}
        kcfg = stage_config(
            KTOConfig,
            cfg,
            cfg.kto_args,
            model=sft_dir,
            dataset=pairs["train"],
            output_dir=stage,
            max_steps=cfg.kto_steps,
            batch_size=32,
            eval_steps=0,
            save_steps=100,
            **held_out,
        )
        mark_done(stage, kto.train(kcfg, resume=True))
    return stage / "final"


def iterate(cfg: PipelineConfig, out: Path, paths: dict, sft_dir: Path, pairs: dict, name: str, run_stage) -> dict:
    """``rounds`` of sample -> label -> train for DPO or KTO: round 1 on the pairs sampled from SFT, round r on
    pairs sampled from round r-1's policy (labelled the same way) and trained from it. The policies by name:
    ``name``, ``name (round 2)``, ..."""
    policies, current, round_pairs = {}, sft_dir, pairs
    for r in range(1, cfg.rounds + 1):
        if r > 1:
            round_pairs = sample_pairs(cfg, out, paths, current, round_=r, method=name)
        current = run_stage(cfg, out, current, round_pairs, round_=r)
        policies[name if r == 1 else f"{name} (round {r})"] = current
    return policies


def run_rejection_sampling(cfg: PipelineConfig, out: Path, paths: dict, sft_dir: Path, rm_dir: Path | None) -> Path:
    """Rejection-sampling fine-tuning: SFT from the SFT policy on the best of ``best_of_n`` samples per training
    prompt, chosen by the reward model (or the ``labels=ai`` judge)."""
    from . import sft
    from .judges import build_judge
    from .models import resolve_device

    stage = out / "rs"
    if not is_done(stage):
        spec = cfg.judge if cfg.labels == "ai" else str(rm_dir) if rm_dir else None
        if spec is None:
            raise ValueError("stage rs needs a reward model (stage rm or reward_model=) or labels=ai with a judge")
        judge = build_judge(spec, rubric=cfg.rubric, device=resolve_device(cfg.device))
        stage.mkdir(parents=True, exist_ok=True)
        data = best_of_n_rows(cfg, stage / "best_of_n.jsonl", paths, sft_dir, judge)
        scfg = stage_config(
            SFTConfig, cfg, cfg.sft_args, model=sft_dir, dataset=data, output_dir=stage, max_steps=cfg.rs_steps,
            lr=2e-4, batch_size=16, warmup_ratio=0.05, eval_fraction=0.0, eval_steps=0, save_steps=50,
            logging_steps=10,
        )  # fmt: skip
        mark_done(stage, sft.train(scfg, resume=True))
    return stage / "final"


def run_grpo(cfg: PipelineConfig, out: Path, paths: dict, sft_dir: Path, rm_dir: Path | None) -> Path:
    from . import grpo

    stage = out / "grpo"
    if not is_done(stage):
        gcfg = stage_config(
            GRPOConfig,
            cfg,
            cfg.grpo_args,
            model=sft_dir,
            reward_funcs=rm_dir if cfg.grpo_reward == "rm" else cfg.gold or "gold",
            dataset=paths["prompts"],
            output_dir=stage,
            max_steps=cfg.task_default("grpo_steps"),
            max_completion_length=cfg.max_new_tokens,
            **GRPO_UPDATE,
            **TASK_DEFAULTS[cfg.task]["grpo_options"],
            eval_fraction=0.0,
            eval_steps=0,
            save_steps=10,
            logging_steps=5,
        )
        mark_done(stage, grpo.train(gcfg, resume=True))
    return stage / "final"


def train(cfg: PipelineConfig, resume: bool = True) -> dict:
    """Run the configured stages; ``resume=False`` (``--restart``) deletes earlier stage outputs first. Ends by
    printing a short summary: the policies' results and where the report and the trained models are."""
    from .distributed import launched_world
    from .errors import UserError
    from .report import summary
    from .train import seed_everything

    if launched_world() > 1:
        raise UserError(
            "the pipeline runs on one process; under torchrun run its stages (rlhf sft|rm|dpo|kto|ppo|grpo) one by one"
        )
    t0 = time.perf_counter()
    check_user_data(cfg)
    out = Path(cfg.output_dir)
    if not resume and out.exists():
        rounds = [p.name for p in out.glob("*_round*")]
        for name in ("data", *STAGE_NAMES, "ppo_ptx", *rounds, "results.json", "report.md", "report.png"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, cfg.num_threads)
    stages = cfg.stage_list()
    paths = build_data(cfg, out)
    sft_dir = run_sft(cfg, out, paths) if "sft" in stages else Path(cfg.model)
    needs_pairs = {"pairs", "rm", "dpo", "kto"} & set(stages)
    pairs = sample_pairs(cfg, out, paths, sft_dir) if needs_pairs else {}
    rm_dir = run_rm(cfg, out, sft_dir, pairs) if "rm" in stages or cfg.reward_model else None
    policies = {"sft": sft_dir}
    if "ppo" in stages:
        policies["ppo"] = run_ppo(cfg, out, paths, sft_dir, rm_dir)
        if cfg.ptx_coef > 0:
            policies["ppo-ptx"] = run_ppo(cfg, out, paths, sft_dir, rm_dir, ptx=True)
    for name, run_stage in (("dpo", run_dpo), ("kto", run_kto)):
        if name in stages:
            policies.update(iterate(cfg, out, paths, sft_dir, pairs, name, run_stage))
    if "rs" in stages:
        policies["rs"] = run_rejection_sampling(cfg, out, paths, sft_dir, rm_dir)
    if "grpo" in stages:
        policies["grpo"] = run_grpo(cfg, out, paths, sft_dir, rm_dir)
    results = {}
    if "eval" in stages:
        from .pipeline_eval import evaluate_qa_stage, evaluate_stage

        if cfg.task == "qa":
            results = evaluate_qa_stage(cfg, out, paths, policies)
        else:
            results = evaluate_stage(cfg, out, paths, policies, rm_dir, pairs)
    trained = {  # the rounds and ppo-ptx with their stage
        name: path
        for name, path in {"sft": sft_dir, "rm": rm_dir, **policies}.items()
        if name.split(" ")[0].split("-")[0] in stages
    }
    if cfg.reward_model:  # the user's, not trained here
        trained.pop("rm", None)
    print(summary(results, out, trained, time.perf_counter() - t0))
    return results
