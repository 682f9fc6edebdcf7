"""Every module imports, and the package works (reference backend) whether or not _C is built."""

import importlib
import pkgutil

import rlhf_kernels


def test_every_module_imports():
    names = [
        m.name for m in pkgutil.walk_packages(rlhf_kernels.__path__, "rlhf_kernels.") if m.name != "rlhf_kernels._C"
    ]
    for name in names:
        importlib.import_module(name)
    assert "rlhf_kernels.ops.logprobs" in names


def test_backend_report():
    status = rlhf_kernels.backend_status("cpu")
    assert status["reference"] == "ok"
    assert all(isinstance(v, str) and v for v in status.values())
    assert rlhf_kernels.available_backends("cpu")[-1] == "reference"
