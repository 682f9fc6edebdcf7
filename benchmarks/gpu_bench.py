"""The GPU session's benchmarks: a compact cut of the bench_*.py modules that fits a few minutes of device time.

    python -m benchmarks.gpu_bench --part bandwidth --out bandwidth.md   # memory-bound kernels vs the copy
    python -m benchmarks.gpu_bench --part heads --out heads.md           # fused heads vs bare GEMMs and peers
    python -m benchmarks.gpu_bench --part bandwidth --quick --device cpu # dry run on tiny shapes

``bandwidth``: every memory-bound kernel per backend (and eager PyTorch as the baseline) on one representative
shape: logprobs (forward, with entropy, forward + backward) and kl_from_logits (forward, forward + backward) as
measured by bench_logprobs / bench_kl, GAE as measured by bench_gae, and the fused PPO policy / value kernels
(the low-level ops of the op table). Each row gives GB/s and its fraction of the device copy bandwidth
(``empty_like(x).copy_(x)``, bytes read + written) measured in the same run on that case's input.

``heads``: bench_losses (fused_linear_ppo_loss, fused_linear_dpo_loss against their three bare GEMMs, the
unfused paths and Liger-Kernel when installed) and the fused_linear_logprobs / fused_linear_kl paths of
bench_logprobs / bench_kl, at one LM-head shape each. torch.compile providers are left out here to save their
compile time (``--with-compile`` keeps them); the full benchmarks are ``python -m benchmarks.bench_X``.
"""

from __future__ import annotations

import argparse
import functools

import torch

import rlhf_kernels
from benchmarks import bench_gae, bench_kl, bench_logprobs, bench_losses
from benchmarks.common import copy_bandwidth_gbs, emit_row, median_ms, publish
from rlhf_kernels._registry import call

BF16 = torch.bfloat16


def _row(lines, kernel, case, mode, name, ms, gbs, copy_gbs):
    emit_row(lines, f"| {kernel} | {case} | {mode} | {name} | {ms:.3f} | {gbs:,.1f} | {gbs / copy_gbs:.0%} |")


def _kernel_backends(device) -> list[str]:
    return [b for b in rlhf_kernels.available_backends(device) if b != "reference"]


def bandwidth(device, quick: bool, skip: set[str]) -> str:
    n, v = (64, 1000) if quick else (4096, 152064)
    dtype = torch.float32 if quick else BF16
    lines = [
        "\n### Memory-bound kernels: GB/s and fraction of the copy bandwidth measured in the same run\n",
        "| kernel | case | mode | provider | median ms | GB/s | of copy BW |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    dt = str(dtype).replace("torch.", "")
    case = f"N={n} V={v} {dt}"
    for mod, kernel in ((bench_logprobs, "logprobs"), (bench_kl, "kl_from_logits")):
        x, _ = mod.make_inputs(n, v, dtype, device)
        copy_gbs = copy_bandwidth_gbs(x)
        del x
        for mode in mod.MODES:
            for name in [k for k in mod.providers(device) if k not in skip]:
                if name.startswith("liger") and mode != "fwd+bwd":
                    continue  # its op is cross-entropy forward + gradient: only comparable to fwd+bwd
                r = mod.measure(name, mode, n, v, dtype, device, memory=False)
                _row(lines, kernel, case, mode, name, r["ms"], r["gbs"], copy_gbs)
    # GAE: reads rewards, values (fp32 here) and the mask, writes advantages and returns (bench_gae's count)
    b, t = (8, 256) if quick else (512, 4096)
    rewards, values, mask = bench_gae.make_inputs(b, t, torch.float32, device)
    copy_gbs = copy_bandwidth_gbs(torch.empty(b, t, device=device))
    traffic = b * t * (2 * 4 + 1 + 8)
    for name, fn in bench_gae.providers(device).items():
        if name in skip or name == "loop":  # the per-step loop takes seconds per call on a GPU
            continue
        ms = median_ms(functools.partial(fn, rewards, values, mask), device)
        _row(lines, "gae", f"B={b} T={t} float32", "fwd", name, ms, traffic / ms / 1e6, copy_gbs)
    # PPO token losses: the low-level ops read four fp32 (N,) tensors and write the fp32 gradient (the GB/s count
    # these 20 bytes per token; the sequence levels read the tokens again in their second and third passes)
    tokens = 2**12 if quick else 2**24
    g = torch.Generator(device=device).manual_seed(0)
    lp, old, adv = (torch.randn(tokens, device=device, generator=g) for _ in range(3))
    weight = (torch.rand(tokens, device=device, generator=g) > 0.2).float()
    no_offsets = torch.empty(0, dtype=torch.int64, device=device)
    offsets = torch.arange(0, tokens + 1, 1024, dtype=torch.int64, device=device)  # sequences of 1024 tokens
    copy_gbs = copy_bandwidth_gbs(lp)
    tok = (lp, old, adv, weight)
    # (row name, op, arguments); policy: clip_low, clip_high, dual_clip, loss_type, ratio_level, tau_pos, tau_neg
    ops = [
        ("ppo_policy_fwd", "ppo_policy_fwd", (*tok, no_offsets, 0.2, 0.2, 3.0, 0, 0, 1.0, 1.05)),
        ("ppo_policy_fwd sapo", "ppo_policy_fwd", (*tok, no_offsets, 0.2, 0.2, 0.0, 2, 0, 1.0, 1.05)),
        ("ppo_policy_fwd sequence", "ppo_policy_fwd", (*tok, offsets, 3e-4, 4e-4, 0.0, 0, 1, 1.0, 1.05)),
        ("ppo_value_fwd", "ppo_value_fwd", (*tok, 0.2)),
    ]
    for name, op, args in ops:
        status = rlhf_kernels.backend_status(device, op=op)
        for backend in _kernel_backends(device):
            if status[backend] != "ok":
                continue
            ms = median_ms(functools.partial(call, op, backend, *args), device)
            _row(lines, name, f"N={tokens} float32", "fwd (+grad)", backend, ms, 5 * 4 * tokens / ms / 1e6, copy_gbs)
    return "\n".join(lines)


def heads(device, quick: bool) -> str:
    if quick:
        ppo, dpo, linear = (256, 64, 1000, torch.float32), (1, 64, 64, 1000, torch.float32), (128, 64, 1000)
    else:
        ppo, dpo, linear = (4096, 4096, 128256, BF16), (2, 1024, 4096, 128256, BF16), (4096, 4096, 131072)
    dtype = ppo[-1]
    lines = [bench_losses.run(device, [ppo], [dpo], [], memory=True)]
    for mod in (bench_logprobs, bench_kl):
        lines.append(mod.run(device, [], [], True, [(*linear, dtype)]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--part", choices=("bandwidth", "heads"), required=True)
    p.add_argument("--quick", action="store_true", help="tiny shapes (dry run)")
    p.add_argument("--with-compile", action="store_true", help="keep the torch.compile providers")
    p.add_argument("--out", help="write the table (markdown) and the environment to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    skip = set() if args.with_compile else {"compile"}
    if args.part == "bandwidth":
        publish("Memory-bound kernels vs the copy bandwidth", bandwidth(device, args.quick, skip), args.out)
    else:
        publish("Fused heads vs bare GEMMs and peers", heads(device, args.quick), args.out)


if __name__ == "__main__":
    main()
