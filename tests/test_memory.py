"""No fp32 (N, V) tensor is ever allocated by the forward or backward of the kernel backends (CPU profiler)."""

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS

import rlhf_kernels


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)  # single allocations


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocations are profiled here; GPU memory in benchmarks")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_fp32_n_by_v_temporary(backend):
    N, V = 64, 4000
    x = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (N,))

    def step():
        lp, ent = rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()

    step()  # warm-up (compilation, caches)
    biggest = _largest_allocation(step)
    assert biggest >= N * V * 2  # the bf16 gradient itself is seen, so the profiler does record allocations
    assert biggest < N * V * 4, f"an allocation of {biggest} bytes: an fp32 (N, V) temporary"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocations are profiled here; GPU memory in benchmarks")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_linear_peak_is_one_chunk(backend):
    N, H, V, chunk = 512, 32, 4000, 32
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (N,))

    def step():
        rlhf_kernels.fused_linear_logprobs(h, w, y, chunk_size=chunk, backend=backend).sum().backward()

    step()
    biggest = _largest_allocation(step)
    assert biggest <= max(chunk * V * 4, V * H * 4), f"an allocation of {biggest} bytes exceeds one chunk"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocations are profiled here; GPU memory in benchmarks")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kl_no_fp32_n_by_v_temporary(backend):
    N, V = 64, 4000
    x = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(N, V, dtype=torch.bfloat16)
    mask = torch.rand(N) > 0.2

    def step():
        rlhf_kernels.kl_from_logits(x, y, mask=mask, backend=backend).sum().backward()

    step()
    biggest = _largest_allocation(step)
    assert biggest >= N * V * 2  # the bf16 gradient
    assert biggest < N * V * 4, f"an allocation of {biggest} bytes: an fp32 (N, V) temporary"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocations are profiled here; GPU memory in benchmarks")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_linear_kl_peak_is_one_chunk(backend):
    N, H, V, chunk = 512, 32, 4000, 32
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    rh, rw = torch.randn(N, H), torch.randn(V, H)

    def step():
        rlhf_kernels.fused_linear_kl(h, w, rh, rw, chunk_size=chunk, backend=backend).sum().backward()

    step()
    biggest = _largest_allocation(step)
    assert biggest <= max(chunk * V * 4, V * H * 4), f"an allocation of {biggest} bytes exceeds one chunk"
