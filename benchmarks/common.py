"""Timing, bandwidth and memory helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, warmup: int = 2, reps: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA: triton's do_bench, which flushes the L2)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(x: torch.Tensor) -> float:
    """Device copy bandwidth measured now on ``x``: bytes read + written by ``empty_like(x).copy_(x)`` per second."""
    out = torch.empty_like(x)
    ms = median_ms(lambda: out.copy_(x), x.device)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def gpu_peak_extra_bytes(fn) -> int:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_extra_bytes(fn) -> int:
    """CPU: growth of the process's peak resident set while ``fn()`` runs (meaningful in a fresh process)."""
    base = current_rss_bytes()
    fn()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def run_isolated(module: str, args: list[str]) -> dict:
    """Run ``python -m module args`` in a fresh process and parse the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], check=True, capture_output=True, text=True, env=os.environ.copy()
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import rlhf_kernels

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "backends": rlhf_kernels.available_backends(),
    }
