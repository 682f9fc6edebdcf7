"""Checks a CUDA build of rlhf_kernels._C; run by .ci/cuda_build_check.sh with the CUDA build of torch, no GPU needed.

* rlhf_kernels._C imports and was built with its CUDA sources;
* every op of the op table (rlhf_kernels/_registry.py) that has a ``cuda`` backend has a CUDA, a CPU and a Meta
  kernel, and a fake implementation that, called on fake CUDA tensors, gives the shapes and dtypes the CPU kernel
  gives on the same example inputs, on the CUDA device;
* asking for the cuda backend with CPU tensors is a clear error.

Prints one line per op and exits 1 with every failure listed.
"""

import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_op(spec) -> list[str]:
    """The failures of one op of the table (empty when it passes)."""
    failures = []
    for key in ("CUDA", "CPU", "Meta"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(spec.cpp_name, key):
            failures.append(f"{spec.cpp_name}: no {key} kernel registered")
    op = getattr(torch.ops.rlhf_kernels_C, spec.name).default
    examples = spec.examples("cpu")
    for i, args in enumerate(examples):
        real = _outputs(op(*args))  # the CPU kernel of this same build
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a).to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
            fake = _outputs(op(*fake_args))
        got = [(tuple(f.shape), f.dtype, f.device.type) for f in fake]
        want = [(tuple(r.shape), r.dtype, "cuda") for r in real]
        if got != want:
            failures.append(f"{spec.cpp_name}, example {i}: fake outputs {got}, CPU kernel outputs {want}")
    if not failures:
        print(f"ok  {spec.cpp_name}: CUDA, CPU and Meta kernels; fake = CPU kernel shapes on {len(examples)} examples")
    return failures


def check_cpu_tensors_rejected() -> list[str]:
    """backend="cuda" with CPU tensors: a ValueError that names the cause, before any kernel runs."""
    import rlhf_kernels

    logits, labels = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64)
    try:
        rlhf_kernels.logprobs(logits, labels, backend="cuda")
    except ValueError as exc:
        if "needs CUDA tensors" not in str(exc):
            return [f"backend='cuda' with CPU tensors: unclear error: {exc}"]
        print(f"ok  backend='cuda' with CPU tensors: ValueError: {exc}")
        return []
    return ["backend='cuda' with CPU tensors ran instead of failing"]


def main() -> int:
    if torch.version.cuda is None:
        print(f"torch {torch.__version__} is a CPU build: this check needs the CUDA build", file=sys.stderr)
        return 1
    import rlhf_kernels
    from rlhf_kernels._backend import load_ext
    from rlhf_kernels._registry import OPS, native_op_names

    loaded, why = load_ext()
    if not loaded:
        print(f"rlhf_kernels._C does not import: {why}", file=sys.stderr)
        return 1
    print(f"rlhf_kernels._C: {sys.modules['rlhf_kernels._C'].__file__} (torch {torch.__version__})")
    specs = [spec for spec in OPS.values() if "cuda" in spec.backends]
    failures = []
    missing = {spec.name for spec in specs} - native_op_names()
    if missing:
        failures.append(f"ops of the table not registered by rlhf_kernels._C: {', '.join(sorted(missing))}")
    for spec in specs:
        if spec.name not in missing:
            failures += check_op(spec)
    failures += check_cpu_tensors_rejected()
    print(f"backends for CUDA tensors: {rlhf_kernels.backend_status('cuda')}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
