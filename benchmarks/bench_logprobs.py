"""Benchmark of rlhf_kernels.logprobs / fused_linear_logprobs against PyTorch eager, torch.compile and peers.

    python -m benchmarks.bench_logprobs                      # this machine's default cases, prints tables
    python -m benchmarks.bench_logprobs --out results.md     # also writes the tables and the environment
    pytest benchmarks/bench_logprobs.py                      # pytest-benchmark timings (small CPU shapes)

Columns: median time; GB/s of logits traffic (forward reads the logits once; forward+backward reads them twice
and writes the gradient); that rate as a fraction of the device copy bandwidth measured in the same run; peak
memory above the inputs (CUDA: allocator peak; CPU: peak of live tensor allocations, from the profiler).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util

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

MODES = ("logprobs", "logprobs+entropy", "fwd+bwd")


def eager(x, y, mode):
    """What users write: log_softmax + gather, entropy via softmax; fp32 upcast as in common trainers."""
    logp = torch.log_softmax(x.float(), dim=-1)
    lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if mode == "logprobs":
        return lp
    ent = -(torch.softmax(x.float(), dim=-1) * logp).sum(-1)
    return lp, ent


@functools.cache
def _compiled():
    return torch.compile(eager, dynamic=False)


def ours(backend):
    def fn(x, y, mode):
        return rlhf_kernels.logprobs(x, y, return_entropy=mode != "logprobs", backend=backend)

    return fn


def providers(device: torch.device) -> dict:
    table = {"torch": eager, "compile": lambda x, y, mode: _compiled()(x, y, mode)}
    for b in rlhf_kernels.available_backends(device):
        if b != "reference":
            table[b] = ours(b)
    if importlib.util.find_spec("liger_kernel") is not None and device.type == "cuda":
        from liger_kernel.transformers.functional import liger_cross_entropy

        # Liger has no log-prob op; its cross-entropy (forward + grad in one pass) is the closest peer.
        table["liger-ce"] = lambda x, y, mode: -liger_cross_entropy(x, y, reduction="none")
    return table


def make_inputs(n, v, dtype, device, requires_grad=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(n, v, device=device, dtype=torch.float32, generator=g) * 2).to(dtype)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    return x.requires_grad_(requires_grad), y


def step_fn(provider, x, y, mode):
    if mode != "fwd+bwd":
        return lambda: provider(x, y, mode)

    def step():
        out = provider(x, y, mode)
        loss = out[0].sum() + 0.01 * out[1].sum() if isinstance(out, tuple) else out.sum()
        loss.backward()
        x.grad = None

    return step


def measure(name, mode, n, v, dtype, device, memory=True):
    x, y = make_inputs(n, v, dtype, device, requires_grad=mode == "fwd+bwd")
    provider = providers(device)[name]
    fn = step_fn(provider, x, y, mode)
    with torch.no_grad() if mode != "fwd+bwd" else torch.enable_grad():
        ms = median_ms(fn, device)
        mem = None if not memory else peak_extra_bytes(fn, device)
    traffic = n * v * x.element_size() * (3 if mode == "fwd+bwd" else 1)
    return {"ms": ms, "gbs": traffic / ms / 1e6, "mem": mem}


def fused_linear_paths(n, h, v, dtype, device):
    """Forward + backward of the unfused path (linear + log_softmax + gather) and of fused_linear_logprobs."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, h, device=device, generator=g) / h**0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=device, generator=g)

    def unfused():
        lp = eager(torch.nn.functional.linear(hidden, weight), y, "logprobs")
        lp.sum().backward()
        hidden.grad = weight.grad = None

    def fused():
        rlhf_kernels.fused_linear_logprobs(hidden, weight, y).sum().backward()
        hidden.grad = weight.grad = None

    return {"unfused (torch)": unfused, "fused_linear_logprobs": fused}


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
            f"fused_linear_logprobs, forward + backward: N={n}, H={h}, V={v}, {str(dtype).replace('torch.', '')}, "
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
    publish("rlhf_kernels.logprobs benchmark", table, args.out)


# pytest-benchmark entry points: `pytest benchmarks/bench_logprobs.py` (CPU-sized unless CUDA is present).
_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_N, _V = (4096, 131072) if _DEV.type == "cuda" else (1024, 32000)


def _bench_params():
    import pytest

    return pytest.mark.parametrize("provider", list(providers(_DEV)))


try:
    import pytest

    @pytest.mark.parametrize("mode", MODES)
    @_bench_params()
    def test_logprobs(benchmark, provider, mode):
        dtype = torch.bfloat16 if _DEV.type == "cuda" else torch.float32
        x, y = make_inputs(_N, _V, dtype, _DEV, requires_grad=mode == "fwd+bwd")
        benchmark(synced(step_fn(providers(_DEV)[provider], x, y, mode), _DEV))
except ImportError:  # pragma: no cover - pytest only needed for the pytest-benchmark entry points
    pass


if __name__ == "__main__":
    main()
