"""Index logic of the CUDA row kernels, checked on the host: csrc/cuda/row_slots.h (which aligned 16-byte chunks a
slot is read from, how it is assembled, how a thread's slots are batched) is compiled with a host C++ compiler
together with tests/cuda_host_logic.cpp, which replays one row for every element size, row start alignment and a
list of vocabulary sizes. Needs no GPU; skipped when no C++ compiler is found."""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler (g++ or clang++)")
def test_slot_layout_host(tmp_path):
    exe = tmp_path / "cuda_host_logic"
    src = os.path.join(HERE, "cuda_host_logic.cpp")
    flags = ["-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc")]
    build = subprocess.run([CXX, *flags, src, "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-3000:] + run.stderr[-2000:]
