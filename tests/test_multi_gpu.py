"""Ops on a GPU that is not the current one: every Triton and CUDA implementation of the op table runs on its
inputs' device (inputs on cuda:1 while the current device is cuda:0) and gives what it gives on cuda:0.
Needs two GPUs; skipped otherwise."""

import pytest
import torch

from rlhf_kernels import _registry
from rlhf_kernels._registry import OPS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


def _on(device, value):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_op_runs_on_its_inputs_device(op, backend):
    spec = OPS[op]
    if backend not in spec.backends:
        pytest.skip(f"{op} has no {backend} implementation")
    if backend == "cuda" and op not in _registry.native_op_names():
        pytest.skip("the CUDA extension is not built")
    torch.cuda.set_device(0)
    for args in spec.examples("cuda:0", False):
        expected = _registry.call(op, backend, *args)
        moved = tuple(_on("cuda:1", a) for a in args)
        got = _registry.call(op, backend, *moved)
        torch.cuda.synchronize(1)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, g in zip(expected, got, strict=True):
            assert g.device == torch.device("cuda", 1)
            assert torch.equal(g.cpu(), e.cpu()), op
