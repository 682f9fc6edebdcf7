"""Every low-level op of the op table, on every backend available here, on the same inputs: every output (the saved
statistics included) against the fp64 reference of the table, and against the op's fake implementation.

Driven by rlhf_kernels._registry.OPS: a new op is covered by adding it to the table, with its example inputs
(ignored rows holding NaN, masks with holes, V not a power of two, rows longer than one block).

Rule per output: where the fp64 reference is exactly 0 or NaN (ignored rows, masked-out rows, tokens that do not
count, clipped gradients, identical rows, out-of-range labels) every backend must give exactly 0 / NaN; elsewhere
flash-attention's rule, |ours - fp64| <= 2 |plain PyTorch in fp32 - fp64| + atol (max norms), with atol four fp32
ulps of the output's largest value; outputs that stack several quantities (OpSpec.columns: GAE row statistics,
PPO sums) are compared column by column. A second test checks that the kernel backends accept the same argument
layouts, and that a layout never changes a result.
"""

import pytest
import torch
from conftest import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode

import rlhf_kernels
from rlhf_kernels._registry import OPS

CASES = [(op, i) for op, spec in OPS.items() for i in range(len(spec.examples("cpu")))]


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _fake_outputs(op, args, backend):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        python = _tuple(getattr(torch.ops.rlhf_kernels, op)(*fake_args, backend))
        compiled = None
        if backend in ("cpu", "cuda"):
            compiled = _tuple(getattr(torch.ops.rlhf_kernels_C, op)(*fake_args))
    return python, compiled


def _meta(t):
    return t.shape, t.dtype, t.device.type, t.is_contiguous()


def _check_output(what, got, ref64, plain):
    assert got.shape == ref64.shape, what
    exact = (ref64 == 0) | ref64.isnan()
    g, r = got[exact].double(), ref64[exact]
    assert torch.equal(g.isnan(), r.isnan()) and bool((g[~g.isnan()] == 0).all()), f"{what}: defined values differ"
    rest = ~exact
    if not rest.any():
        return
    ours = (got[rest].double() - ref64[rest]).abs().max().item()
    torch_err = (plain[rest].double() - ref64[rest]).abs().max().item()
    atol = 4 * torch.finfo(torch.float32).eps * ref64[rest].abs().max().item()
    assert ours <= 2 * torch_err + atol, f"{what}: ours {ours:.3g} vs torch {torch_err:.3g} (+atol {atol:.3g})"


@pytest.mark.parametrize("op,case", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_backends_agree(op, case):
    spec = OPS[op]
    args = spec.examples(DEVICE)[case]
    status = rlhf_kernels.backend_status(DEVICE, op=op)
    backends = [b for b in spec.backends if status[b] == "ok"]
    assert "reference" in backends
    ref64 = _tuple(spec.reference(*args, cast=False))
    plain = _tuple(spec.reference(*args, dtype=torch.float32))
    assert len(ref64) == len(spec.outputs)
    for backend in backends:
        out = _tuple(getattr(torch.ops.rlhf_kernels, op)(*args, backend))
        python_fake, compiled_fake = _fake_outputs(op, args, backend)
        for fakes in (python_fake, compiled_fake):
            if fakes is not None:
                assert [_meta(t) for t in fakes] == [_meta(t) for t in out], f"{op} {backend}: fake vs real"
        for k, name in enumerate(spec.outputs):
            what = f"{op}[{case}] {backend} {name}"
            if name in spec.columns:  # each stacked quantity on its own scale
                assert out[k].shape[-1] == len(spec.columns[name])
                for c, col in enumerate(spec.columns[name]):
                    _check_output(f"{what}.{col}", out[k][..., c], ref64[k][..., c], plain[k][..., c])
            else:
                _check_output(what, out[k], ref64[k], plain[k])


def _strided_copy(t, dim):
    """``t``'s values in a tensor whose ``dim`` has stride 2 (any other layout unchanged)."""
    shape = list(t.shape)
    shape[dim] *= 2
    out = torch.empty(shape, dtype=t.dtype, device=t.device)[(slice(None),) * (dim % t.dim()) + (slice(None, None, 2),)]
    out.copy_(t)
    return out


@pytest.mark.parametrize("op", list(OPS))
def test_backends_agree_on_layouts(op):
    """Each tensor argument, in turn, with stride 2 on its first or its last dimension: every kernel backend
    either rejects it or returns exactly what it returns for the contiguous argument, and they all make the same
    choice (the layouts an op accepts are part of its contract)."""
    spec = OPS[op]
    status = rlhf_kernels.backend_status(DEVICE, op=op)
    backends = [b for b in spec.backends if status[b] == "ok" and b != "reference"]
    if not backends:
        pytest.skip("no kernel backend here")
    args = spec.examples(DEVICE)[0]
    accepted = {}
    for backend in backends:
        base = _tuple(getattr(torch.ops.rlhf_kernels, op)(*args, backend))
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor) or a.numel() == 0:
                continue
            for dim in (0, -1):
                strided = list(args)
                strided[i] = _strided_copy(a, dim)
                try:
                    out = _tuple(getattr(torch.ops.rlhf_kernels, op)(*strided, backend))
                except (ValueError, RuntimeError):
                    accepted[(backend, i, dim)] = False
                    continue
                accepted[(backend, i, dim)] = True
                for k, (x, y) in enumerate(zip(out, base)):
                    same = torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())
                    assert same, f"{op} {backend}: argument {i} strided on dim {dim} changes {spec.outputs[k]}"
    for backend in backends[1:]:
        mine = {key[1:]: v for key, v in accepted.items() if key[0] == backend}
        first = {key[1:]: v for key, v in accepted.items() if key[0] == backends[0]}
        assert mine == first, f"{op}: {backend} and {backends[0]} accept different layouts"
