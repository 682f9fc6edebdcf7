"""Benchmark of the fused loss heads (fused_linear_ppo_loss, fused_linear_dpo_loss) and the PPO losses.

    python -m benchmarks.bench_losses                      # this machine's default cases, prints tables
    python -m benchmarks.bench_losses --out results.md     # also writes the tables and the environment
    pytest benchmarks/bench_losses.py                      # pytest-benchmark timings (small shapes)

Heads, forward + backward from the last hidden states (N tokens, H) and the LM head (V, H):
  * ``bare GEMMs``: the three matmuls a head cannot avoid (logits, grad_hidden, grad_weight), chunk by chunk
    into preallocated buffers, measured in the same run, on the tokens that carry a loss (the fused heads skip
    prompt and padding tokens; 80% of the PPO tokens, 75% of the DPO tokens here) and on all tokens. The first
    is the lower bound the ``vs bare GEMMs`` column divides by;
  * ``unfused (torch)``: what users write: logits, an fp32 log-softmax, gather, entropy, the loss, autograd;
  * ``unfused (rlhf_kernels)``: fused_linear_logprobs -> kl_penalty -> ppo_policy_loss (four GEMMs per chunk);
  * ours: ``fused_linear_ppo_loss`` per backend (three GEMMs per chunk);
  * peers when importable: Liger-Kernel's chunked GRPO / DPO losses.
Peak memory is above the inputs (CUDA: allocator peak; CPU: peak of live tensor allocations, profiler).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util

import torch
import torch.nn.functional as F

import rlhf_kernels
from benchmarks.common import emit_row, fmt_mem, median_ms, peak_extra_bytes, publish, synced
from rlhf_kernels.ops._linear import default_chunk_size

CLIP, KL_COEF, ENT_COEF = 0.2, 0.04, 0.01


def ppo_inputs(n, h, v, dtype, device, seed=0):
    """B = n / 512 sequences of 512 tokens, 80% of them response tokens; everything the PPO head reads."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = min(n, 512)
    b = n // t
    hidden = (torch.randn(b, t, h, device=device, generator=g) / h**0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * 2 / h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), device=device, generator=g)
    mask = torch.rand(b, t, device=device, generator=g) < 0.8
    old = -torch.rand(b, t, device=device, generator=g) * 10 - 5  # log-probs of a near-uniform head ~ -log V
    ref = old + 0.05 * torch.randn(b, t, device=device, generator=g)
    adv = torch.randn(b, t, device=device, generator=g)
    return dict(hidden=hidden, weight=weight, labels=labels, old=old, ref=ref, adv=adv, mask=mask)


