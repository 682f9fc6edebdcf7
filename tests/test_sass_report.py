"""The sm_90 SASS speed proxy (benchmarks/sass_report.py): its counting rules on SASS whose answer is known, and
no register spill in any kernel of the report (compiled ahead of time with nvcc and Triton; no GPU needed)."""

import importlib.util
import os
import subprocess
import tempfile

import pytest

from benchmarks import sass_report as sr
from benchmarks import sass_tools as st

# A loop of 11 instructions (0x10-0xb0): two 16-byte loads, a rarely taken side path of 2 instructions without
# memory accesses (0x70-0x80, skipped by the branch at 0x60) and the back edge at 0xb0.
LOOP_SASS = """
        Function : toy
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0030*/                   IADD3 R2, R2, 0x20, RZ ;
        /*0040*/                   FADD R12, R4, R5 ;
        /*0050*/                   FSETP.GT.AND P0, PT, R12, R13, PT ;
        /*0060*/              @!P0 BRA 0x90 ;
        /*0070*/                   FMUL R13, R13, R12 ;
        /*0080*/                   FADD R13, R13, 1 ;
        /*0090*/                   FADD R14, R8, R9 ;
        /*00a0*/                   ISETP.NE.AND P1, PT, R2, R3, PT ;
        /*00b0*/               @P1 BRA 0x10 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0;
"""

# An outer grid-stride loop (0x10-0xa0) around an inner loading loop (0x30-0x60) whose body is a guarded region
# holding a load and a store (0x40-0x50, skipped at 0x30 only at the row end): the inner loop is the main loop and
# the guarded region is on its hot path.
NESTED_SASS = """
        Function : nested
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.64 R20, desc[UR4][R22.64] ;
        /*0020*/                   IADD3 R2, R20, RZ, RZ ;
        /*0030*/               @P2 BRA 0x60 ;
        /*0040*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0050*/                   STG.E.U16 desc[UR4][R6.64], R4 ;
        /*0060*/               @P1 BRA 0x30 ;
        /*0070*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0080*/                   ISETP.NE.AND P0, PT, R0, R9, PT ;
        /*0090*/                   NOP ;
        /*00a0*/               @P0 BRA 0x10 ;
        /*00b0*/                   EXIT ;
"""


def test_hot_path_skips_side_paths_and_counts_per_element():
    code = st.parse_sass(LOOP_SASS)["toy"]
    loop = st.main_loop(code)
    assert (code[loop.head].addr, code[loop.tail].addr) == (0x10, 0xB0)
    assert loop.static_count == 11
    assert len(loop.path) == 9  # 11 minus the 2-instruction rescale path
    assert loop.load_bytes == 32 and loop.widest_load == 16
    # bf16: 32 bytes = 16 elements per thread and iteration -> 9 / 16 instructions per element
    assert len(loop.path) / (loop.load_bytes / 2) == pytest.approx(0.5625)
    # both loads are issued before the first use of R4 at 0x40: 32 bytes in flight per thread
    assert st.bytes_in_flight(code, loop.path) == 32


def test_main_loop_is_the_innermost_loading_loop():
    code = st.parse_sass(NESTED_SASS)["nested"]
    loop = st.main_loop(code)
    assert (code[loop.head].addr, code[loop.tail].addr) == (0x30, 0x60)
    assert [code[i].addr for i in loop.path] == [0x30, 0x40, 0x50, 0x60]  # the guarded load and store included
    assert loop.load_bytes == 2
    assert st.bytes_in_flight(code, loop.path) == 2  # the load waits for its store


def test_occupancy_rules():
    # 512 threads, 64 registers: 2048 registers per warp -> 32 warps -> 2 blocks of 16 warps (50 %)
    assert st.occupancy(512, 64, 192) == {
        "blocks_per_sm": 2,
        "threads_per_sm": 1024,
        "occupancy": 0.5,
        "limiter": "registers",
    }
    # 40 registers round up to 1280 per warp: 51 warps -> 3 blocks of 16 warps
    assert st.occupancy(512, 40, 0)["blocks_per_sm"] == 3
    # 256 threads, 32 registers: the 2048-thread limit binds (8 blocks, 100 %)
    assert st.occupancy(256, 32, 0)["limiter"] == "threads" and st.occupancy(256, 32, 0)["occupancy"] == 1.0
    # 41 KiB of shared memory (+1 KiB reserved) per block: 5 blocks fit in 228 KiB
    assert st.occupancy(256, 32, 41 * 1024) == {
        "blocks_per_sm": 5,
        "threads_per_sm": 1280,
        "occupancy": 0.625,
        "limiter": "smem",
    }


