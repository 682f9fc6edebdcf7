"""Training configs: dataclasses with a help string per field, loaded from YAML plus `key=value` overrides.

`load_config(SFTConfig, "sft.yaml", ["lr=3e-4", "tokenizer=None"])` reads the file, applies the overrides,
converts every value by the field's annotation and calls `validate()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_kernels import AGG_MODES, BACKENDS, DPO_LOSS_TYPES, KL_ESTIMATORS, RANK_LOSS_MODES
from rlhf_kernels.ops.dpo_loss import check_dpo_options
from rlhf_kernels.ops.kto_loss import check_kto_options

from .data import OVERLONG
from .distributed import MODES as DISTRIBUTED_MODES
from .models import DTYPES

PTX_HELP = {  # PPO-ptx (rlhf.ptx), options of PPO and GRPO
    "ptx_coef": "PPO-ptx: weight of the LM loss on ptx_dataset added to every policy update (0 = off)",
    "ptx_dataset": "PPO-ptx data (SFT format): a file, directory, hub name or builtin:sft",
    "ptx_batch_size": "PPO-ptx rows per policy update, over all processes",
}


def _opt(default: Any, text: str) -> Any:
    """A dataclass field with a default and its help string."""
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Options shared by every training stage."""

    # model
    model: str = _opt(
        "builtin", "hub name or local path; 'builtin' (~4M params) or 'builtin-small' = tiny Llama built locally"
    )
    tokenizer: str | None = _opt(None, "hub name or local path of the tokenizer (None = same as model)")
    trust_remote_code: bool = _opt(False, "allow custom model code from the hub")
    dtype: str = _opt("float32", "weight dtype: " + " | ".join(DTYPES))
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N (auto = cuda when available)")
    mixed_precision: str = _opt("auto", "auto (bf16 autocast on CUDA, off on CPU) | bf16 | no")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    lora_r: int = _opt(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = _opt(16.0, "LoRA scaling alpha")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_target_modules: str = _opt("all-linear", "LoRA target modules: 'all-linear' or comma-separated names")
    # data
    dataset: str = _opt("builtin:sft", "builtin:<kind>, a local file/directory or a hub dataset name")
    dataset_config: str | None = _opt(None, "hub dataset config name")
    split: str = _opt("train", "training split (slicing such as 'train[:90%]' allowed)")
    eval_dataset: str | None = _opt(None, "evaluation dataset (None = hold out eval_fraction of the training data)")
    eval_split: str | None = _opt(None, "evaluation split of eval_dataset (None = same as split)")
    eval_fraction: float = _opt(0.1, "fraction held out for evaluation when eval_dataset is None (0 = no eval)")
    max_length: int = _opt(256, "maximum tokens per row (prompt + response)")
    overlong: str = _opt("drop", "rows longer than max_length: " + " | ".join(OVERLONG))
    # optimisation
    batch_size: int = _opt(8, "rows per micro-batch (per process)")
    eval_batch_size: int = _opt(16, "rows per evaluation batch")
    grad_accum: int = _opt(
        1, "micro-batches per optimizer step per process; a step reads batch_size * grad_accum * processes rows"
    )
    epochs: int = _opt(1, "passes over the training data")
    max_steps: int = _opt(-1, "optimizer steps (> 0 overrides epochs; -1 = from epochs)")
    lr: float = _opt(1e-4, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    schedule: str = _opt("cosine", "learning-rate schedule after warmup: constant | linear | cosine")
    warmup_ratio: float = _opt(0.03, "fraction of the steps with linear warmup")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = no clipping)")
    seed: int = _opt(0, "random seed (model init, data order, dropout)")
    num_threads: int = _opt(0, "torch CPU threads (0 = torch default)")
    # processes (torchrun)
    distributed: str = _opt(
        "auto", "under torchrun: fsdp2 (shard) | ddp (replicate) | none; auto = fsdp2 with more than one process"
    )
    shard_frozen: bool = _opt(True, "fsdp2: shard the frozen models too (false = a full copy on every process)")
    # output
    output_dir: str = _opt("runs/train", "directory for checkpoints, metrics, plots and the final model")
    save_steps: int = _opt(50, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept on disk (0 = keep all)")
    logging_steps: int = _opt(10, "log training metrics every N steps")
    eval_steps: int = _opt(50, "evaluate every N steps (0 = only at the end)")
    tensorboard: bool = _opt(True, "write TensorBoard events (when tensorboard is installed)")
    plots: bool = _opt(True, "write one PNG per metric at the end")
    progress: bool = _opt(True, "show a progress bar")
    # kernels
    backend: str | None = _opt(None, "rlhf_kernels backend: " + " | ".join(BACKENDS) + " (None = best available)")
    chunk_size: int | None = _opt(None, "rows per chunk of the fused LM head (None = kernel default)")

    def validate(self) -> None:
        """Check types, choices and ranges; raise ValueError naming the first bad field."""
        validate_fields(self, required=("model", "dataset", "split", "output_dir"))


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: next-token loss on the responses."""

    dataset: str = _opt("builtin:sft", "builtin:sft, a local file/directory or a hub dataset name")
    output_dir: str = _opt("runs/sft", "directory for checkpoints, metrics, plots and the final model")


@dataclass
class RewardConfig(TrainConfig):
    """Reward model training on chosen/rejected pairs (Bradley-Terry) or on K ranked responses per prompt."""

    dataset: str = _opt("builtin:preference", "builtin:preference, a local file/directory or a hub dataset name")
    output_dir: str = _opt("runs/rm", "directory for checkpoints, metrics, plots and the final model")
    lr: float = _opt(5e-5, "peak learning rate")
    center_coef: float = _opt(0.0, "weight of the squared-reward penalty that keeps rewards centred near 0")
    rank_loss: str = _opt("pairwise", "loss on ranked responses: " + " | ".join(RANK_LOSS_MODES))
    score_margin: float = _opt(
        0.0, "ranked rows with scores: the margin of a pair is score_margin * (score_w - score_l) (0 = none)"
    )


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation on chosen/rejected pairs (the loss family of rlhf_kernels.dpo_loss)."""

    dataset: str = _opt("builtin:preference", "builtin:preference, a local file/directory or a hub dataset name")
    output_dir: str = _opt("runs/dpo", "directory for checkpoints, metrics, plots and the final model")
    lr: float = _opt(5e-5, "peak learning rate")
    beta: float = _opt(0.1, "DPO temperature beta (strength of the implicit KL to the reference)")
    loss_type: str = _opt("sigmoid", " | ".join(DPO_LOSS_TYPES))
    label_smoothing: float = _opt(0.0, "assumed label noise (sigmoid, robust, simpo)")
    simpo_gamma: float = _opt(0.0, "SimPO target reward margin gamma")
    average_log_prob: bool | None = _opt(None, "average sequence log-probs over tokens (None = per loss type)")
    ref_model: str | None = _opt(
        None, "reference model (None = a frozen copy of the initial policy, or the adapter-disabled base with LoRA)"
    )
    precompute_ref_logps: bool = _opt(
        False, "compute the reference log-probs in one pass before training; no reference model kept in memory"
    )

    def validate(self) -> None:
        super().validate()
        try:  # the loss's own rules, stated once in rlhf_kernels
            check_dpo_options(self.beta, self.loss_type, self.label_smoothing, self.simpo_gamma)
        except ValueError as e:
            raise ValueError(f"{e} (options beta, loss_type, label_smoothing, simpo_gamma)") from None


@dataclass
class KTOConfig(TrainConfig):
    """KTO on unpaired desirable/undesirable examples (prompt, completion, label; preference pairs are split)."""

    dataset: str = _opt(
        "builtin:preference", "unpaired (prompt, completion, label) or preference data; a file, directory or hub name"
    )
    output_dir: str = _opt("runs/kto", "directory for checkpoints, metrics, plots and the final model")
    lr: float = _opt(5e-5, "peak learning rate")
    beta: float = _opt(0.1, "KTO temperature beta (strength of the implicit KL to the reference)")
    desirable_weight: float = _opt(1.0, "lambda_D, weight of the desirable examples' loss")
    undesirable_weight: float = _opt(1.0, "lambda_U, weight of the undesirable examples' loss")
    ref_model: str | None = _opt(
        None, "reference model (None = a frozen copy of the initial policy, or the adapter-disabled base with LoRA)"
    )
    precompute_ref_logps: bool = _opt(
        False, "compute the reference log-probs in one pass before training; no reference model kept in memory"
    )

    def validate(self) -> None:
        super().validate()
        try:  # the loss's own rules, stated once in rlhf_kernels
            check_kto_options(self.beta, self.desirable_weight, self.undesirable_weight)
        except ValueError as e:
            raise ValueError(f"{e} (options beta, desirable_weight, undesirable_weight)") from None


@dataclass
class PPOConfig(TrainConfig):
    """PPO on prompts: sample, score with the reward model, KL-penalised GAE advantages, clipped updates."""

    dataset: str = _opt("builtin:prompt", "prompt dataset: builtin:prompt, a local file/directory or a hub name")
    output_dir: str = _opt("runs/ppo", "directory for checkpoints, metrics, plots and the final model")
    lr: float = _opt(1e-5, "peak learning rate (policy and value model)")
    reward_model: str = _opt("builtin", "reward model: a saved RewardModel directory ('builtin' = untrained, tests)")
    value_model: str | None = _opt(None, "value model to start from (None = the reward model)")
    ref_model: str | None = _opt(
        None, "reference model (None = a frozen copy of the initial policy, or the adapter-disabled base with LoRA)"
    )
    max_prompt_length: int = _opt(128, "prompts longer than this (tokens) are dropped or rejected (see overlong)")
    max_new_tokens: int = _opt(32, "longest sampled response")
    temperature: float = _opt(1.0, "sampling temperature (also applied to the log-probs used in the losses)")
    top_p: float = _opt(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = _opt(0, "top-k sampling (0 = off)")
    rollout_batch_size: int = _opt(
        16, "prompts sampled per PPO iteration, over all processes (one optimizer 'step' is one iteration)"
    )
    mini_batch_size: int = _opt(8, "sequences per PPO optimizer update, over all processes")
    generation_batch_size: int = _opt(
        0, "prompts per generate call and sampling seed (per process; 0 = batch_size); fixed across process counts"
    )
    ppo_epochs: int = _opt(4, "passes over each rollout batch")
    missing_eos_penalty: float | None = _opt(None, "subtracted from the score of responses that end without EOS")
    kl_coef: float = _opt(0.05, "initial coefficient of the per-token KL penalty")
    kl_estimator: str = _opt(
        "k1", "per-token KL in the reward: " + " | ".join(KL_ESTIMATORS) + " (k1: log-ratio of the sampled token)"
    )
    adaptive_kl: bool = _opt(False, "adapt kl_coef towards target_kl (proportional controller)")
    target_kl: float = _opt(6.0, "target sequence KL of the adaptive controller")
    kl_horizon: int = _opt(10000, "horizon (in sequences) of the adaptive controller")
    gamma: float = _opt(1.0, "GAE discount")
    lam: float = _opt(0.95, "GAE lambda")
    whiten_advantages: bool = _opt(True, "whiten advantages over the rollout batch")
    clip_range: float = _opt(0.2, "PPO ratio clip epsilon")
    clip_range_value: float = _opt(0.2, "value clip around the rollout values")
    vf_coef: float = _opt(0.1, "weight of the value loss")
    entropy_coef: float = _opt(0.0, "weight of the entropy bonus")
    agg: str = _opt("token-mean", "loss aggregation: " + " | ".join(AGG_MODES))
    ptx_coef: float = _opt(0.0, PTX_HELP["ptx_coef"])
    ptx_dataset: str = _opt("builtin:sft", PTX_HELP["ptx_dataset"])
    ptx_batch_size: int = _opt(8, PTX_HELP["ptx_batch_size"])


# Each list is read from the code that implements it (the kernels, the data and model loaders).
_CHOICES = {
    "dtype": tuple(DTYPES),
    "mixed_precision": ("auto", "bf16", "no"),
    "overlong": OVERLONG,
    "schedule": ("constant", "linear", "cosine"),
    "loss_type": DPO_LOSS_TYPES,
    "rank_loss": RANK_LOSS_MODES,
    "kl_estimator": KL_ESTIMATORS,
    "agg": AGG_MODES,
    "backend": BACKENDS,
    "distributed": DISTRIBUTED_MODES,
}

# field -> (predicate, rule stated in the error); None values (Optional fields) are not checked.
_RANGES = {
    "lora_r": (lambda v: v >= 0, ">= 0"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_length": (lambda v: v >= 2, ">= 2"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "grad_accum": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 or >= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "num_threads": (lambda v: v >= 0, ">= 0"),
    "save_steps": (lambda v: v >= 0, ">= 0"),
    "keep_checkpoints": (lambda v: v >= 0, ">= 0"),
    "logging_steps": (lambda v: v >= 1, ">= 1"),
    "eval_steps": (lambda v: v >= 0, ">= 0"),
    "chunk_size": (lambda v: v >= 1, ">= 1 or None"),
    "center_coef": (lambda v: v >= 0, ">= 0"),
    "ptx_coef": (lambda v: v >= 0, ">= 0"),
    "ptx_batch_size": (lambda v: v >= 1, ">= 1"),
    "score_margin": (lambda v: v >= 0, ">= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_prompt_length": (lambda v: v >= 1, ">= 1"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "rollout_batch_size": (lambda v: v >= 1, ">= 1"),
    "mini_batch_size": (lambda v: v >= 1, ">= 1"),
    "ppo_epochs": (lambda v: v >= 1, ">= 1"),
    "generation_batch_size": (lambda v: v >= 0, ">= 0"),
    "kl_coef": (lambda v: v >= 0, ">= 0"),
    "target_kl": (lambda v: v > 0, "> 0"),
    "kl_horizon": (lambda v: v >= 1, ">= 1"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_range": (lambda v: v > 0, "> 0"),
    "clip_range_value": (lambda v: v > 0, "> 0"),
    "vf_coef": (lambda v: v >= 0, ">= 0"),
    "entropy_coef": (lambda v: v >= 0, ">= 0"),
}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "~")


def validate_fields(cfg: Any, required: tuple[str, ...]) -> None:
    """Types, choices and ranges of a config's fields; ``required`` fields must not be empty."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        _check_type(f.name, getattr(cfg, f.name), hints[f.name])
    for name, choices in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) is not None and getattr(cfg, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    if hasattr(cfg, "device") and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    for name, (ok, rule) in _RANGES.items():
        value = getattr(cfg, name, None)
        if value is not None and not ok(value):
            raise ValueError(f"{name} must be {rule}; got {value!r}")
    for name in required:
        if not getattr(cfg, name):
            raise ValueError(f"{name} must not be empty")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); any other annotation -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    """`str | None` -> "str|None", `int` -> "int"."""
    base, optional = _split_optional(tp)
    return f"{base.__name__}|None" if optional else base.__name__


def _check_type(name: str, value: Any, tp: Any) -> None:
    """Raise ValueError when `value` does not have the annotated type (an int is accepted as a float)."""
    base, optional = _split_optional(tp)
    if value is None and optional:
        return
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    ok = ok or (base is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{name} must be {_type_name(tp)}; got {value!r} ({type(value).__name__})")


def convert_value(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value or an override string to the annotation `tp` of field `name`.

    bool accepts true/false/1/0/yes/no/on/off; `X | None` accepts None/null/~; numbers accept strings such as
    "1e-4". Raise ValueError naming the field when the value does not convert.
    """
    base, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ValueError(f"{name} must be {_type_name(tp)}, not None")
    try:
        return _CONVERTERS[base](value)
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"{name} must be {_type_name(tp)}; cannot convert {value!r}") from None


def _to_bool(value: Any) -> bool:
    """bool, 0/1, or a true/false/yes/no/on/off/1/0 string (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in _TRUE + _FALSE:
        raise ValueError(value)
    return text in _TRUE


def _to_int(value: Any) -> int:
    """int, an integral float, or a string such as "16" or "1e3" (bools are refused)."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value)
        except ValueError:
            value = float(value)  # "1e3" -> 1000.0, checked below
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(value)


def _to_float(value: Any) -> float:
    """int, float, or a string such as "1e-4" (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value.strip() if isinstance(value, str) else value)


def _to_str(value: Any) -> str:
    """str, or a YAML number read as text (model: 123 -> "123")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(value)
    return str(value)


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, names: list[str], where: str) -> ValueError:
    """The error for an unknown key, suggesting up to 3 close field names."""
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; run with --help to list the {len(names)} options"
    return ValueError(f"unknown config key {key!r} in {where}{hint}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of field -> value (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """["lr=1e-4", "tokenizer=None"] -> {"lr": "1e-4", "tokenizer": "None"} (later keys win)."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = value
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Build a validated `cls` from defaults, then the YAML file at `path`, then `key=value` overrides."""
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    sources = [(read_yaml(path) if path else {}, f"config file {str(path)!r}")]
    sources.append((parse_overrides(overrides or []), "the command-line overrides"))
    for data, where in sources:
        for key, value in data.items():
            if key not in types_:
                raise _unknown_key(str(key), list(types_), where)
            values[key] = convert_value(key, value, types_[key])
    cfg = cls(**values)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (field order kept)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the config as YAML that `load_config(type(cfg), path)` reads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def format_default(value: Any) -> str:
    """A default as typed on the command line: True -> "true", None -> "None", 1e-4 -> "0.0001"."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_help(cls: type) -> str:
    """One line per field: name, type, default and help, aligned in columns."""
    types_ = _field_types(cls)
    rows = [
        (f.name, _type_name(types_[f.name]), format_default(f.default), f.metadata["help"])
        for f in dataclasses.fields(cls)
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {n:<{widths[0]}}  {t:<{widths[1]}}  = {d:<{widths[2]}}  {h}" for n, t, d, h in rows]
    return "\n".join(lines)
