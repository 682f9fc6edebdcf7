"""No fp32 (N, V) tensor is ever allocated by the forward or backward of the kernel backends (CPU profiler)."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, KERNEL_BACKENDS

import rlhf_kernels


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)  # single allocations


def _peak_allocated(fn, tmp_path) -> int:
    """Peak of the bytes allocated (net of frees) while ``fn`` runs. The trace records every allocation and free
    with the profiler's running total, whose starting value carries over from earlier profiling sessions: the
    baseline is the total before the first event."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    mem = sorted((e["args"] for e in events if e.get("name") == "[memory]"), key=lambda a: a["Ev Idx"])
    if not mem:
        return 0
    baseline = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Total Allocated"] for a in mem) - baseline


def _has_ppo_kernel(backend: str) -> bool:
    try:
        return backend == "triton" or torch._C._dispatch_has_kernel_for_dispatch_key(
            "rlhf_kernels_C::ppo_policy_fwd", {"cpu": "CPU", "cuda": "CUDA"}[backend]
        )
    except RuntimeError:  # an older build of _C without the schema
        return False


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


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocations are profiled here; GPU memory in benchmarks")
@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if _has_ppo_kernel(b)])
@pytest.mark.parametrize("mode", [{}, {"loss_type": "cispo", "ratio_level": "sequence"}], ids=["clip", "gspo-cispo"])
def test_fused_linear_ppo_loss_peak_vs_unfused(backend, mode, tmp_path):
    N, V, H, chunk = 512, 4096, 32, 32
    h = torch.randn(16, N // 16, H, requires_grad=True)  # sequences of 32 tokens: whole sequences per chunk
    w = (torch.randn(V, H) / 4).requires_grad_()
    y = torch.randint(0, V, (16, N // 16))
    old, adv, mask = torch.randn(16, N // 16) - 8, torch.randn(16, N // 16), torch.rand(16, N // 16) > 0.1
    c = torch.rand(16, N // 16) + 0.5 if mode else None

    def fused():
        loss, _ = rlhf_kernels.fused_linear_ppo_loss(
            h, w, y, old, adv, mask, entropy_coef=0.01, chunk_size=chunk, backend=backend, is_weights=c, **mode
        )
        loss.backward()

    def unfused():  # full (N, V) logits -> log-probs and entropy -> PPO loss (our kernels on full logits)
        lp, ent = rlhf_kernels.logprobs(F.linear(h, w), y, return_entropy=True, backend=backend)
        loss, _ = rlhf_kernels.ppo_policy_loss(lp, old, adv, mask, backend=backend, is_weights=c, **mode)
        (loss - 0.01 * rlhf_kernels.aggregate_loss(ent, mask)).backward()

    hs, ys, olds, advs, ms = (x[:1, :8] for x in (h, y, old, adv, mask))  # warm-up (kernels, caches), small shape
    rlhf_kernels.fused_linear_ppo_loss(hs, w, ys, olds, advs, ms, chunk_size=4, backend=backend, **mode)[0].backward()
    peaks = {}
    for fn in (fused, unfused):
        h.grad = w.grad = None
        peaks[fn.__name__] = _peak_allocated(fn, tmp_path)
    logits = N * V * 4
    assert peaks["unfused"] >= 2 * logits  # the profiler sees the full fp32 logits and their gradient
    # the fused op holds one chunk's logits and their gradient, the weight gradient (fp32 accumulator and result)
    # and O(N H) hidden-sized buffers: never anything of N x V
    assert peaks["fused"] <= 2 * chunk * V * 4 + 2 * V * H * 4 + 4 * N * H * 4, peaks
    # so relative to the unfused path's 2 N V: (chunk + H) / N (logits chunk and weight gradient) + 2 H / V
    assert peaks["fused"] / peaks["unfused"] <= (chunk + H) / N + 2 * H / V, peaks


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU measure of the benchmarks")
def test_benchmark_cpu_peak_sees_frees_at_their_time():
    """The benchmarks' CPU peak: five 4 MB tensors held together inside one profiled range, freed there, then one
    8 MB tensor. The peak is 20 MB; folding the frees into the range's start (as the aggregated profiler events do)
    would report 8 MB."""
    from benchmarks.common import cpu_peak_extra_bytes

    def run():
        with torch.profiler.record_function("held_together"):
            xs = [torch.zeros(1_000_000) for _ in range(5)]
            del xs
        y = torch.zeros(2_000_000)
        del y

    assert cpu_peak_extra_bytes(run) == 20_000_000
