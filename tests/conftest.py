"""Shared test setup: Triton kernels run under the interpreter on machines without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels
# Bad-input tests expect a ValueError: on CUDA the data checks are otherwise device-side asserts (no host sync),
# which end the process's CUDA context. tests/test_cuda_graphs.py checks that asynchronous path on its own.
os.environ.setdefault("RLHF_KERNELS_SYNC_CHECKS", "1")

import pytest  # noqa: E402

import rlhf_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKENDS = [b for b in rlhf_kernels.available_backends(DEVICE) if b != "reference"]
ALL_BACKENDS = rlhf_kernels.available_backends(DEVICE)
# Backends whose rows are bitwise batch-invariant: the kernels; the reference is plain PyTorch, invariant on CPU
# but not on CUDA (its reductions pick their order by shape).
INVARIANT_BACKENDS = KERNEL_BACKENDS + (["reference"] if DEVICE.type == "cpu" else [])


def op_backends(op: str) -> list[str]:
    """The kernel backends (not the reference) that run the low-level ``op`` here, from the op table."""
    status = rlhf_kernels.backend_status(DEVICE, op=op)
    return [b for b in KERNEL_BACKENDS if status[b] == "ok"]


def pytest_report_header(config):
    return f"rlhf_kernels backends on {DEVICE}: {rlhf_kernels.backend_status(DEVICE)}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(ours, plain, ref, atol, what=""):
    """flash-attention's rule: |ours - ref| <= 2 |plain torch in the same dtype - ref| + atol (max norms)."""
    e_ours, e_torch = max_err(ours, ref), max_err(plain, ref)
    assert e_ours <= 2 * e_torch + atol, f"{what}: ours {e_ours:.3g} vs torch {e_torch:.3g} (+atol {atol:g})"
