"""Markdown of the sm_90 SASS report (benchmarks/sass_report.py): the bandwidth-latency arithmetic of its header
and the kernel table. Rows are the dicts of sass_report.run; sizes with identical compiled kernels merge."""

from __future__ import annotations

import re

from benchmarks import sass_tools as st

# Device figures for the bandwidth-latency arithmetic (assumptions; their sources are printed by arithmetic()).
GPUS = {"H100 SXM": 3.35e12, "H200": 4.8e12}
SMS = 132
CLOCK_HZ = 1.83e9  # assumed sustained SM clock under a memory-bound load (boost clock up to 1.98 GHz)
CLOCK_RANGE_HZ = (1.7e9, 1.98e9)
LATENCY_S = (600e-9, 800e-9)  # loaded DRAM latency range
BW_FRACTION = 0.9
ISSUE_PER_CLK = st.SM90["schedulers"] * st.SM90["warp"]  # 128 thread-instructions per clock per SM


def arithmetic() -> list[str]:
    """The bandwidth-latency arithmetic of the report header."""
    lo, hi = LATENCY_S
    lines = ["Assumptions (datasheet figures and published microbenchmarks, not measured here):", ""]
    h100, h200 = GPUS["H100 SXM"] / 1e12, GPUS["H200"] / 1e12
    lines.append(
        f"- DRAM bandwidth: H100 SXM {h100:.2f} TB/s (HBM3), H200 {h200:.1f} TB/s (HBM3e) (NVIDIA H100 / H200 "
        f"datasheets); {SMS} SMs on both (GH100, SXM parts)."
    )
    lines.append(
        f"- SM clock: {CLOCK_HZ / 1e9:.2f} GHz assumed sustained under a memory-bound load (range "
        f"{CLOCK_RANGE_HZ[0] / 1e9:.2f}-{CLOCK_RANGE_HZ[1] / 1e9:.2f} GHz; 1.98 GHz is the datasheet boost)."
    )
    lines.append(
        f"- Loaded DRAM latency {lo * 1e9:.0f}-{hi * 1e9:.0f} ns (Hopper microbenchmark papers measure ~500 ns "
        "idle; queueing at high bandwidth adds to it)."
    )
    lines.append(
        "- Issue: 4 warp schedulers per SM, one warp-instruction per clock each = 128 thread-instructions per "
        "clock per SM; MUFU (ex2) 16 results per clock per SM (CUDA programming guide, arithmetic throughput "
        "table, compute capability 9.0)."
    )
    lines += ["", "Little's law, bytes in flight per SM needed = bandwidth x latency / SMs:", ""]
    for gpu, bw in GPUS.items():
        for frac in (1.0, BW_FRACTION):
            need = [bw * frac * lat / SMS / 1024 for lat in LATENCY_S]
            lines.append(f"- {gpu} at {frac:.0%} ({bw * frac / 1e12:.2f} TB/s): {need[0]:.1f}-{need[1]:.1f} KiB per SM")
    lines += [
        "",
        f"Elements per clock per SM needed at {BW_FRACTION:.0%} of the H200's 4.8 TB/s "
        "(= bandwidth / bytes per element / SMs / clock):",
        "",
    ]
    for what, b in (
        ("bf16 stream, 2 B/element (log-prob forward)", 2),
        ("two bf16 streams, 4 B/position (KL forward)", 4),
        ("fp32 stream, 4 B/element", 4),
    ):
        vals = [GPUS["H200"] * BW_FRACTION / b / SMS / f for f in (CLOCK_RANGE_HZ[1], CLOCK_HZ, CLOCK_RANGE_HZ[0])]
        lines.append(f"- {what}: {vals[1]:.1f} (from {vals[0]:.1f} at 1.98 GHz to {vals[2]:.1f} at 1.70 GHz)")
    need = GPUS["H200"] * BW_FRACTION / 2 / SMS / CLOCK_HZ
    lines += [
        "",
        f"So a bf16 forward kernel must retire ~{need:.0f} elements per clock per SM. At 128 thread-"
        f"instructions per clock that allows at most {ISSUE_PER_CLK / need:.1f} instructions per element with "
        "perfect issue and nothing else running; the target of <= 8 leaves ~1.8x headroom for the row "
        "epilogue, stalls and the second kernel of a step. The table's 'issue-bound TB/s' is 128 / "
        f"(instructions per element) x bytes per element x {SMS} SMs x {CLOCK_HZ / 1e9:.2f} GHz: the DRAM "
        "traffic (loads + stores) the main loop could sustain if issue were the only limit.",
        "",
    ]
    return lines


