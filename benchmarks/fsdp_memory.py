"""Parameter + optimizer memory per process with FSDP2 sharding: 1 process against N (torchrun, CPU/gloo or GPU).

``python -m benchmarks.fsdp_memory --procs 1 2 --out benchmarks/results/cpu_fsdp2_memory.md`` starts one torchrun
job per process count. Each process builds the model, shards it as the training stages do
(:func:`rlhf.distributed.shard`: per decoder layer, then the root), builds the stage's AdamW, runs one training step
(so Adam's moments exist) and counts the bytes this process holds: its parameter shards, its gradient shards and
its optimizer states (``DTensor.to_local()`` for sharded tensors). Those are exact byte counts of the tensors, not
allocator statistics, so they are the same on CPU and GPU for the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(model_name: str, report: str) -> None:
    """One process of the torchrun job: shard, one step, count bytes, write this rank's JSON line."""
    from rlhf import distributed
    from rlhf.config import SFTConfig
    from rlhf.models import LMHead, load_causal_lm, load_tokenizer
    from rlhf.train import build_optimizer

    cfg = SFTConfig(model=model_name, device="auto", lr=1e-4)
    ctx = distributed.setup(cfg)
    tokenizer = load_tokenizer(model_name)
    model = load_causal_lm(model_name, tokenizer, device="cpu" if ctx.sharded else ctx.device, seed=0)
    total_params = sum(p.numel() for p in model.parameters())
    model = distributed.shard(model)
    optimizer = build_optimizer(model, cfg)
    ids = torch.randint(3, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    mask = torch.ones_like(ids)
    loss = -LMHead().logprobs(model, ids, mask, ids).sum() * distributed.grad_scale([model])
    loss.backward()
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    optimizer.step()
    params = sum(local_bytes(p) for p in model.parameters())
    states = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    row = {"rank": ctx.rank, "world": ctx.world, "params": params, "grads": grads, "optimizer": states}
    row["total_params"] = total_params
    rows = distributed.all_gather_objects(row)
    if ctx.main:
        with open(report, "w") as f:
            json.dump(rows, f)
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            report = Path(tmp) / f"{procs}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            cmd += ["-m", "benchmarks.fsdp_memory", "--worker", args.model, str(report)]
            env = dict(os.environ, PYTHONPATH=str(REPO))
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{procs} processes failed:\n{out.stderr[-6000:]}")
            results[procs] = json.loads(report.read_text())
    base = max(r["params"] + r["grads"] + r["optimizer"] for r in results[min(results)])
    lines = [
        f"model `{args.model}` ({results[min(results)][0]['total_params']:,} parameters, fp32), AdamW; bytes held "
        "by each process after one training step (FSDP2 per decoder layer, then the root)",
        "",
        "| processes | rank | parameters (MiB) | gradients (MiB) | optimizer states (MiB) | total (MiB) "
        "| vs 1 process |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for procs, rows in results.items():
        for r in rows:
            total = r["params"] + r["grads"] + r["optimizer"]
            lines.append(
                f"| {procs} | {r['rank']} | {r['params'] / MIB:.2f} | {r['grads'] / MIB:.2f} | "
                f"{r['optimizer'] / MIB:.2f} | {total / MIB:.2f} | {total / base:.3f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
