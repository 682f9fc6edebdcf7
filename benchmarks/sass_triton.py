"""Ahead-of-time sm_90 compilation of the Triton kernels as their real launches configure them (no GPU needed).

Run by benchmarks/sass_report.py in a subprocess without TRITON_INTERPRET:

    python -m benchmarks.sass_triton REQUEST.json OUT_DIR

REQUEST.json lists {"kernel", "op", "dtype", "size"} cases. For each, the op's Triton launcher (from the op table,
rlhf_kernels/_registry.py) runs on CPU tensors of the representative shape with ``JITFunction.run`` replaced by
recording, as tests/test_triton_compile.py does; the recorded launch gives the constexprs (BLOCK_V ...), the
options (num_warps, enable_fp_fusion) and, through Triton's own argument specialisation, the signature and the
16-byte divisibility attributes a real launch on these tensors would compile with. Each distinct launch is
compiled with triton.compile(ASTSource, GPUTarget("cuda", 90, 32)); its cubin goes to OUT_DIR and ptxas's -v
log (registers, spills) is captured. Prints one JSON line: a list of results, one per case.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
ROWS = (4, 16)  # (B, T) of the row kernels: the row count only sizes the grid; T = 16 keeps 16-divisible strides


def launcher_args(op: str, dtype: torch.dtype, n: int) -> tuple:
    """Arguments of the op's launcher at the representative size n (V, T or N), defaults of the public API."""
    f32 = torch.float32
    if op in ("logprobs_fwd", "logprobs_bwd"):
        x = torch.empty(*ROWS, n, dtype=dtype)
        labels = torch.zeros(ROWS, dtype=torch.int64)
        if op == "logprobs_fwd":
            return x, labels, 1.0, -100
        return (x, labels, *[torch.zeros(ROWS, dtype=f32) for _ in range(5)], 1.0, -100)
    if op in ("kl_fwd", "kl_bwd"):
        x, y = torch.empty(*ROWS, n, dtype=dtype), torch.empty(*ROWS, n, dtype=dtype)
        if op == "kl_fwd":
            return x, y, None, 1.0, True  # no mask, direction="reverse" (the API defaults)
        return (x, y, None, *[torch.zeros(ROWS[0] * ROWS[1], dtype=f32) for _ in range(6)], 1.0, True)
    if op == "gae_fwd":
        shape = (ROWS[0], n)
        return (
            torch.zeros(shape, dtype=dtype),
            torch.zeros(shape, dtype=dtype),
            torch.ones(shape, dtype=torch.bool),
            1.0,
            0.95,
        )
    if op == "ppo_policy_fwd":  # loss_type clip, ratio_level token (offsets not read), SAPO temperatures unused
        offsets = torch.empty(0, dtype=torch.int64)
        return (*[torch.zeros(n, dtype=f32) for _ in range(4)], offsets, 0.2, 0.2, 0.0, 0, 0, 1.0, 1.05)
    if op == "ppo_value_fwd":
        return (*[torch.zeros(n, dtype=f32) for _ in range(4)], 0.2)
    raise ValueError(f"no representative arguments for op {op!r}")


def record_launches(op: str, dtype: torch.dtype, n: int) -> list[tuple]:
    """(JITFunction, args, kwargs) of every kernel launch the op's Triton launcher makes (nothing runs)."""
    from triton.runtime.jit import JITFunction

    from rlhf_kernels._registry import OPS, resolve

    launches = []
    saved = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((self, args, kw))
    try:
        spec = OPS[op]
        resolve(spec, spec.triton)(*launcher_args(op, dtype, n))
    finally:
        JITFunction.run = saved
    return launches


def compile_request(fn, args, kwargs):
    """Signature, constexprs, attributes and options exactly as JITFunction.run derives them for a CUDA launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    given = dict(zip([p.name for p in fn.params], args), **kwargs)
    sig, cx, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = given.get(p.name, p.default)
        if p.is_constexpr:
            sig[p.name], cx[p.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(
            type(backend), value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        sig[p.name] = kind
        if kind == "constexpr":  # Triton specialises an integer argument equal to 1 into a constant
            cx[p.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = backend.parse_attr(key)
    opts = {k: v for k, v in kwargs.items() if k not in sig}  # launch options: num_warps, enable_fp_fusion, ...
    return sig, cx, attrs, opts


def main(request_path: str, out_dir: str) -> None:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # so that ptxas runs (and logs) for every kernel
    knobs.nvidia.dump_ptxas_log = True
    with open(request_path) as f:
        cases = json.load(f)
    compiled: dict[str, dict] = {}
    results = []
    for case in cases:
        try:
            launches = record_launches(case["op"], DTYPES[case["dtype"]], case["size"])
            if len(launches) != 1:
                raise RuntimeError(f"the launcher made {len(launches)} kernel launches, expected 1")
            fn, args, kwargs = launches[0]
            sig, cx, attrs, opts = compile_request(fn, args, kwargs)
            key = hashlib.sha1(
                repr((fn.fn.__name__, sig, sorted(cx.items()), sorted(attrs.items()), sorted(opts.items()))).encode()
            ).hexdigest()[:16]
            if key not in compiled:
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
                    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
                cubin = os.path.join(out_dir, f"{fn.fn.__name__}_{key}.cubin")
                with open(cubin, "wb") as f:
                    f.write(kernel.asm["cubin"])
                compiled[key] = {
                    "function": fn.fn.__name__,
                    "cubin": cubin,
                    "ptxas_log": log.getvalue(),
                    "num_warps": kernel.metadata.num_warps,
                    "shared": kernel.metadata.shared,
                    "constexprs": {k: v if isinstance(v, (int, float, bool, str)) else str(v) for k, v in cx.items()},
                    # integer arguments a real launch on these shapes does not specialise as multiples of 16
                    "ints_not_div16": [
                        p.name for i, p in enumerate(fn.params) if sig[p.name] in ("i32", "i64") and not attrs.get((i,))
                    ],
                    "options": opts,
                }
            results.append({**case, "key": key, **compiled[key]})
        except Exception as exc:  # reported per case: one broken kernel must not hide the others
            results.append({**case, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
