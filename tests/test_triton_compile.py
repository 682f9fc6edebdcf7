"""Every Triton kernel of the op table compiles for real GPUs (sm_80 and sm_90), ahead of time, without a GPU.

The interpreter that runs the kernels in CI accepts code the GPU compiler rejects; this compiles each kernel
through Triton's full pipeline (TTIR -> PTX -> cubin with the bundled ptxas) in a subprocess without
TRITON_INTERPRET. The kernels and their signatures come from the op table (rlhf_kernels/_registry.py): each op's
Triton launcher runs on the op's example inputs, small and big (the largest blocks), with launching replaced by
recording, and every recorded (kernel, argument types, constexprs) is compiled, in every combination of its
boolean constexpr flags. tests/test_backend_registry.py checks that every @triton.jit function of the package
belongs to the table.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from rlhf_kernels._registry import OPS

SCRIPT = r"""
import itertools
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

from rlhf_kernels._registry import OPS, resolve

launched = {}  # op -> names of the kernels its launcher ran
variants = {}  # (kernel, signature, constexprs, options) -> kernel
unstated = set()  # kernels launched without an explicit enable_fp_fusion
op = None


def record(self, *args, grid, warmup, **kwargs):
    given = dict(zip([p.name for p in self.params], args), **kwargs)
    sig = {p.name: mangle_type(given[p.name]) for p in self.params if not p.is_constexpr}
    cx = {p.name: given[p.name] for p in self.params if p.is_constexpr}
    opts = {k: kwargs[k] for k in ("num_warps", "enable_fp_fusion") if k in kwargs}
    if "enable_fp_fusion" not in kwargs:
        unstated.add(self.fn.__name__)
    flags = [k for k, v in cx.items() if isinstance(v, bool)]
    for values in itertools.product((False, True), repeat=len(flags)):
        c = {**cx, **dict(zip(flags, values))}
        key = (self.fn.__name__, tuple(sig.items()), tuple(sorted(c.items())), tuple(sorted(opts.items())))
        variants[key] = (self, sig, c, opts)
    launched.setdefault(op, set()).add(self.fn.__name__)


JITFunction.run = record
import rlhf_kernels.ops.logprobs as lp_module  # noqa: E402

for op, spec in OPS.items():
    if spec.triton is not None:
        for force_split in (False, True):  # both paths of the log-prob and KL forwards (split rows, small batches)
            lp_module.FORCE_SPLIT = force_split
            for big in (False, True):
                for args in spec.examples("cpu", big):
                    resolve(spec, spec.triton)(*args)

arch = int(sys.argv[1])
for fn, sig, cx, opts in variants.values():
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in cx}}, constexprs=cx)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)  # the launch's own options
launched = {k: sorted(v) for k, v in launched.items()}
print(json.dumps({"launched": launched, "compiled": len(variants), "unstated": sorted(unstated)}))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {op: sorted(spec.kernels) for op, spec in OPS.items() if spec.triton is not None}
    assert report["launched"] == expected  # each launcher runs exactly the kernels the table lists (sorted)
    assert report["compiled"] >= sum(len(k) for k in expected.values())
    assert report["unstated"] == []  # every launch states enable_fp_fusion (rlhf_kernels._utils.FP_FUSION)
