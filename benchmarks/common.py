"""Timing, bandwidth and memory helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import os
import platform
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


def cpu_peak_extra_bytes(fn) -> int:
    """CPU: peak of the bytes held by tensors allocated while ``fn()`` runs (the CPU analogue of the CUDA allocator
    peak), from the profiler's raw allocation and free records in time order. Independent of how the C allocator
    recycles pages, unlike the resident set size.

    The raw records, not ``prof.events()``: there an allocation or free is folded into the ``self`` memory of the
    innermost enclosing op and dated at that op's start, so a free inside a long op (an autograd node, the
    optimizer step, a ``record_function`` range) would count as earlier than it happened and hide the peak."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    records = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    live = peak = 0
    for _, nbytes in sorted(records):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory allocated by ``fn()`` above what was allocated before it, on ``device``."""
    return gpu_peak_extra_bytes(fn) if device.type == "cuda" else cpu_peak_extra_bytes(fn)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name} ({os.cpu_count()} logical CPUs)"


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
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
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


# ---------------------------------------------------------------------------------------------------------
# Tables and reports shared by the bench_*.py scripts
# ---------------------------------------------------------------------------------------------------------


def fmt_mem(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def emit_row(lines: list[str], row: str) -> None:
    lines.append(row)
    print(row, file=sys.stderr, flush=True)  # progress while a long table is measured


def provider_table(heading: str, copy_gbs: float, modes, names, measure) -> list[str]:
    """Markdown rows of one case: for each mode and provider name, ``measure(name, mode)`` -> dict with "ms",
    "gbs" and "mem"; the first provider of each mode is the baseline of the speed-up column."""
    lines = [
        f"\n### {heading} (copy bandwidth {copy_gbs:,.1f} GB/s)\n",
        "| mode | provider | median ms | GB/s | of copy BW | speed-up vs torch | peak extra memory |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        base = None
        for name in names:
            r = measure(name, mode)
            base = base or r["ms"]
            emit_row(
                lines,
                f"| {mode} | {name} | {r['ms']:.2f} | {r['gbs']:,.1f} | {r['gbs'] / copy_gbs:.0%} | "
                f"{base / r['ms']:.2f}x | {fmt_mem(r['mem'])} |",
            )
    return lines


def paths_table(heading: str, paths: dict, device: torch.device, memory: bool) -> list[str]:
    """Markdown rows timing each of ``paths`` (name -> callable; the first is the unfused baseline)."""
    lines = [
        f"\n### {heading}\n",
        "| path | median ms | peak extra memory | memory vs unfused |",
        "|---|---:|---:|---:|",
    ]
    base_mem = None
    for name, fn in paths.items():
        ms = median_ms(fn, device, warmup=1, reps=3)
        mem = peak_extra_bytes(fn, device) if memory else None
        base_mem = base_mem or mem
        frac = "-" if mem is None or not base_mem else f"{mem / base_mem:.1%}"
        emit_row(lines, f"| {name} | {ms:.1f} | {fmt_mem(mem)} | {frac} |")
    return lines


def publish(title: str, table: str, out: str | None) -> None:
    """Prints the environment and the tables; also writes them to ``out`` when given."""
    report = f"## {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in environment().items()) + "\n" + table
    print(report)
    if out:
        with open(out, "w") as f:
            f.write(report + "\n")


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation (for pytest-benchmark, which times host calls)."""

    def call():
        fn()
        sync(device)

    return call
