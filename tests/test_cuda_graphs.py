"""Data checks without a host sync, and CUDA-graph capture of the ops.

On CUDA, ``check=True`` validates labels and masks with device-side asserts (rlhf_kernels._utils.require_none), so
an op costs no host sync and can be captured in a CUDA graph. The CPU tests run that asynchronous path on CPU
tensors (where torch._assert_async raises at once); the CUDA tests (skipped without a GPU) check that no sync
happens, that capture and replay give the eager results bitwise, and that a bad label fails the run.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _utils

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
CUDA_BACKENDS = [b for b in ("triton", "cuda") if CUDA and b in rlhf_kernels.available_backends(torch.device("cuda"))]


@pytest.fixture
def async_checks(monkeypatch):
    """The device-side (asynchronous) checks, whatever RLHF_KERNELS_SYNC_CHECKS the test run set."""
    monkeypatch.delenv(_utils.SYNC_CHECKS_ENV, raising=False)
    monkeypatch.setattr(_utils, "sync_checks", lambda device: False)


@pytest.mark.parametrize("backend", [b for b in rlhf_kernels.available_backends("cpu") if b != "reference"])
def test_async_label_check_on_cpu(async_checks, backend):
    """The assert path: bad labels still fail (RuntimeError from torch._assert_async), good ones pass."""
    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, 2, -100], [10, 0, 3]])
    rlhf_kernels.logprobs(logits, labels, backend=backend)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 11\)"):
        rlhf_kernels.logprobs(logits, labels.masked_fill(labels == 10, 11), backend=backend)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(11, 4)
    with pytest.raises(RuntimeError, match="labels must lie"):
        rlhf_kernels.fused_linear_logprobs(hidden, weight, labels - 1, backend=backend)


def test_sync_checks_rule(monkeypatch):
    monkeypatch.delenv(_utils.SYNC_CHECKS_ENV, raising=False)
    assert _utils.sync_checks(torch.device("cpu")) and not _utils.sync_checks(torch.device("cuda"))
    monkeypatch.setenv(_utils.SYNC_CHECKS_ENV, "1")
    assert _utils.sync_checks(torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_no_host_sync(async_checks, backend):
    """check=True costs no host sync: torch's sync debug mode raises on any synchronizing call."""
    dev = torch.device("cuda")
    logits = torch.randn(4, 7, 1000, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 7), device=dev)
    labels[0, :3] = -100
    ref = torch.randn(4, 7, 1000, device=dev, dtype=torch.bfloat16)
    rlhf_kernels.logprobs(logits, labels, backend=backend)  # compile / load outside the checked region
    rlhf_kernels.kl_from_logits(logits, ref, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, ent = rlhf_kernels.logprobs(logits, labels, return_entropy=True, backend=backend, check=True)
        kl = rlhf_kernels.kl_from_logits(logits, ref, backend=backend)
        (lp.sum() + ent.sum() + kl.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _capture(fn, static_inputs):
    """fn(*static_inputs) captured in a CUDA graph after a warm-up on a side stream (Triton compiles there)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("op", ["logprobs", "fused_linear_logprobs", "kl"])
def test_cuda_graph_capture(async_checks, backend, op):
    """Capture with check=True, replay on new inputs copied into the static buffers: bitwise the eager results."""
    dev = torch.device("cuda")
    B, T, H, V = 3, 9, 64, 5003
    if op == "logprobs":
        make = lambda: (torch.randn(B, T, V, device=dev, dtype=torch.bfloat16), torch.randint(0, V, (B, T), device=dev))
        fn = lambda x, y: rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend, check=True)
    elif op == "fused_linear_logprobs":
        weight = torch.randn(V, H, device=dev, dtype=torch.bfloat16) / 8

        def make():
            y = torch.randint(0, V, (B, T), device=dev)
            y[:, :2] = -100  # ignored rows: skipped eagerly (one sync), computed and zeroed under capture
            return torch.randn(B, T, H, device=dev, dtype=torch.bfloat16), y

        fn = lambda h, y: rlhf_kernels.fused_linear_logprobs(
            h, weight, y, return_entropy=True, backend=backend, check=True
        )
    else:
        make = lambda: tuple(torch.randn(B, T, V, device=dev, dtype=torch.bfloat16) for _ in range(2))
        fn = lambda x, r: (rlhf_kernels.kl_from_logits(x, r, backend=backend),)
    static = make()
    graph, out = _capture(fn, static)
    for _ in range(2):
        new = make()
        for s, n in zip(static, new):
            s.copy_(n)
        graph.replay()
        want = fn(*new)
        for o, w in zip(out, want):
            assert torch.equal(o, w), f"{op} on {backend}: replay differs from eager"


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_bad_label_fails_on_device(backend):
    """An out-of-range label with the asynchronous check ends the run with a device-side assert (in a child
    process: the assert ends the CUDA context) instead of giving NaN silently."""
    script = textwrap.dedent(
        f"""
        import os, torch, rlhf_kernels
        os.environ.pop("RLHF_KERNELS_SYNC_CHECKS", None)
        x = torch.randn(2, 5, 100, device="cuda")
        y = torch.randint(0, 100, (2, 5), device="cuda")
        y[1, 3] = 100
        lp = rlhf_kernels.logprobs(x, y, backend="{backend}")
        torch.cuda.synchronize()
        print("NO ERROR", lp[1, 3].item())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RLHF_KERNELS_SYNC_CHECKS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR" not in out, out[-2000:]
    assert "assert" in out.lower(), out[-2000:]
