"""Speed proxy without a GPU: sm_90 SASS of the memory-bound kernels, their resources and their main loops.

    python -m benchmarks.sass_report                          # every kernel; writes benchmarks/results/sass_sm90.*
    python -m benchmarks.sass_report --only logprobs_fwd,kl_fwd --dtype bf16 [--backend cuda] [--show-loop]

Each kernel is compiled for sm_90 the way its real launch compiles it: the Triton kernels ahead of time from a
recorded launch of the op's launcher (benchmarks/sass_triton.py: BLOCK_V / num_warps from the shared launch rule),
the torch-free CUDA headers (csrc/cuda/*.cuh) with nvcc, each in a generated translation unit that also prints the
block size (and dynamic shared memory) the header's own launch rule picks at each representative size. Per kernel
the report gives registers, spills, shared memory, block, theoretical occupancy, bytes in flight per SM and SASS
instructions per element of the main loop (rules: benchmarks/sass_tools.py, repeated in the report header).
A filtered run (--only / --dtype / --backend) prints its table and writes files only with an explicit --out;
--rev REV compiles csrc/ and rlhf_kernels/ as of a git revision (e.g. HEAD, to compare with the working tree).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from benchmarks import sass_tools as st
from benchmarks.sass_render import CLOCK_HZ, ISSUE_PER_CLK, SMS, merged, render, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "sass_sm90")
ELEM = {"bf16": 2, "fp32": 4, "fp16": 2}
CUDA_TYPE = {"bf16": "__nv_bfloat16", "fp32": "float", "fp16": "__half"}
VOCABS = (32000, 50257, 128256, 152064)  # Llama-2, GPT-2, Llama-3, Qwen2 vocabularies
LAUNCH = "[&] {{ const auto rl = rlhf_cuda::{}; return rl.threads_per_row * rl.rows_per_block; }}()"
LP_LAUNCH = LAUNCH.format("logprobs_row_launch(n, rlhf_cuda::ElemTraits<T>::kVec)")
# forward main loops: two batches (double buffer) of U slots per iteration
LP_TILE = "2 * rlhf_cuda::kLogprobsUnroll * rlhf_cuda::ElemTraits<T>::kVec"
KL_TILE = "2 * rlhf_cuda::kKlFwdUnroll * rlhf_cuda::kKlSlot"


@dataclass(frozen=True)
class Kernel:
    """One memory-bound kernel of the report, for both backends."""

    name: str  # report name; also the op of the op table whose Triton launcher runs it
    sizes: tuple[int, ...]  # representative sizes of `size_name`
    size_name: str  # "V" (vocabulary), "T" (steps) or "N" (tokens)
    dtypes: tuple[str, ...]
    load: tuple[int, int]  # bytes loaded per element = load[0] * element size + load[1]
    store: tuple[int, int]  # bytes stored per element, the same way
    header: str  # csrc/cuda header holding the CUDA kernel
    cuda_kernel: str  # demangled name prefix; {T} is the CUDA element type
    cuda_block: str  # C++ expression of the launch rule's threads per block (size n, element type T)
    cuda_smem: str = "0"  # C++ expression of the dynamic shared memory per block
    # Triton: elements per program and main-loop iteration, as products of constexprs; the first one whose names
    # the launch has is used (per thread: / block); none: counted from the loop's loads, as for CUDA
    tile: tuple[str, ...] = ("BLOCK_V", "J*G*VEC")
    target: float | None = None  # instructions per element to reach, for bf16 (None: no target)
    # inputs read per position of the size (2 for KL: policy and reference rows): instructions per element are
    # reported per loaded element (the unit of the bandwidth budget), so per position / inputs
    inputs: int = 1
    # CUDA: C++ expression of the elements per thread and main-loop iteration (element type T), for kernels whose
    # shifted-row bodies load more bytes than they use (16-byte chunks straddling two slots); "0": from the loads
    cuda_tile: str = "0"
    cuda_only: bool = False  # a second compiled variant of a CUDA kernel (no Triton counterpart to compile)

    def bytes_per_elem(self, dtype: str, which: str) -> int:
        a, b = self.load if which == "load" else self.store
        return a * ELEM[dtype] + b


KERNELS = (
    Kernel("logprobs_fwd", VOCABS, "V", ("bf16", "fp32"), (1, 0), (0, 0), "logprobs.cuh",
           "rlhf_cuda::logprobs_fwd_kernel<{T}, 0>(", LP_LAUNCH, target=8.0, cuda_tile=LP_TILE),
    # rows whose starts differ in their offset within 16 bytes (odd V in bf16): per-row shift, 16-byte loads
    Kernel("logprobs_fwd/row-shift", (50257,), "V", ("bf16",), (1, 0), (0, 0), "logprobs.cuh",
           "rlhf_cuda::logprobs_fwd_kernel<{T}, -1>(", LP_LAUNCH, target=8.0, cuda_tile=LP_TILE, cuda_only=True),
    Kernel("logprobs_bwd", VOCABS, "V", ("bf16", "fp32"), (1, 0), (1, 0), "logprobs.cuh",
           "rlhf_cuda::logprobs_bwd_kernel<{T}>(", LP_LAUNCH),
    Kernel("kl_fwd", VOCABS, "V", ("bf16", "fp32"), (2, 0), (0, 0), "kl_bwd.cuh",
           "rlhf_cuda::kl_fwd_kernel<{T}, {T}, true>(", LAUNCH.format("kl_row_launch(n)"), target=8.0, inputs=2,
           cuda_tile=KL_TILE),
    Kernel("kl_fwd/row-shift", (50257,), "V", ("bf16",), (2, 0), (0, 0), "kl_bwd.cuh",
           "rlhf_cuda::kl_fwd_kernel<{T}, {T}, false>(", LAUNCH.format("kl_row_launch(n)"), target=8.0, inputs=2,
           cuda_tile=KL_TILE, cuda_only=True),
    Kernel("kl_bwd", VOCABS, "V", ("bf16", "fp32"), (2, 0), (1, 0), "kl_bwd.cuh",
           "rlhf_cuda::kl_bwd_kernel<{T}, {T}, true>(", LAUNCH.format("kl_row_launch(n)"), inputs=2),
    Kernel("gae_fwd", (1024, 4096), "T", ("bf16", "fp32"), (2, 1), (0, 8), "gae.cuh",
           "rlhf_cuda::gae_fwd_kernel<{T}, true>(", "rlhf_cuda::gae_threads(n)",
           "rlhf_cuda::gae_smem_bytes(rlhf_cuda::gae_threads(n))", tile=("BLOCK_T",)),
    Kernel("ppo_policy_fwd", (65536,), "N", ("fp32",), (0, 16), (0, 4), "ppo_loss.cuh",
           "rlhf_cuda::ppo_loss_kernel<rlhf_cuda::PpoPolicyLoss<0>, true>(", "rlhf_cuda::kPpoThreads",
           tile=("BLOCK",)),
    # loss_type sapo (the most arithmetic per token), and the per-sequence kernel of ratio_level 1 (GSPO) for the
    # clip and sapo losses; its main loop is pass 2 (four inputs read, the gradient written)
    Kernel("ppo_policy_fwd/sapo", (65536,), "N", ("fp32",), (0, 16), (0, 4), "ppo_loss.cuh",
           "rlhf_cuda::ppo_loss_kernel<rlhf_cuda::PpoPolicyLoss<2>, true>(", "rlhf_cuda::kPpoThreads",
           cuda_only=True),
    Kernel("ppo_policy_fwd/sequence", (65536,), "N", ("fp32",), (0, 16), (0, 4), "ppo_loss.cuh",
           "rlhf_cuda::ppo_policy_seq_kernel<0, 1>(", "rlhf_cuda::kPpoThreads", cuda_only=True),
    Kernel("ppo_policy_fwd/sequence-sapo", (65536,), "N", ("fp32",), (0, 16), (0, 4), "ppo_loss.cuh",
           "rlhf_cuda::ppo_policy_seq_kernel<2, 1>(", "rlhf_cuda::kPpoThreads", cuda_only=True),
    Kernel("ppo_value_fwd", (65536,), "N", ("fp32",), (0, 16), (0, 4), "ppo_loss.cuh",
           "rlhf_cuda::ppo_loss_kernel<rlhf_cuda::PpoValueLoss, true>(", "rlhf_cuda::kPpoThreads", tile=("BLOCK",)),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """A CUDA tool from PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, or the copy bundled with Triton."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]
    dirs += sorted(glob.glob("/usr/local/cuda*/bin"), reverse=True)
    try:
        import triton

        dirs.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    for d in dirs:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def tool_version(path: str | None) -> str:
    if path is None:
        return "not found"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [^\n]*", out)
    return m.group(0) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> {function: {regs, spill_stores, spill_loads, stack, smem}}."""
    info: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([^'\s]+)'?", line)
        if m:
            current = info.setdefault(
                m.group(1), {"regs": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
            )
            continue
        if current is None:
            continue
        for key, pat in (
            ("stack", r"(\d+) bytes stack frame"),
            ("spill_stores", r"(\d+) bytes spill stores"),
            ("spill_loads", r"(\d+) bytes spill loads"),
            ("regs", r"Used (\d+) registers"),
            ("smem", r"(\d+) bytes smem"),
        ):
            m = re.search(pat, line)
            if m:
                current[key] = int(m.group(1))
    return info


def disassemble(path: str) -> dict[str, list[st.Instr]]:
    out = subprocess.run([find_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True)
    return st.parse_sass(out.stdout)


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or find_tool("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# ---------------------------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------------------------
def compile_triton(cases: list[dict], work: str, src: str, part: int = 0) -> list[dict]:
    """benchmarks.sass_triton in a subprocess without TRITON_INTERPRET (the interpreter never compiles), importing
    rlhf_kernels from the source tree ``src``."""
    request = os.path.join(work, f"triton_request_{part}.json")
    with open(request, "w") as f:
        json.dump(cases, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sass_triton", request, work],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return [{**c, "error": "Triton worker failed: " + proc.stderr[-2000:]} for c in cases]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuda_unit(header: str, cases: list[dict]) -> str:
    """A translation unit: the header (with its explicit kernel instantiations) and a host main that prints the
    launch rule's block and dynamic shared memory for every case."""
    lines = ["#include <cstdio>", f'#include "cuda/{header}"', "int main() {"]
    for i, c in enumerate(cases):
        k = c["spec"]
        lines.append(
            f"  {{ using T = {CUDA_TYPE[c['dtype']]}; const int64_t n = {c['size']}; (void)n;"
            f' std::printf("{i} %lld %lld %lld\\n", (long long)({k.cuda_block}), (long long)({k.cuda_smem}),'
            f" (long long)({k.cuda_tile})); }}"
        )
    return "\n".join(lines + ["  return 0;", "}", ""])


