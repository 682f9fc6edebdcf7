"""Benchmark of rlhf_kernels.gae against the per-time-step PyTorch loop that RL libraries use.

    python -m benchmarks.bench_gae                      # this machine's default cases, prints tables
    python -m benchmarks.bench_gae --out results.md     # also writes the tables and the environment
    python -m benchmarks.bench_gae --keep-freed-memory  # CPU: malloc keeps freed memory (see keep_freed_memory)
    pytest benchmarks/bench_gae.py                      # pytest-benchmark timings

Providers: ``loop`` (one batch of small ops per time step, with the masking rules of rlhf_kernels.gae),
``compile`` (the loop's step function under torch.compile, still called once per time step: compiling the
whole loop unrolls T steps into one graph, which takes minutes for T in the thousands), and our backends.
Columns: median time; GB/s of memory traffic (reads rewards, values and the mask, writes advantages and returns);
that as a fraction of the copy bandwidth measured in the same run; the speed-up over the loop.
"""

from __future__ import annotations

import argparse
import functools

import torch

import rlhf_kernels
from benchmarks.common import copy_bandwidth_gbs, emit_row, median_ms, publish, synced

GAMMA, LAM = 1.0, 0.95


def _step(r_t, v_t, m_t, acc, next_value, gamma: float, lam: float):
    acc = torch.where(m_t, r_t + gamma * next_value - v_t + gamma * lam * acc, acc)
    next_value = torch.where(m_t, v_t, next_value)
    return acc, next_value


@functools.cache
def _compiled_step():
    return torch.compile(_step, dynamic=False)


def loop(rewards, values, mask, step=_step):
    """The per-time-step loop (B, T) -> (advantages, returns), fp32."""
    r, v = rewards.float(), values.float()
    adv = torch.empty_like(r)
    acc = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(acc)
    for t in reversed(range(r.shape[1])):
        acc, next_value = step(r[:, t], v[:, t], mask[:, t], acc, next_value, GAMMA, LAM)
        adv[:, t] = acc
    return adv, adv + v


def providers(device: torch.device) -> dict:
    table = {
        "loop": loop,
        "compile": lambda r, v, m: loop(r, v, m, step=_compiled_step()),
    }
    for b in rlhf_kernels.available_backends(device):
        if b != "reference":
            table[b] = functools.partial(
                lambda r, v, m, b: rlhf_kernels.gae(r, v, m, gamma=GAMMA, lam=LAM, backend=b), b=b
            )
    return table


def make_inputs(b, t, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rewards = torch.randn(b, t, device=device, generator=g).to(dtype)
    values = torch.randn(b, t, device=device, generator=g).to(dtype)
    lengths = torch.randint(t // 4, t + 1, (b, 1), device=device, generator=g)
    mask = torch.arange(t, device=device) < lengths  # right-padded responses of varied length
    return rewards, values, mask


def run(device: torch.device, cases) -> str:
    lines = []
    for b, t, dtype in cases:
        r, v, m = make_inputs(b, t, dtype, device)
        copy_gbs = copy_bandwidth_gbs(torch.empty(b, t, device=device))
        traffic = b * t * (2 * r.element_size() + 1 + 8)
        lines += [
            f"\n### B={b}, T={t}, {str(dtype).replace('torch.', '')}, {device.type} "
            f"(copy bandwidth {copy_gbs:,.1f} GB/s)\n",
            "| provider | median ms | GB/s | of copy BW | speed-up vs loop |",
            "|---|---:|---:|---:|---:|",
        ]
        base = None
        for name, fn in providers(device).items():
            reps = 5 if name in ("loop", "compile") else 50
            ms = median_ms(functools.partial(fn, r, v, m), device, warmup=1, reps=reps)
            base = base or ms
            gbs = traffic / ms / 1e6
            emit_row(lines, f"| {name} | {ms:.3f} | {gbs:,.1f} | {gbs / copy_gbs:.0%} | {base / ms:,.0f}x |")
    return "\n".join(lines)


def keep_freed_memory() -> str:
    """Make glibc malloc keep freed memory instead of handing it back to the OS after every call.

    With glibc's defaults a process that allocates and frees the same few MiB each call can get them unmapped and
    re-faulted every time (about 1000 page faults for GAE's 4 MiB of outputs at B=256, T=2048, ~1.4 ms on the 2-core
    VM), depending on the heap's history. Caching allocators (jemalloc, tcmalloc, which PyTorch's CPU tuning
    guidance recommends) keep that memory. This sets the same behaviour for every provider in the run.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
    if not ok:
        raise RuntimeError("mallopt refused the settings (not glibc?)")
    return "glibc malloc with M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB (freed memory kept)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the tables (markdown) and the environment to this file")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="CPU: stop glibc from returning freed memory to the OS after each call (see keep_freed_memory)",
    )
    args = p.parse_args(argv)
    allocator = keep_freed_memory() if args.keep_freed_memory else "default allocator settings"
    device = torch.device(args.device)
    if device.type == "cuda":
        cases = [(512, 4096, torch.float32), (512, 4096, torch.bfloat16), (64, 32768, torch.float32)]
    else:
        cases = [(256, 2048, torch.float32)]
    publish(f"rlhf_kernels.gae benchmark ({allocator})", run(device, cases), args.out)


_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

try:
    import pytest

    @pytest.mark.parametrize("provider", list(providers(_DEV)))
    def test_gae(benchmark, provider):
        r, v, m = make_inputs(256, 2048, torch.float32, _DEV)
        benchmark(synced(functools.partial(providers(_DEV)[provider], r, v, m), _DEV))
except ImportError:  # pragma: no cover - pytest only needed for the pytest-benchmark entry points
    pass


if __name__ == "__main__":
    main()