def unfused_torch_ppo(x):
    logits = x["hidden"] @ x["weight"].t()  # (B, T, V) in the input dtype
    logp = torch.log_softmax(logits.float(), dim=-1)  # fp32 (B, T, V)
    lp = logp.gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    ratio = torch.exp(lp - x["old"])
    adv = x["adv"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    d = x["ref"] - lp
    kl = torch.exp(d) - d - 1
    per_token = pg + KL_COEF * kl - ENT_COEF * ent
    m = x["mask"]
    return torch.where(m, per_token, 0.0).sum() / m.sum()


def unfused_ours_ppo(x, backend=None):
    lp, ent = rlhf_kernels.fused_linear_logprobs(
        x["hidden"], x["weight"], x["labels"], return_entropy=True, backend=backend
    )
    loss, _ = rlhf_kernels.ppo_policy_loss(lp, x["old"], x["adv"], x["mask"], backend=backend)
    kl = rlhf_kernels.kl_penalty(lp, x["ref"], "k3")
    m = x["mask"]
    return loss + KL_COEF * rlhf_kernels.aggregate_loss(kl, m) - ENT_COEF * rlhf_kernels.aggregate_loss(ent, m)


def fused_ppo(x, backend=None):
    return rlhf_kernels.fused_linear_ppo_loss(
        x["hidden"], x["weight"], x["labels"], x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"],
        kl_coef=KL_COEF, entropy_coef=ENT_COEF, backend=backend,
    )[0]  # fmt: skip


def liger_grpo(x):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = _liger(LigerFusedLinearGRPOLoss, beta=KL_COEF, epsilon_low=CLIP, epsilon_high=CLIP, loss_type="dapo")
    adv = x["adv"][:, 0].contiguous()  # Liger takes one advantage per sequence (GRPO)
    out = loss_fn(
        x["hidden"], x["weight"], x["labels"], x["mask"].long(), adv,
        ref_per_token_logps=x["ref"], old_per_token_logps=x["old"],
    )  # fmt: skip
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def _liger(cls, **kwargs):
    return cls(**kwargs)


def bare_gemms(x, keep=None):
    """The three GEMMs of a head, chunk by chunk at the heads' default chunk size, into preallocated buffers:
    logits = h W^T, grad_hidden = G W, grad_weight += G^T h (G stands for the logit gradient). Pure GEMM time.
    ``keep``: (B, T) bool, the tokens the head computes (the fused heads skip the others)."""
    h = x["hidden"].detach().reshape(-1, x["hidden"].shape[-1])
    if keep is not None:
        h = h[keep.reshape(-1)]
    w = x["weight"].detach()
    (n, hd), v = h.shape, w.shape[0]
    chunk = default_chunk_size(n, v, hd)
    logits = h.new_empty(chunk, v)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(w)

    def run():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            g = torch.mm(h[s:e], w.t(), out=logits[: e - s])
            torch.mm(g, w, out=grad_h[s:e])
            grad_w.addmm_(g.t(), h[s:e])

    return run


def backward_step(loss_fn, x):
    def step():
        loss_fn(x).backward()
        x["hidden"].grad = x["weight"].grad = None

    return step


def ppo_paths(x, device):
    paths = {
        "bare GEMMs (3), masked tokens": bare_gemms(x, x["mask"]),
        "bare GEMMs (3), all tokens": bare_gemms(x),
        "unfused (torch)": backward_step(unfused_torch_ppo, x),
        "unfused (rlhf_kernels)": backward_step(unfused_ours_ppo, x),
    }
    for b in rlhf_kernels.available_backends(device):
        if b != "reference":
            paths[f"fused_linear_ppo_loss ({b})"] = backward_step(functools.partial(fused_ppo, backend=b), x)
    if importlib.util.find_spec("liger_kernel") is not None:
        paths["Liger fused linear GRPO"] = backward_step(liger_grpo, x)
    return paths


def dpo_inputs(pairs, t, h, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(2 * pairs, t, h, device=device, generator=g) / h**0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device, generator=g) * 2 / h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (2 * pairs, t), device=device, generator=g)
    labels[:, : t // 4] = -100  # prompts
    ref = -torch.rand(2 * pairs, device=device, generator=g) * t * 10
    return dict(hidden=hidden, weight=weight, labels=labels, ref_c=ref[:pairs], ref_r=ref[pairs:])


def unfused_torch_dpo(x):
    logits = x["hidden"] @ x["weight"].t()
    logp = torch.log_softmax(logits.float(), dim=-1)
    y = x["labels"]
    keep = y != -100
    lp = logp.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1)
    seq = torch.where(keep, lp, 0.0).sum(-1)
    b = seq.shape[0] // 2
    h = (seq[:b] - x["ref_c"]) - (seq[b:] - x["ref_r"])
    return -F.logsigmoid(0.1 * h).mean()


def fused_dpo(x, backend=None):
    return rlhf_kernels.fused_linear_dpo_loss(
        x["hidden"], x["weight"], x["labels"], x["ref_c"], x["ref_r"], backend=backend
    )[0]


def liger_dpo(x):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = _liger(LigerFusedLinearDPOLoss, beta=0.1, use_ref_model=False)
    out = loss_fn(x["weight"], x["hidden"], x["labels"])
    return out[0] if isinstance(out, tuple) else out


def dpo_paths(x, device):
    paths = {
        "bare GEMMs (3), response tokens": bare_gemms(x, x["labels"] != -100),
        "bare GEMMs (3), all tokens": bare_gemms(x),
        "unfused (torch)": backward_step(unfused_torch_dpo, x),
    }
    for b in rlhf_kernels.available_backends(device):
        if b != "reference":
            paths[f"fused_linear_dpo_loss ({b})"] = backward_step(functools.partial(fused_dpo, backend=b), x)
    if importlib.util.find_spec("liger_kernel") is not None:
        paths["Liger fused linear DPO (reference-free)"] = backward_step(liger_dpo, x)
    return paths


def head_table(heading, paths, device, memory) -> list[str]:
    """The bare-GEMM rows (names starting with "bare") are timed before and after the others and the faster
    time is kept: they are the lower bound, and the first timings of a process can be slow on a shared VM."""
    lines = [
        f"\n### {heading}\n",
        "| path | median ms | vs bare GEMMs | peak extra memory | memory vs unfused (torch) |",
        "|---|---:|---:|---:|---:|",
    ]
    bare = {name: median_ms(fn, device, warmup=2, reps=7) for name, fn in paths.items() if name.startswith("bare")}
    rows = []
    for name, fn in paths.items():
        if name in bare:
            continue
        try:
            ms = median_ms(fn, device, warmup=2, reps=7)
            mem = peak_extra_bytes(fn, device) if memory else None
        except Exception as exc:  # a peer that fails on this machine is reported, not fatal
            rows.append((name, f"failed: {type(exc).__name__}: {str(exc)[:80]}", None))
            continue
        rows.append((name, ms, mem))
    bare = {name: min(ms, median_ms(paths[name], device, warmup=2, reps=7)) for name, ms in bare.items()}
    gemm_ms = next(iter(bare.values()))
    base_mem = next((mem for name, _, mem in rows if name == "unfused (torch)"), None)
    for name, ms in bare.items():
        emit_row(lines, f"| {name} | {ms:.1f} | {ms / gemm_ms:.2f}x | - | - |")
    for name, ms, mem in rows:
        if isinstance(ms, str):
            emit_row(lines, f"| {name} | {ms} | | | |")
            continue
        frac = "-" if mem is None or not base_mem else f"{mem / base_mem:.1%}"
        emit_row(lines, f"| {name} | {ms:.1f} | {ms / gemm_ms:.2f}x | {fmt_mem(mem)} | {frac} |")
    return lines


