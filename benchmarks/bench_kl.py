"""Benchmark of rlhf_kernels.kl_from_logits / fused_linear_kl against PyTorch eager and torch.compile.

    python -m benchmarks.bench_kl                      # this machine's default cases, prints tables
    python -m benchmarks.bench_kl --out results.md     # also writes the tables and the environment
    pytest benchmarks/bench_kl.py                      # pytest-benchmark timings (small CPU shapes)

Columns: median time; GB/s of logits traffic (the forward reads both logits once; forward + backward reads them
twice and writes the gradient); that rate as a fraction of the device copy bandwidth measured in the same run;
peak memory above the inputs (CUDA: allocator peak; CPU: peak of live tensor allocations, profiler).
"""

from __future__ import annotations

import argparse
import functools

import torch

import rlhf_kernels
from benchmarks.common import (
    copy_bandwidth_gbs,
    median_ms,
    paths_table,
    peak_extra_bytes,
    provider_table,
    publish,
    synced,
)

MODES = ("fwd", "fwd+bwd")


def eager(x, y):
    """What users write: both log-softmaxes in fp32, then sum p (log p - log q)."""
    logp = torch.log_softmax(x.float(), dim=-1)
    logq = torch.log_softmax(y.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@functools.cache
def _compiled():
    return torch.compile(eager, dynamic=False)


def providers(device: torch.device) -> dict:
    table = {"torch": eager, "compile": lambda x, y: _compiled()(x, y)}
    for b in rlhf_kernels.available_backends(device):
        if b != "reference":
            table[b] = functools.partial(lambda x, y, b: rlhf_kernels.kl_from_logits(x, y, backend=b), b=b)
    return table


def make_inputs(n, v, dtype, device, requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    y = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype)
    x = (y.float() + 0.3 * torch.randn(n, v, device=device, generator=g)).to(dtype)  # a nearby policy
    return x.requires_grad_(requires_grad), y


def step_fn(provider, x, y, mode):
    if mode == "fwd":
        return lambda: provider(x, y)

    def step():
        provider(x, y).sum().backward()
        x.grad = None

    return step


def measure(name, mode, n, v, dtype, device, memory=True):
    x, y = make_inputs(n, v, dtype, device, requires_grad=mode == "fwd+bwd")
    fn = step_fn(providers(device)[name], x, y, mode)
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        ms = median_ms(fn, device)
        mem = None if not memory else peak_extra_bytes(fn, device)
    traffic = n * v * x.element_size() * (2 if mode == "fwd" else 5)
    return {"ms": ms, "gbs": traffic / ms / 1e6, "mem": mem}


def fused_linear_paths(n, h, v, dtype, device):
    """Forward + backward of the unfused path (two LM heads + eager KL) and of fused_linear_kl."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, device=device, generator=g) / h**0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, h, device=device, generator=g).to(dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.01 * torch.randn(n, h, device=device, generator=g)).to(dtype)
    ref_weight = (weight.detach().float() + 0.01 * torch.randn(v, h, device=device, generator=g)).to(dtype)

    def unfused():
        with torch.no_grad():
            ref_logits = torch.nn.functional.linear(ref_hidden, ref_weight)
        eager(torch.nn.functional.linear(hidden, weight), ref_logits).sum().backward()
        hidden.grad = weight.grad = None

    def fused():
        rlhf_kernels.fused_linear_kl(hidden, weight, ref_hidden, ref_weight).sum().backward()
        hidden.grad = weight.grad = None

    return {"unfused (torch)": unfused, "fused_linear_kl": fused}


def run(device: torch.device, cases, modes, memory: bool, fused_cases) -> str:
    lines = []
    for n, v, dtype in cases:
        x, _ = make_inputs(n, v, dtype, device)
        copy_gbs = copy_bandwidth_gbs(x)
        del x
        heading = f"N={n}, V={v}, {str(dtype).replace('torch.', '')}, {device.type}"
        case = functools.partial(measure, n=n, v=v, dtype=dtype, device=device, memory=memory)
        lines += provider_table(heading, copy_gbs, modes, providers(device), case)
    for n, h, v, dtype in fused_cases:
        heading = (
            f"fused_linear_kl, forward + backward: N={n}, H={h}, V={v}, {str(dtype).replace('torch.', '')}, "
            f"{device.type}"
        )
        lines += paths_table(heading, fused_linear_paths(n, h, v, dtype, device), device, memory)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (faster on CPU)")
    p.add_argument("--out", help="write the tables (markdown) and the environment to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        cases = [(n, v, torch.bfloat16) for v in (32000, 131072, 152064) for n in (4096, 16384)]
        fused_cases = [(4096, 4096, 131072, torch.bfloat16)]
    else:
        cases = [(4096, 32000, torch.float32)]
        fused_cases = [(2048, 512, 32000, torch.float32)]
    table = run(device, cases, args.modes.split(","), not args.no_memory, fused_cases)
    publish("rlhf_kernels.kl_from_logits benchmark", table, args.out)


# pytest-benchmark entry points: `pytest benchmarks/bench_kl.py` (CPU-sized unless CUDA is present).
_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_N, _V = (4096, 131072) if _DEV.type == "cuda" else (1024, 32000)

try:
    import pytest

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("provider", list(providers(_DEV)))
    def test_kl(benchmark, provider, mode):
        dtype = torch.bfloat16 if _DEV.type == "cuda" else torch.float32
        x, y = make_inputs(_N, _V, dtype, _DEV, requires_grad=mode == "fwd+bwd")
        benchmark(synced(step_fn(providers(_DEV)[provider], x, y, mode), _DEV))
except ImportError:  # pragma: no cover - pytest only needed for the pytest-benchmark entry points
    pass


if __name__ == "__main__":
    main()
