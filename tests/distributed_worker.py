"""Runs several ``rlhf`` stages in one process or one torchrun job, for the multi-process tests.

``python tests/distributed_worker.py RUNS.json`` or ``torchrun --nproc_per_node 2 tests/distributed_worker.py
RUNS.json``; ``RUNS.json`` is a list of ``{"stage": "sft" | "rm" | "dpo" | "ppo", "overrides": ["key=value", ...]}``,
run in order in the same process group (one torchrun start for many runs keeps the tests fast).
"""

import importlib
import json
import sys

from rlhf import distributed
from rlhf.cli import STAGES
from rlhf.config import load_config


def main(path: str) -> None:
    with open(path) as f:
        runs = json.load(f)
    try:
        for run in runs:
            cls, module = STAGES[run["stage"]]
            cfg = load_config(cls, None, run["overrides"])
            importlib.import_module(module).train(cfg, resume=run.get("resume", False))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
