"""Static SASS analysis for the speed proxy of benchmarks/sass_report.py: parse ``cuobjdump -sass`` output, find
the main loop of a kernel, count the instructions it issues per element, estimate the bytes each thread keeps in
flight, and compute theoretical occupancy on sm_90. Pure functions of text and numbers (no compiler, no GPU), so
tests/test_sass_report.py checks them on hand-written SASS.

Rules (also printed in the report):

* Loop: a branch whose target is at or before it (a back edge); the loop body is [target, branch].
* Hot path through a loop body: its basic blocks form a DAG once the back edge is removed (a nested back edge is
  treated as not taken: an inner loop's body counts once). Among the paths from the loop head to the back edge,
  the hot path is the one that moves the most global bytes (LDG / LDGSTS / STG) and, among those, issues the
  fewest instructions: bounds-checked regions holding loads or stores are executed, rarely-taken arithmetic side
  paths (the online-softmax rescale when the running maximum grows) and scalar fallbacks that move the same bytes
  in more instructions are not. NOPs are not counted. A kernel without a loading loop (one tile per program, as
  the Triton backward kernels) is taken as one iteration: its hot path runs from the entry to an EXIT.
* Main loop of a kernel: among the innermost loops whose hot path has a global load (a loop holding another
  loading loop, e.g. a grid-stride loop over rows, is not one), the one with the widest load, then the most bytes
  loaded per iteration, then the fewest instructions per loaded byte.
* Elements per iteration (per thread) = bytes loaded on the hot path / bytes loaded per element (a property of the
  kernel, e.g. 2 for bf16 log-probs, 4 for a bf16 KL row pair); instructions per element = hot-path instructions /
  elements per iteration.
* Bytes in flight per thread: the hot path is replayed twice (steady state); a load is outstanding from its issue
  until the first later instruction that names one of its destination registers; the maximum over the second
  pass of the outstanding bytes is the thread's bytes in flight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_REG = re.compile(r"(?<![A-Za-z_])R(\d+)(\.64)?(?![0-9])")
_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass
class Instr:
    addr: int
    pred: str  # "" or e.g. "@!P0"
    op: str  # full opcode with modifiers, e.g. "LDG.E.128"
    args: str  # operand text

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def text(self) -> str:
        return f"/*{self.addr:04x}*/ {self.pred + ' ' if self.pred else ''}{self.op} {self.args};"


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` / ``nvdisasm`` text -> {function name: instructions in address order}."""
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and current is not None:
            pred = (m.group(2) or "").strip()
            current.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return funcs


def _access_width(op: str) -> int:
    """Bytes of one memory access from the opcode's size modifier (32-bit when none)."""
    mods = op.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def global_load_bytes(ins: Instr) -> int:
    """Bytes a global load (LDG, or LDGSTS: global to shared) brings in; 0 for any other instruction."""
    return _access_width(ins.op) if ins.base in ("LDG", "LDGSTS") else 0


def is_global_access(ins: Instr) -> bool:
    return ins.base in ("LDG", "STG", "LDGSTS", "RED", "ATOM", "ATOMG")


def registers(ins: Instr) -> set[int]:
    """General registers the instruction names (destination or source), pairs (R4.64) and the data registers of
    wide memory accesses (LDG.E.128 R4 -> R4..R7) expanded."""
    regs: set[int] = set()
    wide = _access_width(ins.op) // 4 if ins.base in ("LDG", "STG", "LDS", "STS", "LD", "ST", "LDGSTS") else 1
    for m in _REG.finditer(ins.args):
        n = int(m.group(1))
        if n == 255:  # RZ is printed as RZ, but be safe
            continue
        count = 2 if m.group(2) else 1
        in_brackets = ins.args[: m.start()].count("[") > ins.args[: m.start()].count("]")
        if not in_brackets:
            count = max(count, wide)
        regs.update(range(n, n + count))
    return regs


