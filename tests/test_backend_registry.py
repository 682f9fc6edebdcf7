"""The op table (rlhf_kernels/_registry.py) against what is registered: the compiled ops' schemas, the Python ops'
schemas, backend_status per op, and every @triton.jit function of the package."""

import ast
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest
import torch
from conftest import DEVICE

import rlhf_kernels
from rlhf_kernels._backend import load_ext
from rlhf_kernels._registry import OPS, OpSpec, native_op_names, resolve

needs_ext = pytest.mark.skipif(not load_ext()[0], reason="rlhf_kernels._C is not built")


@needs_ext
def test_compiled_ops_are_the_native_ops_of_the_table():
    assert native_op_names() == {name for name, spec in OPS.items() if spec.native}


@needs_ext
@pytest.mark.parametrize("op", [name for name, spec in OPS.items() if spec.native])
def test_compiled_schema_is_the_table_schema(op):
    """csrc/module.cpp and the table agree on argument names, types and order and on the outputs."""
    assert str(getattr(torch.ops.rlhf_kernels_C, op).default._schema) == OPS[op].cpp_name + OPS[op].schema


@pytest.mark.parametrize("op", list(OPS))
def test_python_op_is_the_table_schema_plus_backend(op):
    schema = str(getattr(torch.ops.rlhf_kernels, op).default._schema)
    assert schema == f"rlhf_kernels::{op}{OPS[op].python_schema}"
    assert schema.endswith(OPS[op].schema.split(") -> ")[1]) and ", str backend) -> " in schema


@pytest.mark.parametrize("op", list(OPS))
def test_table_entries_resolve(op):
    spec = OPS[op]
    assert len(spec.examples("cpu")) >= 1 and spec.reference is not None
    if spec.triton is not None:
        assert callable(resolve(spec, spec.triton)) and spec.kernels
        for name in spec.kernels:
            assert hasattr(resolve(spec, name), "fn"), f"{spec.module}.{name} is not a @triton.jit function"


def test_backend_status_per_op():
    general = rlhf_kernels.backend_status(DEVICE)
    assert set(general) == set(rlhf_kernels.BACKENDS) and general["reference"] == "ok"
    for op, spec in OPS.items():
        status = rlhf_kernels.backend_status(DEVICE, op=op)
        assert set(status) == set(rlhf_kernels.BACKENDS)
        assert status["triton"] == general["triton"] and status["reference"] == "ok"
        for native in ("cpu", "cuda"):
            key = native.upper()
            registered = load_ext()[0] and torch._C._dispatch_has_kernel_for_dispatch_key(spec.cpp_name, key)
            assert (status[native] == "ok") == (DEVICE.type == native and registered), (op, native, status)
    if load_ext()[0]:
        other = "cuda" if DEVICE.type == "cpu" else "cpu"
        assert rlhf_kernels.backend_status(other, op="gae_fwd")[DEVICE.type] == f"needs {DEVICE.type.upper()} tensors"
    with pytest.raises(ValueError, match="unknown op 'gae'.*gae_fwd"):
        rlhf_kernels.backend_status(DEVICE, op="gae")


def test_backend_status_of_an_op_without_some_backends(monkeypatch):
    """An op that only the reference implements reports why every other backend cannot run it, and its Python op
    refuses them."""
    spec = OpSpec(
        "toy_fwd", "(Tensor x) -> Tensor", ("y",), "y = x", fake=torch.empty_like, examples=lambda device: [],
        native=False, reference=torch.clone,
    )  # fmt: skip
    monkeypatch.setitem(OPS, "toy_fwd", spec)
    status = rlhf_kernels.backend_status("cpu", op="toy_fwd")
    assert status == {
        "triton": "toy_fwd has no triton implementation",
        "cuda": "toy_fwd has no cuda implementation",
        "cpu": "toy_fwd has no cpu implementation",
        "reference": "ok",
    }
    assert spec.backends == ("reference",) and spec.cpp_name is None


def test_python_op_rejects_a_backend_that_lacks_the_op():
    r = torch.zeros(1, 3, device=DEVICE)
    m = torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="gae_fwd has no 'fortran' implementation; it has triton, cuda, cpu"):
        torch.ops.rlhf_kernels.gae_fwd(r, r, m, 0.9, 0.9, "fortran")


