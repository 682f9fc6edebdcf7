"""Every kernel op, forward and backward, on small shapes: the workload that compute-sanitizer checks.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m benchmarks.gpu_sanitize --quick
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python -m benchmarks.gpu_sanitize \
        --quick --parts ops,tokens
    python -m benchmarks.gpu_sanitize --device cpu --backends cpu          # dry run: the same calls on CPU

Without PyTorch's caching allocator each tensor is its own device allocation, so memcheck sees a read past the end
of a tensor and initcheck a read of memory no one wrote (both are hidden inside a larger cached block otherwise).

The calls: each low-level op of the op table (rlhf_kernels._registry.OPS) on its own edge-case examples (ignored
and masked rows holding NaN, V = 1, rows read in place from ``x[:, :-1]``), run directly on each backend; then the
public ops with autograd over vocabularies that are not a multiple of the vector width (1, 7, 8, 33, 257, 5003,
70001; ``--quick``: 1, 7, 33, 5003, 70001), in the three dtypes (``--quick``: bf16, fp32), contiguous and read in
place from ``x[:, :-1]`` and ``x[:, 1:]``, with ignored rows; GAE, the PPO losses and the four fused heads (several
chunks each). The backends default to cuda and triton on a GPU. The last line says how many calls ran; the exit
status is 1 if any call raised.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from functools import partial

import torch

import rlhf_kernels
from rlhf_kernels._registry import OPS, call

DTYPES = (torch.bfloat16, torch.float32, torch.float16)
VOCABS = (1, 7, 8, 33, 257, 5003, 70001)
QUICK_VOCABS = (1, 7, 33, 5003, 70001)
LAYOUTS = {
    "contiguous": lambda t: t[:, :-1].contiguous(),
    "x[:, :-1]": lambda t: t[:, :-1],
    "x[:, 1:]": lambda t: t[:, 1:],
}


class Runner:
    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self.errors: list[str] = []

    def run(self, name: str, fn) -> None:
        """``fn()`` then a device synchronisation, so that an asynchronous fault is reported against ``name``."""
        try:
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.calls += 1
        except Exception as exc:  # reported, counted, and the run goes on to the next call
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"SANITIZE ERROR {name}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)


def op_table_examples(r: Runner, backends: list[str]) -> None:
    for op, spec in OPS.items():
        status = rlhf_kernels.backend_status(r.device, op=op)
        for backend in backends:
            if status.get(backend) != "ok":
                continue
            for k, args in enumerate(spec.examples(r.device)):
                r.run(f"{op}[{k}] {backend}", lambda op=op, backend=backend, args=args: call(op, backend, *args))


def _lp(backend, layout, base, y, g):
    x = layout(base.clone()).requires_grad_()
    out, ent = rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend)
    ((out * g).sum() + (ent * g).sum()).backward()


def _entropy(backend, layout, base, g):
    x = layout(base.clone()).requires_grad_()
    (rlhf_kernels.entropy(x, backend=backend) * g).sum().backward()


def _kl(backend, layout, base, ref, mask, g, direction):
    x = layout(base.clone()).requires_grad_()
    kl = rlhf_kernels.kl_from_logits(x, layout(ref), mask=mask, direction=direction, backend=backend)
    (kl * g).sum().backward()


def row_ops(r: Runner, backends: list[str], vocabs, dtypes) -> None:
    """logprobs + entropy, entropy and both KL directions, forward and backward, per V, dtype and layout."""
    dev = r.device
    for v in vocabs:
        for dtype in dtypes:
            for lname, layout in LAYOUTS.items():
                rows = (1, 37) if v <= 300 else (2, 3)  # many rows per block for small V; a row per block else
                base = (torch.randn(rows[0], rows[1] + 1, v, device=dev) * 3).to(dtype)
                ref = (torch.randn(rows[0], rows[1] + 1, v, device=dev) * 3).to(dtype)
                y = torch.randint(0, v, rows, device=dev)
                y[0, 1] = -100
                mask = y != -100
                base[:, :-1][0, 1] = float("nan")  # an ignored row that the kernels must not read
                g = torch.randn(rows, device=dev)
                for backend in backends:
                    name = f"V={v} {str(dtype)[6:]} {lname} {backend}"
                    r.run(f"logprobs {name}", partial(_lp, backend, layout, base, y, g))
                    r.run(f"entropy {name}", partial(_entropy, backend, layout, ref, g))
                    for direction in ("reverse", "forward"):
                        r.run(f"kl {direction} {name}", partial(_kl, backend, layout, base, ref, mask, g, direction))


# name -> (loss function, its options): the token-level clip with dual clip, CISPO per sequence (GSPO: the
# per-sequence kernel, three passes), SAPO per sequence with per-token gradients (GSPO-token), the value loss
PPO_LOSSES = {
    "ppo_policy_loss": ("ppo_policy_loss", {"dual_clip": 3.0}),
    "ppo_policy_loss cispo sequence": ("ppo_policy_loss", {"loss_type": "cispo", "ratio_level": "sequence"}),
    "ppo_policy_loss sapo sequence_token": ("ppo_policy_loss", {"loss_type": "sapo", "ratio_level": "sequence_token"}),
    "ppo_value_loss": ("ppo_value_loss", {"clip": 0.2}),
}


def _ppo(backend, name, lp, old, adv, mask):
    fn, kw = PPO_LOSSES[name]
    lp = lp.clone().requires_grad_()
    loss, _ = getattr(rlhf_kernels, fn)(lp, old, adv, mask, backend=backend, **kw)
    loss.backward()


def token_ops(r: Runner, backends: list[str]) -> None:
    """GAE (short and long rows, holes in the mask, whitening) and the PPO policy (token and sequence levels) and
    value losses."""
    dev = r.device
    for b, t in ((3, 5), (2, 1000), (1, 4099)):
        for dtype in (torch.float32, torch.bfloat16):
            rewards = torch.randn(b, t, device=dev).to(dtype)
            values = torch.randn(b, t, device=dev).to(dtype)
            mask = torch.rand(b, t, device=dev) > 0.2
            if b > 1:
                mask[-1] = False  # a row without a step
            for backend in backends:
                for whiten in (False, True):
                    fn = partial(rlhf_kernels.gae, rewards, values, mask, gamma=0.99, lam=0.95, whiten=whiten,
                                 backend=backend)  # fmt: skip
                    r.run(f"gae B={b} T={t} {str(dtype)[6:]} whiten={whiten} {backend}", fn)
    for n in (1, 37, 5000):
        lp = -torch.rand(2, n, device=dev) * 5
        old = lp + 0.3 * torch.randn(2, n, device=dev)
        adv = torch.randn(2, n, device=dev)
        mask = torch.rand(2, n, device=dev) > 0.3
        for backend in backends:
            for name in PPO_LOSSES:
                r.run(f"{name} N=2x{n} {backend}", partial(_ppo, backend, name, lp, old, adv, mask))


def _head(backend, name, hidden, weight, labels, mask, old, adv, ref_c, ref_r):
    hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kw = dict(chunk_size=8, backend=backend)
    if name == "fused_linear_logprobs":
        out, ent = rlhf_kernels.fused_linear_logprobs(hd, w, labels, return_entropy=True, **kw)
        loss = out.sum() + ent.sum()
    elif name == "fused_linear_kl":
        loss = rlhf_kernels.fused_linear_kl(hd, w, hidden, weight * 0.9, mask=mask, **kw).sum()
    elif name == "fused_linear_ppo_loss":
        loss, _ = rlhf_kernels.fused_linear_ppo_loss(
            hd, w, labels, old, adv, mask, ref_logprobs=old, kl_coef=0.1, entropy_coef=0.01, **kw
        )
    else:
        loss, _ = rlhf_kernels.fused_linear_dpo_loss(hd, w, labels, ref_c, ref_r, **kw)
    loss.backward()


HEADS = ("fused_linear_logprobs", "fused_linear_kl", "fused_linear_ppo_loss", "fused_linear_dpo_loss")


def fused_heads(r: Runner, backends: list[str]) -> None:
    """The four fused heads, forward and backward, over several chunks (chunk_size 8 for 2 x 9 tokens)."""
    dev = r.device
    b, t, h, v = 2, 9, 32, 1001
    for dtype in (torch.float32, torch.bfloat16):
        hidden = (torch.randn(b, t, h, device=dev) / h**0.5).to(dtype)
        weight = torch.randn(v, h, device=dev).to(dtype)
        labels = torch.randint(0, v, (b, t), device=dev)
        labels[:, :2] = -100
        mask = labels != -100
        old = -torch.rand(b, t, device=dev) * 7
        adv = torch.randn(b, t, device=dev)
        ref_c, ref_r = -torch.rand(b // 2, device=dev) * 50, -torch.rand(b // 2, device=dev) * 50
        for backend in backends:
            for name in HEADS:
                fn = partial(_head, backend, name, hidden, weight, labels, mask, old, adv, ref_c, ref_r)
                r.run(f"{name} {str(dtype)[6:]} {backend}", fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", help="comma-separated (default: cuda and triton on CUDA, cpu on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer vocabularies and dtypes (QUICK_VOCABS, bf16, fp32)")
    p.add_argument("--parts", default="ops,rows,tokens,heads", help="which groups of calls to run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.backends:
        backends = args.backends.split(",")
    else:
        avail = rlhf_kernels.available_backends(device)
        backends = [b for b in ("cuda", "triton") if b in avail] if device.type == "cuda" else ["cpu"]
    torch.manual_seed(0)
    r = Runner(device)
    parts = args.parts.split(",")
    if "ops" in parts:
        op_table_examples(r, backends)
    if "rows" in parts:
        vocabs = QUICK_VOCABS if args.quick else VOCABS
        dtypes = DTYPES[:2] if args.quick else DTYPES
        row_ops(r, backends, vocabs, dtypes)
    if "tokens" in parts:
        token_ops(r, backends)
    if "heads" in parts:
        fused_heads(r, backends)
    status = "OK" if not r.errors else f"{len(r.errors)} CALLS RAISED"
    print(f"SANITIZE {status}: {r.calls} calls on {device.type} ({', '.join(backends)}), parts {args.parts}")
    for err in r.errors[:20]:
        print(f"  {err[:300]}")
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