def load_dest(ins: Instr) -> set[int]:
    """Destination registers of a global load (LDG.E.128 R4 -> {4, 5, 6, 7})."""
    m = _REG.search(ins.args)
    if not m or ins.base != "LDG":
        return set()
    return set(range(int(m.group(1)), int(m.group(1)) + max(1, _access_width(ins.op) // 4)))


def _branch_target(ins: Instr) -> int | None:
    if ins.base not in ("BRA", "BRX", "JMP"):
        return None
    m = _TARGET.search(ins.args)
    return int(m.group(1), 16) if m else None


def global_store_bytes(ins: Instr) -> int:
    return _access_width(ins.op) if ins.base == "STG" else 0


@dataclass
class Loop:
    """A loop body [head, tail] (tail: the back-edge branch), or the whole kernel when it has no loading loop."""

    head: int  # index of the first instruction
    tail: int  # index of the back-edge branch (of the last instruction for a whole kernel)
    is_loop: bool = True
    path: list[int] = field(default_factory=list)  # instruction indices of the hot path
    load_bytes: int = 0  # global bytes loaded per iteration on the hot path
    widest_load: int = 0
    nested: int = 0  # inner back edges inside the body (their bodies counted once)

    @property
    def static_count(self) -> int:
        return self.tail - self.head + 1


def find_loops(code: list[Instr]) -> list[Loop]:
    """Every back edge as a Loop (head, tail) with its hot path computed."""
    index = {ins.addr: i for i, ins in enumerate(code)}
    loops = []
    for i, ins in enumerate(code):
        target = _branch_target(ins)
        if target is not None and target <= ins.addr and target in index:
            loop = Loop(index[target], i)
            _hot_path(code, loop, index)
            loops.append(loop)
    return loops


_ENDS_BLOCK = ("BRA", "BRX", "JMP", "EXIT", "RET")


def _hot_path(code: list[Instr], loop: Loop, index: dict[int, int]) -> None:
    """Fills loop.path / load_bytes / widest_load / nested (rules in the module docstring). A loop's path runs
    from its head to its back edge; a whole kernel's from its entry to an unconditional EXIT."""
    lo, hi = loop.head, loop.tail
    leaders = {lo}  # the head, every in-body branch target, every instruction after a branch or exit
    for i in range(lo, hi + 1):
        if code[i].base in _ENDS_BLOCK and i + 1 <= hi:
            leaders.add(i + 1)
        t = _branch_target(code[i])
        if t is not None and t in index and lo <= index[t] <= hi:
            leaders.add(index[t])
    starts = sorted(leaders)
    blocks = [(s, (starts[k + 1] if k + 1 < len(starts) else hi + 1) - 1) for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(blocks)}

    def cost(k: int) -> tuple[int, int]:
        body = [code[i] for i in range(blocks[k][0], blocks[k][1] + 1) if code[i].base != "NOP"]
        return sum(global_load_bytes(x) + global_store_bytes(x) for x in body), len(body)

    def is_end(k: int) -> bool:
        last = code[blocks[k][1]]
        return blocks[k][1] == hi if loop.is_loop else (last.base == "EXIT" and not last.pred)

    # best[k] = (global bytes moved, -instructions, predecessor) of the best path from the head through block k.
    best: list[tuple[int, int, int] | None] = [None] * len(blocks)
    b0, n0 = cost(0)
    best[0] = (b0, -n0, -1)
    for k, (_, e) in enumerate(blocks):
        if best[k] is None or is_end(k):
            continue
        last = code[e]
        t = _branch_target(last)
        ti = index.get(t, -1) if t is not None else -1
        succ = []
        falls = not (last.base in _ENDS_BLOCK and not last.pred)  # a predicated branch or exit may fall through
        if t is not None:
            if e < ti <= hi:
                succ.append(block_of[ti])  # forward branch inside the body
            elif lo < ti <= e or (not loop.is_loop and ti == lo):
                loop.nested += 1  # inner back edge: taken as not taken (its body counts once)
                falls = True
        if falls and k + 1 < len(blocks):
            succ.append(k + 1)
        for j in succ:
            b, n = cost(j)
            cand = (best[k][0] + b, best[k][1] - n, k)
            if best[j] is None or cand[:2] > best[j][:2]:
                best[j] = cand
    ends = [k for k in range(len(blocks)) if best[k] is not None and is_end(k)]
    if not ends:  # no end reachable along the DAG (odd layout): take the whole body
        loop.path = [i for i in range(lo, hi + 1) if code[i].base != "NOP"]
    else:
        k = max(ends, key=lambda j: best[j][:2])
        chain = []
        while k >= 0:
            chain.append(k)
            k = best[k][2]
        loop.path = [i for k in reversed(chain) for i in range(blocks[k][0], blocks[k][1] + 1) if code[i].base != "NOP"]
    loop.load_bytes = sum(global_load_bytes(code[i]) for i in loop.path)
    loop.widest_load = max((global_load_bytes(code[i]) for i in loop.path), default=0)


def loading_loops(code: list[Instr]) -> list[Loop]:
    """The innermost loops with a global load on their hot path: an outer loop (e.g. a grid-stride loop over
    rows) holding a loading loop is not one."""
    loaded = [lp for lp in find_loops(code) if lp.load_bytes > 0]
    return [a for a in loaded if not any(b is not a and a.head <= b.head and b.tail <= a.tail for b in loaded)]


def main_loop(code: list[Instr]) -> Loop | None:
    """The kernel's main loop (rule in the module docstring); for a kernel without a loading loop (one tile per
    program), the whole kernel as one iteration. None when nothing loads from global memory."""
    cands = loading_loops(code)
    if not cands:
        whole = Loop(0, len(code) - 1, is_loop=False)
        _hot_path(code, whole, {ins.addr: i for i, ins in enumerate(code)})
        return whole if whole.load_bytes > 0 else None
    return max(cands, key=lambda lp: (lp.widest_load, lp.load_bytes, -len(lp.path) / lp.load_bytes))


def bytes_in_flight(code: list[Instr], path: list[int]) -> int:
    """Peak global-load bytes outstanding per thread in the steady state of the path (rule in the docstring)."""
    pending: list[tuple[set[int], int]] = []
    peak = 0
    for rep in range(2):
        for i in path:
            ins = code[i]
            named = registers(ins)
            dest = load_dest(ins)
            # A later instruction naming a pending destination waits for that load (first use or overwrite).
            src = named - dest if ins.base == "LDG" else named
            pending = [(regs, b) for regs, b in pending if not (regs & src)]
            if ins.base == "LDG":
                pending = [(regs, b) for regs, b in pending if not (regs & dest)]
                pending.append((dest, global_load_bytes(ins)))
            if rep == 1:
                peak = max(peak, sum(b for _, b in pending))
    return peak


# ---------------------------------------------------------------------------------------------------------------
# Occupancy on sm_90 (H100 / H200): the CUDA occupancy calculator's rules for compute capability 9.0.
# ---------------------------------------------------------------------------------------------------------------
SM90 = {
    "regs_per_sm": 65536,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "smem_per_sm": 228 * 1024,
    "reg_alloc_unit": 256,  # registers, allocated per warp
    "smem_alloc_unit": 128,  # bytes
    "smem_reserved_per_block": 1024,  # bytes the driver reserves in every block (sm_80 and later)
    "warp": 32,
    "schedulers": 4,  # warp schedulers per SM, one warp-instruction issued per clock each
}

OCCUPANCY_RULES = (
    "registers per warp = ceil(regs x 32 / 256) x 256; blocks by registers = floor(floor(65536 / registers per "
    "warp) / warps per block); blocks by threads = floor(2048 / block); blocks by smem = floor(228 KiB / "
    "ceil(static + dynamic smem + 1 KiB reserved, 128 B)); blocks/SM = min(those, 32); occupancy = resident "
    "warps / 64"
)


def occupancy(block: int, regs: int, smem: int, arch: dict = SM90) -> dict:
    """Resident blocks / threads per SM and the limiting resource for blocks of ``block`` threads using ``regs``
    registers per thread and ``smem`` bytes of (static + dynamic) shared memory."""
    warps = math.ceil(block / arch["warp"])
    per_warp = math.ceil(max(regs, 1) * arch["warp"] / arch["reg_alloc_unit"]) * arch["reg_alloc_unit"]
    smem_block = math.ceil((smem + arch["smem_reserved_per_block"]) / arch["smem_alloc_unit"]) * arch["smem_alloc_unit"]
    limits = {
        "threads": arch["max_threads_per_sm"] // (warps * arch["warp"]),
        "registers": (arch["regs_per_sm"] // per_warp) // warps,
        "smem": arch["smem_per_sm"] // smem_block,
        "blocks": arch["max_blocks_per_sm"],
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "threads"))
    max_warps = arch["max_threads_per_sm"] // arch["warp"]
    return {
        "blocks_per_sm": blocks,
        "threads_per_sm": blocks * warps * arch["warp"],
        "occupancy": blocks * warps / max_warps,
        "limiter": limiter,
    }
