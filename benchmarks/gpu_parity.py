"""Backend parity on one device: each kernel backend against the fp64 reference, under the tests' tolerance rule.

    python -m benchmarks.gpu_parity --out parity.md                  # CUDA: triton and cuda, every vocabulary
    python -m benchmarks.gpu_parity --only large --out large.md      # N * V > 2**31 elements (8500 x 256000 bf16)
    python -m benchmarks.gpu_parity --quick --device cpu --backends cpu   # dry run on CPU (triton too under
                                                                          # TRITON_INTERPRET=1)

Sections (``--only`` picks some; the default runs ``parity`` and ``invariance``):

* ``parity``: logprobs + entropy (forward and backward) and kl_from_logits in both directions (forward and
  backward) for every V in VOCABS, dtype and layout (a contiguous (B, T, V) tensor, and ``x[:, :-1]`` and
  ``x[:, 1:]`` read in place from a (B, T + 1, V) tensor: rows that start at any element offset), with ignored
  rows (label ``ignore_index``, mask False). A check passes when ``err(ours vs fp64) <= 2 * err(plain torch in
  the same dtype vs fp64) + atol`` (max norms; the atol of tests/test_logprobs.py), and ignored rows are
  exactly 0 with zero gradient rows.
* ``invariance``: a row computed alone and inside a large batch (read in place, with NaN-filled ignored rows
  that must never be read) gives bitwise equal outputs and gradient rows, per backend. For V > 2 blocks the
  row alone takes the Triton log-prob forward's split path (fewer rows than twice the SM count) and the batch
  (>= 524 rows) the one-program path, so this also checks that the two agree bitwise on the GPU.
* ``large``: one (N, V) tensor with N * V > 2**31 (64-bit offsets): forward and backward of logprobs and of
  the reverse KL; the first, middle and last rows checked against the fp64 reference and the last row
  against itself computed alone. The reference is computed for those rows only.

``--inject-error BACKEND`` adds 1.0 to one output of BACKEND whenever a batch has more than one row: a
self-test that the report fails (tests/test_gpu_scripts.py). The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

import rlhf_kernels
from rlhf_kernels import reference

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = {"bf16": BF16, "fp32": F32, "fp16": F16}
ATOL = {F32: 1e-5, BF16: 1e-3, F16: 1e-4}  # as in tests/test_logprobs.py and tests/test_kl.py
VOCABS = (1, 7, 8, 33, 50257, 152064, 256000)
QUICK_VOCABS = (1, 7, 33, 300)
LAYOUTS = {
    "contiguous": None,
    "x[:, :-1]": lambda t: t[:, :-1],
    "x[:, 1:]": lambda t: t[:, 1:],
}
IGNORE = -100


@dataclasses.dataclass
class Check:
    section: str
    what: str  # e.g. "logprobs", "kl reverse grad"
    case: str  # V, dtype, layout
    backend: str
    err: float = 0.0  # max |ours - fp64|
    err_torch: float = 0.0  # max |plain torch in the same dtype - fp64|
    atol: float = 0.0
    ok: bool = True
    note: str = ""
    diff: float | None = None  # max |this backend - the first backend| (the second and later backends)

    def __post_init__(self):  # progress on stderr, so a run cut by its time limit still shows what it checked
        status = "ok" if self.ok else "FAIL"
        print(f"{status} {self.section} {self.what} {self.case} {self.backend} {self.note}", file=sys.stderr)

    @property
    def bound(self) -> float:
        return 2 * self.err_torch + self.atol


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------------------
# The ops as measured: ours per backend (optionally with an injected error), plain torch, the fp64 reference
# ---------------------------------------------------------------------------------------------------------


class Ops:
    def __init__(self, inject: set[str]):
        self.inject = inject

    def _perturb(self, t: torch.Tensor, backend: str) -> torch.Tensor:
        if backend not in self.inject or t.numel() < 2:
            return t
        bump = torch.zeros_like(t)
        bump.view(-1)[0] = 1.0
        return t + bump

    def logprobs(self, backend, x, y):
        if backend == "torch":
            logp = torch.log_softmax(x, dim=-1)  # in the dtype of x: the baseline whose error bounds ours
            ignored = y == IGNORE
            lp = logp.gather(-1, y.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            return lp.masked_fill(ignored, 0), ent.masked_fill(ignored, 0)
        if backend == "fp64":
            return reference.logprobs(x, y, 1.0, IGNORE)
        lp, ent = rlhf_kernels.logprobs(x, y, return_entropy=True, ignore_index=IGNORE, backend=backend)
        return self._perturb(lp, backend), ent

    def kl(self, backend, x, r, mask, direction):
        if backend == "torch":
            logp, logq = torch.log_softmax(x, dim=-1), torch.log_softmax(r, dim=-1)
            if direction == "forward":
                logp, logq = logq, logp
            kl = (logp.exp() * (logp - logq)).sum(-1)
            return kl if mask is None else kl * mask
        if backend == "fp64":
            return reference.kl_from_logits(x, r.double(), mask=mask, direction=direction)
        kl = rlhf_kernels.kl_from_logits(x, r, mask=mask, direction=direction, backend=backend)
        return self._perturb(kl, backend)


def _logprobs_with_grad(ops, backend, leaf, view, y, w_lp, w_ent):
    """(logprobs, entropy, grad of sum(w_lp * lp + w_ent * ent) w.r.t. the leaf) for one provider."""
    leaf.grad = None
    lp, ent = ops.logprobs(backend, view(leaf), y)
    ((lp.double() * w_lp).sum() + (ent.double() * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), leaf.grad.detach().clone()


def _kl_with_grad(ops, backend, leaf, view, r, mask, direction, w):
    leaf.grad = None
    kl = ops.kl(backend, view(leaf), r, mask, direction)
    (kl.double() * w).sum().backward()
    return kl.detach(), leaf.grad.detach().clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _shifted(t: torch.Tensor) -> torch.Tensor:
    return t[:, 1:]


def _leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


def _rows_for(v: int, quick: bool) -> int:
    """T of the (2, T, V) case: small vocabularies get more rows (2 * T * V <= 2**23 once T > 4)."""
    return 3 if quick else max(4, min(64, 2**22 // v))


def _ignored(shape, device) -> torch.Tensor:
    """(B, T) bool: the rows treated as ignored (label ignore_index, mask False)."""
    ign = torch.zeros(shape, dtype=torch.bool, device=device)
    ign[0, 1] = True
    ign[-1, -1] = True
    return ign


def parity_checks(ops, backends, device, vocabs, dtypes, quick) -> list[Check]:
    checks = []
    for v in vocabs:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for lname, view in LAYOUTS.items():
                torch.manual_seed(v)
                b, t = 2, _rows_for(v, quick)
                base = (torch.randn(b, t + 1, v, device=device) * 3).to(dtype)
                ref_base = (base.float() + torch.randn(b, t + 1, v, device=device)).to(dtype)
                if view is None:  # a fresh contiguous (B, T, V) tensor
                    base, ref_base, view = base[:, :-1].contiguous(), ref_base[:, :-1].contiguous(), _same
                r = view(ref_base)
                ign = _ignored((b, t), device)
                y = torch.randint(0, v, (b, t), device=device).masked_fill(ign, IGNORE)
                mask = ~ign
                w_lp, w_ent, w_kl = (torch.randn(b, t, device=device, dtype=torch.float64) for _ in range(3))
                case = f"V={v} {dname} {lname}"
                leaf = _leaf(base)
                ref = _logprobs_with_grad(ops, "fp64", _leaf(base, torch.float64), view, y, w_lp, w_ent)
                plain = _logprobs_with_grad(ops, "torch", leaf, view, y, w_lp, w_ent)
                outs = {be: _logprobs_with_grad(ops, be, leaf, view, y, w_lp, w_ent) for be in backends}
                checks += _compare("logprobs", ("logprobs", "entropy", "logprobs+entropy grad"), case, outs,
                                   plain, ref, ATOL[dtype])  # fmt: skip
                checks += _ignored_rows_zero("logprobs", case, outs, ign, view)
                for direction in ("reverse", "forward"):
                    args = (view, r, mask, direction, w_kl)
                    ref = _kl_with_grad(ops, "fp64", _leaf(base, torch.float64), *args)
                    plain = _kl_with_grad(ops, "torch", leaf, *args)
                    outs = {be: _kl_with_grad(ops, be, leaf, *args) for be in backends}
                    names = (f"kl {direction}", f"kl {direction} grad")
                    checks += _compare("kl", names, case, outs, plain, ref, ATOL[dtype])
                    checks += _ignored_rows_zero(f"kl {direction}", case, outs, ign, view)
    return checks


def _compare(section, names, case, outs, plain, ref, atol) -> list[Check]:
    checks = []
    for k, name in enumerate(names):
        e_torch = max_err(plain[k], ref[k])
        first = next(iter(outs.values()))
        for i, (be, out) in enumerate(outs.items()):
            err = max_err(out[k], ref[k])
            ok = err <= 2 * e_torch + atol  # Check.bound; False for NaN
            diff = max_err(out[k], first[k]) if i else None
            checks.append(Check(section, name, case, be, err, e_torch, atol, ok=ok, diff=diff))
    return checks


def _ignored_rows_zero(section, case, outs, ign, view) -> list[Check]:
    """Every per-row output of an ignored row is 0 and its gradient row is zero."""
    checks = []
    for be, out in outs.items():
        *values, grad = out
        ok = all(bool((val[ign] == 0).all()) for val in values)
        ok &= bool((view(grad)[ign] == 0).all())
        checks.append(Check(section, "ignored rows are 0", case, be, ok=ok, note="" if ok else "nonzero"))
    return checks


def invariance_checks(ops, backends, device, vocabs, dtypes, quick) -> list[Check]:
    """Rows alone vs inside a large in-place batch whose ignored rows hold NaN: bitwise equal."""
    checks = []
    for v in vocabs:
        for dname in dtypes:
            dtype = DTYPES[dname]
            n = 16 if quick else max(64, min(4096, 2**27 // v))
            torch.manual_seed(v + 1)
            t = n // 2
            base = (torch.randn(2, t + 1, v, device=device) * 3).to(dtype)
            ref_base = (base.float() + torch.randn(2, t + 1, v, device=device)).to(dtype)
            ign = _ignored((2, t), device)
            base[:, 1:][ign] = float("nan")  # ignored rows are never read
            ref_base[:, 1:][ign] = float("nan")
            y = torch.randint(0, v, (2, t), device=device).masked_fill(ign, IGNORE)
            w = torch.randn(2, t, device=device, dtype=torch.float64)
            rows = [(0, 0), (1, t // 2), (1, t - 2)]  # not ignored
            case = f"V={v} {dname} N={2 * t} vs 1"
            for be in backends:
                ok = True

                def lp_run(src, view, lab, wt, be=be):
                    lp, ent, grad = _logprobs_with_grad(ops, be, _leaf(src), view, lab, wt, wt)
                    return lp, ent, view(grad)

                def kl_run(src, view, r, m, wt, direction, be=be):
                    kl, grad = _kl_with_grad(ops, be, _leaf(src), view, r, m, direction, wt)
                    return kl, view(grad)

                full = lp_run(base, _shifted, y, w)
                ok &= all(bool((o[ign] == 0).all()) for o in full)
                fkl = {d: kl_run(base, _shifted, ref_base[:, 1:], ~ign, w, d) for d in ("reverse", "forward")}
                ok &= all(bool((o[ign] == 0).all()) for d in fkl for o in fkl[d])
                for i, j in rows:
                    x1 = base[i, 1 + j].reshape(1, 1, v).clone()
                    alone = lp_run(x1, _same, y[i, j].reshape(1, 1), w[i, j].reshape(1, 1))
                    ok &= all(torch.equal(a[0, 0], f[i, j]) for a, f in zip(alone, full))
                    r1 = ref_base[i, 1 + j].reshape(1, 1, v).clone()
                    m1 = torch.ones(1, 1, dtype=torch.bool, device=device)
                    for d, f in fkl.items():
                        a = kl_run(x1, _same, r1, m1, w[i, j].reshape(1, 1), d)
                        ok &= torch.equal(a[0][0, 0], f[0][i, j]) and torch.equal(a[1][0, 0], f[1][i, j])
                checks.append(Check("invariance", "row alone == row in batch (lp, ent, kl, grads)", case, be,
                                    ok=ok, note="" if ok else "differs"))  # fmt: skip
    return checks


def large_checks(ops, backends, device, n, v) -> list[Check]:
    """logprobs and reverse KL, forward and backward, on one (n, v) bf16 tensor; a few rows against fp64."""
    checks = []
    torch.manual_seed(0)
    x = torch.randn(n, v, device=device, dtype=BF16).mul_(2)
    r = torch.randn(n, v, device=device, dtype=BF16).mul_(0.5).add_(x)
    y = torch.randint(0, v, (n,), device=device)
    rows = torch.tensor(sorted({0, n // 2, n - 1}), device=device)
    case = f"N={n} V={v} bf16 (N*V = {n * v / 2**31:.2f} * 2**31)"
    w = torch.zeros(n, device=device, dtype=torch.float64)
    w[rows] = torch.randn(len(rows), device=device, dtype=torch.float64)
    xr, rr = x[rows], r[rows]
    ref_lp = _logprobs_with_grad(ops, "fp64", _leaf(xr, torch.float64), _same, y[rows], w[rows], w[rows])
    plain_lp = _logprobs_with_grad(ops, "torch", _leaf(xr), _same, y[rows], w[rows], w[rows])
    ref_kl = _kl_with_grad(ops, "fp64", _leaf(xr, torch.float64), _same, rr, None, "reverse", w[rows])
    plain_kl = _kl_with_grad(ops, "torch", _leaf(xr), _same, rr, None, "reverse", w[rows])
    for be in backends:
        leaf = x.requires_grad_()
        lp, ent = ops.logprobs(be, leaf, y)
        ((lp.double() * w).sum() + (ent.double() * w).sum()).backward()
        ours = (lp.detach()[rows], ent.detach()[rows], leaf.grad[rows])
        leaf.grad = None
        checks += _compare("large", ("logprobs", "entropy", "logprobs+entropy grad"), case, {be: ours}, plain_lp,
                           ref_lp, ATOL[BF16])  # fmt: skip
        alone = ops.logprobs(be, x.detach()[n - 1 :].clone(), y[n - 1 :])
        same = torch.equal(alone[0][0], lp.detach()[n - 1]) and torch.equal(alone[1][0], ent.detach()[n - 1])
        checks.append(Check("large", "last row alone == in batch", case, be, ok=same, note="" if same else "differs"))
        del lp, ent, ours
        kl = ops.kl(be, leaf, r, None, "reverse")
        (kl.double() * w).sum().backward()
        ours = (kl.detach()[rows], leaf.grad[rows])
        leaf.grad = None
        checks += _compare("large", ("kl reverse", "kl reverse grad"), case, {be: ours}, plain_kl, ref_kl, ATOL[BF16])
        del kl, ours
        x.requires_grad_(False)
    return checks


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _fmt(e: float) -> str:
    return f"{e:.2e}"


def _ratio(c: Check) -> float:
    if c.bound > 0:
        return c.err / c.bound
    return 0.0 if c.err == 0 else float("inf")


def summary_table(checks: list[Check], backends: list[str]) -> list[str]:
    """One row per (output, dtype): worst errors over vocabularies and layouts, and passes per backend."""
    measured = [c for c in checks if c.atol > 0]
    groups: dict[tuple[str, str], list[Check]] = {}
    for c in measured:
        dtype = next(tok for tok in c.case.split() if tok in DTYPES)
        groups.setdefault((c.what, dtype), []).append(c)
    head = "| output | dtype | torch err | " + " | ".join(f"{b} err | {b} worst err/bound | {b} pass" for b in backends)
    pairs = [f"{b} vs {backends[0]}" for b in backends[1:]]  # max |difference| between backends, for information
    lines = [
        " | ".join([head, *pairs]) + " |",
        "|---|---|---:|" + "---:|---:|---:|" * len(backends) + "---:|" * len(pairs),
    ]
    for (what, dtype), cs in groups.items():
        row = f"| {what} | {dtype} | {_fmt(max(c.err_torch for c in cs))} |"
        for b in backends:
            mine = [c for c in cs if c.backend == b]
            if not mine:
                row += " - | - | - |"
                continue
            worst = max(_ratio(c) for c in mine)
            row += f" {_fmt(max(c.err for c in mine))} | {worst:.2f} | {sum(c.ok for c in mine)}/{len(mine)} |"
        for b in backends[1:]:
            diffs = [c.diff for c in cs if c.backend == b and c.diff is not None]
            row += f" {_fmt(max(diffs))} |" if diffs else " - |"
        lines.append(row)
    return lines


def flag_table(checks: list[Check], backends: list[str]) -> list[str]:
    """Pass counts of the yes/no checks (ignored rows, invariance) per backend."""
    flags = [c for c in checks if c.atol == 0]
    names = sorted({(c.section, c.what) for c in flags})
    lines = ["| check | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
    for section, what in names:
        cells = []
        for b in backends:
            mine = [c for c in flags if (c.section, c.what, c.backend) == (section, what, b)]
            cells.append(f"{sum(c.ok for c in mine)}/{len(mine)}" if mine else "-")
        lines.append(f"| {section}: {what} | " + " | ".join(cells) + " |")
    return lines


def failure_lines(checks: list[Check], limit: int = 40) -> list[str]:
    bad = [c for c in checks if not c.ok]
    lines = [
        f"- {c.section} {c.what}, {c.case}, {c.backend}: "
        + (c.note or f"err {_fmt(c.err)} > bound {_fmt(c.bound)} (torch err {_fmt(c.err_torch)}, atol {c.atol:g})")
        for c in bad[:limit]
    ]
    if len(bad) > limit:
        lines.append(f"- ... and {len(bad) - limit} more")
    return lines


def report(checks: list[Check], backends: list[str], header: list[str]) -> str:
    failed = sum(not c.ok for c in checks)
    lines = header + [""]
    if any(c.atol > 0 for c in checks):
        lines += ["err = max |ours - fp64 reference|; bound = 2 * torch err + atol; pass = err <= bound.", ""]
        lines += summary_table(checks, backends) + [""]
    if any(c.atol == 0 for c in checks):
        lines += flag_table(checks, backends) + [""]
    lines += [f"**{len(checks) - failed}/{len(checks)} checks pass, {failed} fail.**", ""]
    if failed:
        lines += ["Failures:", ""] + failure_lines(checks) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", help="comma-separated (default: every kernel backend available on the device)")
    p.add_argument("--only", default="parity,invariance", help="sections: parity, invariance, large")
    p.add_argument("--quick", action="store_true", help="small vocabularies and few rows (CPU dry run, tests)")
    p.add_argument("--vocabs", help="comma-separated V list (default: VOCABS, or QUICK_VOCABS with --quick)")
    p.add_argument("--dtypes", help="comma-separated of bf16, fp32, fp16 (default: all; bf16,fp32 with --quick)")
    p.add_argument("--large-shape", default="8500x256000", help="N x V of the large section (bf16)")
    p.add_argument("--inject-error", default="", help="self-test: perturb this backend's outputs")
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends.split(",") if args.backends else None
    backends = backends or [b for b in rlhf_kernels.available_backends(device) if b != "reference"]
    vocabs = [int(v) for v in args.vocabs.split(",")] if args.vocabs else (QUICK_VOCABS if args.quick else VOCABS)
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16", "fp32"] if args.quick else list(DTYPES))
    ops = Ops(set(filter(None, args.inject_error.split(","))))
    sections = args.only.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = [f"### Backend parity on {name} ({', '.join(sections)})", "", f"- backends: {', '.join(backends)}"]
    checks: list[Check] = []
    for section in sections:
        t0 = time.perf_counter()
        if section == "parity":
            checks += parity_checks(ops, backends, device, vocabs, dtypes, args.quick)
            header.append(f"- parity: V in {list(vocabs)}, {', '.join(dtypes)}, layouts {', '.join(LAYOUTS)}")
        elif section == "invariance":
            inv_vocabs = vocabs if args.quick else [v for v in vocabs if v in (33, 50257, 152064)] or vocabs
            inv_dtypes = [d for d in dtypes if d != "fp16"] or dtypes
            checks += invariance_checks(ops, backends, device, inv_vocabs, inv_dtypes, args.quick)
            header.append(f"- invariance: V in {list(inv_vocabs)}, {', '.join(inv_dtypes)}")
        elif section == "large":
            n, v = (int(s) for s in args.large_shape.lower().split("x"))
            checks += large_checks(ops, backends, device, n, v)
            header.append(f"- large: N={n}, V={v}, bf16 ({n * v * 2 / 2**30:.2f} GiB per tensor)")
        else:
            p.error(f"unknown section {section!r}")
        header[-1] += f" ({time.perf_counter() - t0:.1f} s)"
    text = report(checks, backends, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    failed = sum(not c.ok for c in checks)
    print(f"PARITY {args.only}: {len(checks)} checks, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
