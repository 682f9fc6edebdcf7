"""The `rlhf` command: `rlhf <stage> [--config FILE] [--resume] [--debug] [key=value ...]`.

Each stage is a row of `STAGES`: its config class and the module whose `train(cfg, resume=...)` runs it. The module
is imported only when the stage runs, so `--help` stays fast.

Exit status: 0 done; 2 a usage or config error, or a `UserError` (bad data, a missing path), printed as one line
`rlhf: error: ...` before anything is loaded or written when it can be checked up front; 1 anything else (a bug),
with its traceback. `--debug` or `RLHF_DEBUG=1` prints the traceback of status-2 errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from . import distributed
from .config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig, config_help, load_config
from .errors import UserError
from .frontier import FrontierConfig
from .grpo_core import GRPOConfig
from .label import LabelConfig
from .pipeline import PipelineConfig
from .train import check_paths

STAGES: dict[str, tuple[type, str]] = {
    "sft": (SFTConfig, "rlhf.sft"),
    "rm": (RewardConfig, "rlhf.reward"),
    "dpo": (DPOConfig, "rlhf.dpo"),
    "kto": (KTOConfig, "rlhf.kto"),
    "ppo": (PPOConfig, "rlhf.ppo"),
    "grpo": (GRPOConfig, "rlhf.grpo"),
    "label": (LabelConfig, "rlhf.label"),
    "frontier": (FrontierConfig, "rlhf.frontier"),
    "pipeline": (PipelineConfig, "rlhf.pipeline"),
}

_USAGE_NOTE = """\
options are set by --config FILE (YAML mapping of option: value), then by key=value arguments (these win).
Booleans take true/false/yes/no/1/0; optional values take None.

config options (name, type, default, meaning):
"""


def _summary(cls: type) -> str:
    """First line of a config class docstring."""
    return (cls.__doc__ or "").strip().splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per stage; each stage's help lists every config option."""
    parser = argparse.ArgumentParser(prog="rlhf", description="Train language models with RLHF on rlhf_kernels.")
    subparsers = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (cls, _) in STAGES.items():
        sub = subparsers.add_parser(
            name,
            help=_summary(cls),
            description=_summary(cls),
            epilog=_USAGE_NOTE + config_help(cls),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE", help="YAML file of config options")
        if name == "label":  # labelling always resumes from the chunks already written
            pass
        elif name in ("pipeline", "frontier"):  # always resume: finished stages and points are skipped
            sub.add_argument("--restart", action="store_true", help="delete earlier stage outputs and start over")
        else:
            sub.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
        sub.add_argument("--debug", action="store_true", help="print the traceback of any error (or RLHF_DEBUG=1)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="config option overrides")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; `key=value` words may appear anywhere after the stage (before or after the flags)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if word.startswith("-") or "=" not in word]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    return args


def error_exit(err: Exception, debug: bool) -> int:
    """Print a user's error as one line (or its traceback with `debug`); the exit status 2."""
    if debug:
        traceback.print_exception(err)
    else:
        print("rlhf: error: " + " ".join(str(err).split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the `rlhf` command; returns the exit status (0 ok, 2 usage, config or data error; a bug raises)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse exits after --help (0) or a usage error (2)
        return int(e.code or 0)
    debug = args.debug or os.environ.get("RLHF_DEBUG", "").lower() not in ("", "0", "false", "no")
    cls, module_name = STAGES[args.stage]
    try:
        cfg = load_config(cls, args.config, args.overrides)
        check_paths(cfg)
    except (ValueError, FileNotFoundError) as e:
        return error_exit(e, debug)
    resume = not args.restart if args.stage in ("pipeline", "frontier") else getattr(args, "resume", True)
    try:
        importlib.import_module(module_name).train(cfg, resume=resume)
    except UserError as e:
        return error_exit(e, debug)
    finally:
        distributed.shutdown()  # leave the torchrun process group (a no-op on one process)
    return 0