def _jit_functions():
    """Every @triton.jit function defined (not just imported) in a module of rlhf_kernels: {object: qualname}."""
    found = {}
    for info in pkgutil.walk_packages(rlhf_kernels.__path__, "rlhf_kernels."):
        if info.name == "rlhf_kernels._C":
            continue
        module = importlib.import_module(info.name)
        for attr, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if inspect.isfunction(fn) and fn.__module__ == info.name and type(obj).__module__.startswith("triton"):
                found[obj] = f"{info.name}.{attr}"
    return found


def _called_jit_functions(kernel):
    """The @triton.jit functions a kernel's body calls by name (compiled into it), transitively."""
    seen, todo = set(), [kernel]
    while todo:
        k = todo.pop()
        names = {n.id for n in ast.walk(ast.parse(inspect.getsource(k.fn))) if isinstance(n, ast.Name)}
        for name in names:
            obj = k.fn.__globals__.get(name)
            if obj is not None and obj not in seen and inspect.isfunction(getattr(obj, "fn", None)):
                seen.add(obj)
                todo.append(obj)
    return seen


@pytest.mark.skipif(rlhf_kernels.backend_status("cpu")["triton"].startswith("triton not installed"), reason="no triton")
def test_every_triton_kernel_is_in_the_table():
    """A new @triton.jit kernel cannot be forgotten: each one is a kernel of the table or a helper that a table
    kernel calls (which the ahead-of-time compile test then compiles as part of it)."""
    kernels = {resolve(spec, name) for spec in OPS.values() for name in spec.kernels}
    covered = set(kernels)
    for k in kernels:
        covered |= _called_jit_functions(k)
    found = _jit_functions()
    assert kernels <= set(found)
    missing = sorted(name for obj, name in found.items() if obj not in covered)
    assert not missing, f"@triton.jit functions in no op of rlhf_kernels._registry.OPS: {missing}"
    helpers = {found[obj] for obj in covered - kernels}
    assert {"rlhf_kernels._utils.to_output_dtype", "rlhf_kernels.ops.gae._compose"} <= helpers


def test_cuda_default_per_op_family(monkeypatch):
    """On CUDA the default backend is the first available of CUDA_DEFAULTS[family], then the next, then the
    reference; every public op names a family of the table."""
    from rlhf_kernels import _backend

    status = {"triton": "ok", "cuda": "ok", "cpu": "needs CPU tensors", "reference": "ok"}
    monkeypatch.setattr(_backend, "backend_status", lambda device=None, op=None: dict(status))
    _backend._resolve.cache_clear()
    try:
        for family, (first, second) in _backend.CUDA_DEFAULTS.items():
            assert {first, second} == {"triton", "cuda"}
            assert _backend._resolve(None, False, "cuda", False, family) == first
            status[first] = "not here"
            _backend._resolve.cache_clear()
            assert _backend._resolve(None, False, "cuda", False, family) == second
            status[second] = "not here"
            _backend._resolve.cache_clear()
            assert _backend._resolve(None, False, "cuda", False, family) == "reference"
            status.update(triton="ok", cuda="ok")
            _backend._resolve.cache_clear()
        assert _backend._resolve(None, False, "cpu", False, "kl") == "reference"  # cpu "unavailable" above
    finally:
        _backend._resolve.cache_clear()
    ops_dir = pathlib.Path(rlhf_kernels.__file__).parent / "ops"
    calls = [m for f in sorted(ops_dir.glob("*.py")) for m in re.findall(r"resolve_backend\(([^)]*)\)", f.read_text())]
    assert calls
    for args in calls:
        family = re.fullmatch(r'backend, \w+\.device, "(\w+)"', args.strip())
        assert family and family.group(1) in _backend.CUDA_DEFAULTS, f"resolve_backend({args}) names no op family"


@pytest.mark.skipif(not rlhf_kernels._backend.load_ext()[0], reason="rlhf_kernels._C not built")
def test_low_level_op_refuses_tensors_of_another_device_type():
    """torch.ops.rlhf_kernels.X(..., "cuda") on CPU tensors is an error naming the argument, not a silent run of
    the CPU kernel (the dispatcher picks the kernel by the tensors' device)."""
    x = torch.randn(1, 2, 7)
    y = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"logprobs_fwd: backend='cuda' runs on cuda tensors, but argument 0 is on cpu"
    ):
        torch.ops.rlhf_kernels.logprobs_fwd(x, y, 1.0, -100, "cuda")
    lp = torch.ops.rlhf_kernels.logprobs_fwd(x, y, 1.0, -100, "cpu")[0]
    assert lp.shape == (1, 2)