def merged(rows: list[dict]) -> list[dict]:
    """Rows whose compiled kernel, block and shared memory are identical, merged with their sizes listed."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["backend"], r["dtype"], r.get("group", r.get("error")))
        if key in out:
            out[key]["sizes"].append(r["size"])
        else:
            out[key] = {**r, "sizes": [r["size"]]}
    return sorted(out.values(), key=lambda r: (r["order"], r["backend"] != "triton", r["dtype"], r["sizes"][0]))


def verdict(r: dict) -> str:
    """The target column: PASS / FAIL for kernels with an instructions-per-element target (bf16), else spills."""
    spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
    if "error" in r:
        return "error"
    if r["target"] is None or r["dtype"] != "bf16":
        return "spill" if spills else ""
    ok = r["instr_per_elem"] <= r["target"] and spills == 0
    return f"{'PASS' if ok else 'FAIL'} (<= {r['target']:g}, 0 spills)"


def table(rows: list[dict]) -> list[str]:
    head = (
        "| kernel | backend | dtype | sizes | block | regs | spill st/ld B | smem B | blocks/SM (limit) | "
        "occupancy | main loop: hot / static instr | elems / thread / iter | **instr / elem** | in flight B/thread "
        "| in flight KiB/SM | issue-bound TB/s | target | other loading loops: instr / elem |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in merged(rows):
        sizes = f"{r['size_name']}=" + ",".join(str(s) for s in r["sizes"])
        if "error" in r and "regs" not in r:
            lines.append(
                f"| {r['kernel']} | {r['backend']} | {r['dtype']} | {sizes} | error: "
                f"{r['error'][:200].replace('|', '/').replace(chr(10), ' ')} |" + " |" * 13
            )
            continue
        loop = f"{r['loop_hot']} / {r['loop_static']}" if "loop_hot" in r else "-"
        loop += " (no loop)" if r.get("loop_addr") == "whole kernel" else ""
        others = ", ".join(f"{o['instr_per_elem']:.1f}" for o in r.get("other_loops", []))
        lines.append(
            f"| {r['kernel']} | {r['backend']} | {r['dtype']} | {sizes} | {r['block']} | {r['regs']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {r['blocks_per_sm']} ({r['limiter']}) | "
            f"{r['occupancy']:.0%} | {loop} | {r.get('elems_per_iter', 0):g} | **{r.get('instr_per_elem', 0):.2f}** | "
            f"{r.get('inflight_thread', 0)} | {r.get('inflight_sm', 0) / 1024:.1f} | {r.get('issue_bound_tbs', 0):.1f} "
            f"| {verdict(r)} | {others} |"
        )
    return lines


def render(rows: list[dict], env: dict) -> str:
    lines = ["# sm_90 SASS report of the memory-bound kernels", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["- no GPU involved: the kernels are compiled ahead of time and their SASS is analysed statically", ""]
    lines += ["## Bandwidth and latency arithmetic", ""] + arithmetic()
    lines += ["## Rules of the table", ""]
    lines += [
        f"- Occupancy (sm_90: 65536 registers, 2048 threads, 32 blocks, 228 KiB shared memory per SM): "
        f"{st.OCCUPANCY_RULES}."
    ]
    doc = st.__doc__.split("Rules (also printed in the report):", 1)[1].strip()
    lines += ["- " + re.sub(r"\n\s+", " ", item.strip()) for item in doc.split("* ") if item.strip()]
    lines += [
        "- Triton kernels: elements per thread and iteration = the tile constexpr (BLOCK_V, J*G*VEC, BLOCK_T or "
        "BLOCK) / (num_warps x 32), exact where the loop also loads per-row scalars; the JSON keeps the count from "
        "the loads too (`elems_from_loads`). CUDA forwards: the header's tile (two batches of U slots per "
        "iteration), since a shifted row's body loads straddling 16-byte chunks it only partly uses; in the "
        "aligned kernels it equals the count from the loads (tested). Element sizes: bf16 2 B, fp32 4 B. KL: per "
        "loaded element (a position reads two, the policy's and the reference's logit), so instructions per "
        "position are twice the figure; a GAE step reads reward, value and mask, a PPO token four fp32 inputs.",
        "- Block: Triton num_warps x 32 from the launcher's launch rule (rlhf_kernels/_utils.py "
        "row_launch_config, or the op's own rule); CUDA: the header's launch rule evaluated by the generated "
        "host program. Sizes with identical compiled kernels and launch are merged into one row.",
        "- Triton V = 50257 (not a multiple of 16): the launch cannot specialise V and the strides as multiples "
        "of 16, so the loads cannot be proven 16-byte aligned (see `ints_not_div16` in the JSON).",
        "- CUDA rows are the kernels the launcher picks when every row starts 16-byte aligned (log-prob "
        "forward `kShift` = 0, KL forward `kAllAligned` = true). Rows whose starts differ within 16 bytes (odd V "
        "in bf16, e.g. 50257) keep 16-byte aligned loads with a byte permute in a per-row-dispatch kernel (every "
        "shift's body inlined; 128 registers, one block per SM): the `/row-shift` rows. The last column gives "
        "instructions per element of the kernel's other innermost loading loops (the other shifts' bodies, "
        "scalar fallbacks, remainder loops), by the same rules; the JSON has their addresses (`other_loops`).",
        "",
    ]
    lines += ["## Kernels", ""] + table(rows) + [""]
    return "\n".join(lines)