TOY_KERNEL = r"""
__global__ void scale4(const float4* __restrict__ x, float4* __restrict__ y, int n, float a) {
#pragma unroll 1
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    float4 v = x[i];
    v.x *= a; v.y *= a; v.z *= a; v.w *= a;
    y[i] = v;
  }
}
"""


@pytest.mark.skipif(sr.find_tool("nvcc") is None or sr.find_tool("cuobjdump") is None, reason="needs nvcc, cuobjdump")
def test_counting_on_a_compiled_kernel_with_a_known_answer():
    """One float4 per thread and iteration: 4 elements, 16 bytes in flight, 4 FMULs, one load and one store,
    and a straight-line body (the hot path is the whole loop)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "toy.cu")
        with open(src, "w") as f:
            f.write(TOY_KERNEL)
        subprocess.run([sr.find_tool("nvcc"), "-O3", "-arch=sm_90", "-cubin", src, "-o", src + ".cubin"], check=True)
        code = next(iter(sr.disassemble(src + ".cubin").values()))
    loop = st.main_loop(code)
    body = [code[i] for i in loop.path]
    assert loop.is_loop and len(loop.path) == loop.static_count
    assert loop.load_bytes / 4 == 4  # fp32 elements per iteration
    assert [ins.base for ins in body].count("FMUL") == 4
    assert [ins.op for ins in body if ins.base in ("LDG", "STG")] in (
        ["LDG.E.128", "STG.E.128"],
        ["LDG.E.128.CONSTANT", "STG.E.128"],
    )
    assert st.bytes_in_flight(code, loop.path) == 16
    assert len(body) <= 16  # index update, addresses, 4 FMULs, load, store, compare, branch


@pytest.fixture(scope="module")
def report_rows():
    backends = set()
    if sr.find_tool("nvcc") is not None:
        backends.add("cuda")
    if importlib.util.find_spec("triton") is not None:
        backends.add("triton")
    if not backends or sr.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc or Triton, and cuobjdump")
    return sr.run(list(sr.KERNELS), None, backends)


@pytest.mark.slow  # compiles every kernel of the report (about 1-2 minutes on 2 cores)
def test_report_kernels_compile_without_spills(report_rows):
    assert report_rows
    errors = [
        f"{r['kernel']} {r['backend']} {r['dtype']} {r['size']}: {r['error']}" for r in report_rows if "error" in r
    ]
    assert not errors, "\n".join(errors)
    spills = [
        f"{r['kernel']} {r['backend']} {r['dtype']} {r['size']}: {r['spill_stores']} B stored, "
        f"{r['spill_loads']} B loaded"
        for r in report_rows
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spills, "register spills:\n" + "\n".join(spills)


@pytest.mark.slow
def test_triton_tile_matches_the_loads_of_each_loop(report_rows):
    """In the Triton forward loops every byte loaded belongs to the tile, so the elements per thread counted
    from the tile constexpr (what the report uses) must equal the count from the loop's loads."""
    rows = [
        r
        for r in report_rows
        if r["backend"] == "triton"
        and r.get("loop_addr", "whole kernel") != "whole kernel"
        and r["kernel"] in ("logprobs_fwd", "kl_fwd")
    ]
    assert rows
    for r in rows:
        assert r["elems_from_loads"] == r["elems_per_iter"], r


@pytest.mark.slow
def test_cuda_tile_matches_the_loads_of_the_aligned_loops(report_rows):
    """The CUDA forwards count elements from their declared tile (the shifted-row bodies load straddling chunks
    they only partly use); in the aligned kernels every byte loaded is used, so the tile must equal the loads."""
    rows = [
        r
        for r in report_rows
        if r["backend"] == "cuda" and r["kernel"] in ("logprobs_fwd", "kl_fwd") and "elems_per_iter" in r
    ]
    assert rows
    for r in rows:
        assert r["elems_source"] == "tile" and r["elems_from_loads"] == r["elems_per_iter"], r