def eager_policy_loss(lp, old, adv, mask):
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    return torch.where(mask, pg, 0.0).sum() / mask.sum()


@functools.cache
def _compiled_policy_loss():
    return torch.compile(eager_policy_loss, dynamic=False)


def token_loss_paths(b, t, device):
    g = torch.Generator(device=device).manual_seed(0)
    lp = (-torch.rand(b, t, device=device, generator=g) * 5).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(b, t, device=device, generator=g)
    adv = torch.randn(b, t, device=device, generator=g)
    mask = torch.rand(b, t, device=device, generator=g) < 0.8

    def step(fn):
        def run():
            fn(lp, old, adv, mask).backward()
            lp.grad = None

        return run

    paths = {"torch": step(eager_policy_loss), "compile": step(lambda *a: _compiled_policy_loss()(*a))}
    for be in rlhf_kernels.available_backends(device):
        if be != "reference":
            paths[f"ppo_policy_loss ({be})"] = step(
                functools.partial(lambda *a, be: rlhf_kernels.ppo_policy_loss(*a, backend=be)[0], be=be)
            )
    return paths


def token_table(heading, paths, device, n_tokens) -> list[str]:
    lines = [f"\n### {heading}\n", "| path | median ms | ns per token | speed-up vs torch |", "|---|---:|---:|---:|"]
    base = None
    for name, fn in paths.items():
        ms = median_ms(fn, device, warmup=2, reps=20)
        base = base or ms
        emit_row(lines, f"| {name} | {ms:.3f} | {ms * 1e6 / n_tokens:.2f} | {base / ms:.2f}x |")
    return lines


def run(device, ppo_cases, dpo_cases, token_cases, memory=True) -> str:
    lines = []
    for n, h, v, dtype in ppo_cases:
        x = ppo_inputs(n, h, v, dtype, device)
        dt = str(dtype).replace("torch.", "")
        heading = f"PPO head (clip + k3 KL + entropy), forward + backward: N={n}, H={h}, V={v}, {dt}, {device.type}"
        lines += head_table(heading, ppo_paths(x, device), device, memory)
    for pairs, t, h, v, dtype in dpo_cases:
        x = dpo_inputs(pairs, t, h, v, dtype, device)
        dt = str(dtype).replace("torch.", "")
        heading = f"DPO head (sigmoid), forward + backward: {pairs} pairs x T={t}, H={h}, V={v}, {dt}, {device.type}"
        lines += head_table(heading, dpo_paths(x, device), device, memory)
    for b, t in token_cases:
        heading = f"ppo_policy_loss alone, forward + backward: B={b}, T={t}, float32, {device.type}"
        lines += token_table(heading, token_loss_paths(b, t, device), device, b * t)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (faster on CPU)")
    p.add_argument("--out", help="write the tables (markdown) and the environment to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        ppo_cases = [(8192, 4096, 128256, torch.bfloat16)]
        dpo_cases = [(4, 1024, 4096, 128256, torch.bfloat16)]
        token_cases = [(512, 4096)]
    else:
        ppo_cases = [(2048, 256, 32000, torch.float32)]
        dpo_cases = [(2, 512, 256, 32000, torch.float32)]
        token_cases = [(64, 2048)]
    table = run(device, ppo_cases, dpo_cases, token_cases, not args.no_memory)
    publish("rlhf_kernels loss heads benchmark", table, args.out)


# pytest-benchmark entry points: `pytest benchmarks/bench_losses.py` (small shapes).
_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

try:
    import pytest

    @pytest.mark.parametrize("path", list(ppo_paths(ppo_inputs(512, 64, 4096, torch.float32, _DEV), _DEV)))
    def test_ppo_head(benchmark, path):
        x = ppo_inputs(512, 64, 4096, torch.float32, _DEV)
        benchmark(synced(ppo_paths(x, _DEV)[path], _DEV))
except ImportError:  # pragma: no cover - pytest only needed for the pytest-benchmark entry points
    pass


if __name__ == "__main__":
    main()