def compile_cuda_header(header: str, cases: list[dict], work: str, src: str) -> list[dict]:
    """nvcc -arch=sm_90 of one header (flags of setup.py's extension build), ptxas -v parsed per kernel."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        return [{**c, "error": "nvcc not found"} for c in cases]
    stem = os.path.join(work, "cuda_" + header.replace(".", "_"))
    with open(stem + ".cu", "w") as f:
        f.write(_cuda_unit(header, cases))
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "-arch=sm_90",
        "-Xptxas",
        "-v",
        "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-I",
        os.path.join(src, "csrc"),
        stem + ".cu",
        "-o",
        stem,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [{**c, "error": f"nvcc failed on {header}: " + proc.stderr[-2000:]} for c in cases]
    launch = {}
    for line in subprocess.run([stem], capture_output=True, text=True).stdout.splitlines():
        i, block, smem, tile = map(int, line.split())
        launch[i] = (block, smem, tile)
    ptxas = parse_ptxas(proc.stdout + proc.stderr)
    names = demangle(list(ptxas))
    out = []
    for i, c in enumerate(cases):
        prefix = c["spec"].cuda_kernel.format(T=CUDA_TYPE[c["dtype"]])
        match = [m for m, d in names.items() if prefix in d]
        if len(match) != 1 or i not in launch:
            known = sorted({re.sub(r"\(.*", "", d) for d in names.values()})
            out.append({**c, "error": f"{len(match)} kernels match {prefix!r} in {header}; it has {known}"})
            continue
        block, dyn, cuda_tile = launch[i]
        res = ptxas[match[0]]
        out.append(
            {**c, "function": match[0], "cubin": stem, "block": block, "dyn_smem": dyn, "cuda_tile": cuda_tile, **res}
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------------------
def triton_tile(k: Kernel, constexprs: dict) -> int | None:
    for expr in k.tile:
        names = expr.split("*")
        if all(isinstance(constexprs.get(n), int) for n in names):
            return math.prod(constexprs[n] for n in names)
    return None


def analyse(case: dict, sass: dict[str, list[st.Instr]]) -> dict:
    """Resources, occupancy, main loop, instructions per element and bytes in flight of one compiled case."""
    k: Kernel = case["spec"]
    code = sass.get(case["function"])
    if code is None:
        return {"error": f"{case['function']} not in the SASS"}
    smem = case["smem"] + case["dyn_smem"]
    occ = st.occupancy(case["block"], case["regs"], smem)
    row = {
        "block": case["block"],
        "regs": case["regs"],
        "spill_stores": case["spill_stores"],
        "spill_loads": case["spill_loads"],
        "stack": case["stack"],
        "smem": smem,
        **occ,
    }
    loop = st.main_loop(code)
    if loop is None:
        return {**row, "error": "no loop with a global load found"}
    from_loads = loop.load_bytes / k.bytes_per_elem(case["dtype"], "load")
    # Triton: the tile over the block is exact (a loop-free kernel's path also loads per-row scalars);
    # CUDA: the loads of the loop (its per-row loads are hoisted out of the loop).
    tile = triton_tile(k, case.get("constexprs", {}))
    elems = tile / case["block"] if tile else case.get("cuda_tile") or from_loads
    per_thread = st.bytes_in_flight(code, loop.path)
    ipe_pos = len(loop.path) / elems  # per position of the size
    ipe = ipe_pos / k.inputs  # per loaded element
    traffic = k.bytes_per_elem(case["dtype"], "load") + k.bytes_per_elem(case["dtype"], "store")
    others = [lp for lp in st.loading_loops(code) if (lp.head, lp.tail) != (loop.head, loop.tail)]
    per_elem = k.bytes_per_elem(case["dtype"], "load")
    row.update(
        loop_addr=f"{code[loop.head].addr:#06x}-{code[loop.tail].addr:#06x}" if loop.is_loop else "whole kernel",
        loop_static=loop.static_count,
        loop_hot=len(loop.path),
        loop_load_bytes=loop.load_bytes,
        loop_widest_load=loop.widest_load,
        loop_nested=loop.nested,
        elems_per_iter=elems,
        elems_from_loads=from_loads,
        elems_source="tile" if tile or case.get("cuda_tile") else "loads",
        instr_per_elem=ipe,
        inflight_thread=per_thread,
        inflight_sm=per_thread * occ["threads_per_sm"],
        issue_bound_tbs=ISSUE_PER_CLK / ipe_pos * traffic * SMS * CLOCK_HZ / 1e12,
        other_loops=[
            {
                "addr": f"{code[o.head].addr:#06x}",
                "hot": len(o.path),
                "load_bytes": o.load_bytes,
                "widest_load": o.widest_load,
                "instr_per_elem": len(o.path) / (case.get("cuda_tile") or o.load_bytes / per_elem) / k.inputs,
            }
            for o in others
        ],
    )
    if case.get("show_loop"):
        row["loop_sass"] = [code[i].text() for i in loop.path]
    return row


def source_tree(rev: str | None, work: str) -> str:
    """ROOT, or a copy of csrc/ and rlhf_kernels/ at git revision ``rev`` (plus this tool's Triton worker)."""
    if rev is None:
        return ROOT
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "benchmarks"))
    archive = subprocess.run(["git", "archive", rev, "csrc", "rlhf_kernels"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    for name in ("__init__.py", "sass_triton.py"):
        shutil.copy(os.path.join(ROOT, "benchmarks", name), os.path.join(src, "benchmarks", name))
    return src


def run(
    kernels: list[Kernel],
    dtypes: set[str] | None,
    backends: set[str],
    show_loop: bool = False,
    rev: str | None = None,
    jobs: int = 0,
) -> list[dict]:
    """Compiles and analyses every (kernel, backend, dtype, size) case; one result row per case. ``rev``: compile
    the sources of that git revision instead of the working tree; ``jobs``: Triton worker processes (0: CPUs)."""
    cases = [
        {"kernel": k.name, "op": k.name, "dtype": d, "size": n, "spec": k, "show_loop": show_loop}
        for k in kernels
        for d in k.dtypes
        if dtypes is None or d in dtypes
        for n in k.sizes
    ]
    work = tempfile.mkdtemp(prefix="sass_report_")
    try:
        src = source_tree(rev, work)
        jobs = jobs or os.cpu_count() or 1
        futures = []
        with ThreadPoolExecutor(max_workers=jobs + 4) as pool:
            if "triton" in backends:
                plain = [
                    {k: v for k, v in c.items() if k not in ("spec", "show_loop")}
                    for c in cases
                    if not c["spec"].cuda_only
                ]
                groups = sorted({(c["kernel"], c["dtype"]) for c in plain})  # one worker compiles a group's sizes
                for part in range(min(jobs, len(groups))):
                    mine = set(groups[part::jobs])
                    chunk = [c for c in plain if (c["kernel"], c["dtype"]) in mine]
                    futures.append(("triton", pool.submit(compile_triton, chunk, work, src, part)))
            if "cuda" in backends:
                for header in sorted({c["spec"].header for c in cases}):
                    group = [c for c in cases if c["spec"].header == header]
                    futures.append(("cuda", pool.submit(compile_cuda_header, header, group, work, src)))
            compiled = [(backend, r) for backend, job in futures for r in job.result()]
        rows, sass_cache = [], {}
        for backend, r in compiled:
            c = next(c for c in cases if (c["kernel"], c["dtype"], c["size"]) == (r["kernel"], r["dtype"], r["size"]))
            k = c["spec"]
            base = {"kernel": k.name, "backend": backend, "dtype": c["dtype"], "size": c["size"]}
            base.update(order=KERNELS.index(k), size_name=k.size_name, target=k.target)
            if "error" in r:
                rows.append({**base, "error": r["error"]})
                continue
            if backend == "triton":
                res = parse_ptxas(r["ptxas_log"]).get(r["function"], {})
                r = {**r, **res, "block": 32 * r["num_warps"], "smem": 0, "dyn_smem": r["shared"]}
                base["config"] = {**r["constexprs"], "num_warps": r["num_warps"]}
                base["ints_not_div16"] = r["ints_not_div16"]
                base["group"] = r["key"]
            else:
                base["group"] = f"{r['function']}/{r['block']}/{r['dyn_smem']}"
            try:
                if r["cubin"] not in sass_cache:
                    sass_cache[r["cubin"]] = disassemble(r["cubin"])
                rows.append({**base, **analyse({**c, **r}, sass_cache[r["cubin"]])})
            except Exception as exc:  # one kernel the analysis cannot read must not hide the others
                rows.append({**base, "error": f"analysis failed: {type(exc).__name__}: {exc}"})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def environment(rev: str | None = None, argv: list[str] | None = None) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    return {
        "commit": git("rev-parse", "--short", rev or "HEAD")
        + ("" if rev else " (+ uncommitted changes)" if git("status", "--porcelain", "csrc", "rlhf_kernels") else ""),
        "command": "python -m benchmarks.sass_report " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nvcc": tool_version(find_tool("nvcc")),
        "triton": tv,
        "triton ptxas (sm_90)": tool_version(_triton_ptxas()),
        "cuobjdump": tool_version(find_tool("cuobjdump")),
        "target": "sm_90 (nvcc -arch=sm_90; Triton GPUTarget('cuda', 90, 32), i.e. sm_90a)",
    }


def _triton_ptxas() -> str | None:
    """The ptxas Triton runs for sm_90 (its bundled ptxas-blackwell, which also serves sm_90)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - any Triton import / lookup problem: report it as not found
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated kernels: " + ", ".join(k.name for k in KERNELS))
    p.add_argument("--dtype", help="comma-separated dtypes (bf16, fp32)")
    p.add_argument("--backend", default="triton,cuda", help="comma-separated: triton, cuda")
    p.add_argument("--out", help=f"write OUT.md and OUT.json (default {os.path.relpath(OUT, ROOT)} when unfiltered)")
    p.add_argument("--show-loop", action="store_true", help="print the SASS of each main loop's hot path")
    p.add_argument(
        "--rev", help="compile csrc/ and rlhf_kernels/ of this git revision (e.g. HEAD) instead of the working tree"
    )
    p.add_argument("--jobs", type=int, default=0, help="Triton compile processes (default: number of CPUs)")
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else [k.name for k in KERNELS]
    unknown = set(names) - {k.name for k in KERNELS}
    if unknown:
        p.error(f"unknown kernels {sorted(unknown)}; known: {[k.name for k in KERNELS]}")
    kernels = [k for k in KERNELS if k.name in names]
    dtypes = set(a.dtype.split(",")) if a.dtype else None
    rows = run(kernels, dtypes, set(a.backend.split(",")), a.show_loop, a.rev, a.jobs)
    env = environment(a.rev, argv)
    text = render(rows, env)
    print("\n".join(table(rows)))
    if a.show_loop:
        for r in merged(rows):
            if r.get("loop_sass"):
                print(
                    f"\n### {r['kernel']} {r['backend']} {r['dtype']} sizes {r['sizes']}: hot path of loop "
                    f"{r['loop_addr']}\n" + "\n".join(r["loop_sass"])
                )
    out = a.out or (OUT if not (a.only or a.dtype or a.backend != "triton,cuda") else None)
    if out:
        with open(out + ".md", "w") as f:
            f.write(text)
        with open(out + ".json", "w") as f:
            json.dump(
                {"environment": env, "rows": [{k: v for k, v in r.items() if k != "loop_sass"} for r in rows]},
                f,
                indent=1,
            )
        print(f"\nwrote {out}.md and {out}.json")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
