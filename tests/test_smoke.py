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


def test_every_training_module_imports():
    """The training layer (needs the ``train`` extra) imports module by module; it never imports back the other way."""
    import pytest

    for dep in ("transformers", "datasets", "tokenizers", "peft", "yaml", "safetensors", "matplotlib", "tqdm"):
        pytest.importorskip(dep)
    import rlhf

    names = [m.name for m in pkgutil.walk_packages(rlhf.__path__, "rlhf.")]
    for name in names:
        importlib.import_module(name)
    assert {"rlhf.data", "rlhf.models", "rlhf.sft", "rlhf.reward", "rlhf.cli", "rlhf.train"} <= set(names)


def test_backend_report():
    status = rlhf_kernels.backend_status("cpu")
    assert status["reference"] == "ok"
    assert all(isinstance(v, str) and v for v in status.values())
    assert rlhf_kernels.available_backends("cpu")[-1] == "reference"


def test_imports_and_runs_without_triton():
    """A CPU-only install without triton still imports and computes (C++ or reference backend)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, rlhf_kernels\n"
        "assert 'triton' not in rlhf_kernels.available_backends('cpu')\n"
        "x = torch.randn(3, 10); y = torch.tensor([1, 2, 3])\n"
        "ref = rlhf_kernels.logprobs(x, y, backend='reference')\n"
        "assert torch.allclose(rlhf_kernels.logprobs(x, y), ref, atol=1e-6)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "RLHF_KERNELS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
