"""The GPU session scripts (benchmarks/gpu_*.py, gpu_run.sh) run their logic on CPU and cannot silently pass."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import rlhf_kernels
from benchmarks import gpu_parity, gpu_summary

REPO = Path(__file__).resolve().parents[1]


def _cpu_backend() -> str:
    """The C++ backend when it is built, else the reference (the logic under test is the same)."""
    return "cpu" if "cpu" in rlhf_kernels.available_backends("cpu") else "reference"


def test_parity_passes_and_reports_an_injected_error(tmp_path):
    backend = _cpu_backend()
    args = ["--quick", "--device", "cpu", "--backends", backend, "--vocabs", "7,33", "--only", "parity,invariance"]
    assert gpu_parity.main(args + ["--out", str(tmp_path / "ok.md")]) == 0
    ok = (tmp_path / "ok.md").read_text()
    assert " 0 fail" in ok and "| logprobs | bf16 |" in ok and "invariance" in ok
    # 1.0 added to one output whenever a batch has more than one row: both the error bound and the bitwise
    # batch-invariance check must catch it.
    assert gpu_parity.main(args + ["--inject-error", backend, "--out", str(tmp_path / "bad.md")]) == 1
    bad = (tmp_path / "bad.md").read_text()
    assert "Failures:" in bad
    assert f"logprobs logprobs, V=7 fp32 contiguous, {backend}: err 1.00e+00" in bad
    assert "- invariance row alone == row in batch" in bad


def test_parity_large_section_checks_rows_against_fp64(tmp_path):
    backend = _cpu_backend()
    args = ["--device", "cpu", "--backends", backend, "--only", "large", "--large-shape", "9x301"]
    assert gpu_parity.main(args + ["--out", str(tmp_path / "large.md")]) == 0
    text = (tmp_path / "large.md").read_text()
    assert "last row alone == in batch" in text and "kl reverse grad" in text
    assert gpu_parity.main(args + ["--inject-error", backend]) == 1


def test_sanitize_workload_runs_on_cpu(capsys):
    from benchmarks import gpu_sanitize

    backend = _cpu_backend()
    assert gpu_sanitize.main(["--device", "cpu", "--backends", backend, "--quick", "--parts", "ops,tokens"]) == 0
    assert "SANITIZE OK" in capsys.readouterr().out


def test_summary_reads_stage_logs(tmp_path):
    (tmp_path / "env.txt").write_text("device: NVIDIA H200\ncommit: abc1234\ntorch: 2.11.0\n")
    (tmp_path / "stages.tsv").write_text(
        "tests_kernels\tfailed\t1\t100\t140\nsanitize_memcheck\tok\t0\t30\t40\n"
        "sanitize_racecheck\tfailed\t3\t20\t25\nparity\ttimed out\t124\t70\t70\n"
    )
    (tmp_path / "tests_kernels.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_kl.py::test_a[triton-f32-shape0]\n"
        "[gw1] [ 20%] FAILED tests/test_kl.py::test_a[cuda-f32-shape0]\n"
        "tests/test_gae.py::test_b[reference] PASSED [ 30%]\n"
        "tests/test_gae.py::test_c SKIPPED (needs two GPUs) [ 40%]\n"
        "FAILED tests/test_kl.py::test_a[cuda-f32-shape0] - AssertionError: cuda kl\n"
        "==== 1 failed, 2 passed, 1 skipped in 9.00s ====\n"
    )
    (tmp_path / "sanitize_memcheck.log").write_text(
        "SANITIZE OK: 120 calls on cuda (cuda, triton), parts ops\n========= ERROR SUMMARY: 0 errors\n"
    )
    (tmp_path / "sanitize_racecheck.log").write_text(
        "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
        "SANITIZE OK: 80 calls on cuda (cuda), parts ops\n========= ERROR SUMMARY: 1 error\n"
    )
    text = gpu_summary.summary(str(tmp_path))
    assert text.startswith("# GPU session: NVIDIA H200")
    assert "| tests_kernels | triton | 1 | 0 |" in text and "| tests_kernels | cuda | 0 | 1 |" in text
    assert "| tests_kernels | - | 0 | 0 | 0 | 1 |" in text
    assert "`tests_kernels: failed tests/test_kl.py::test_a[cuda-f32-shape0]`" in text
    assert "| memcheck | 0 | SANITIZE OK: 120 calls" in text and "| racecheck | 1 |" in text
    assert "| parity | timed out | 124 | 70 | 70 |" in text
    assert "## Backend parity and batch invariance\n\nNot run" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_run.sh")], check=True)


def test_backend_of_test_ids():
    assert gpu_summary.backend_of("tests/t.py::test_x[triton-dtype0]") == "triton"
    assert gpu_summary.backend_of("tests/t.py::test_x[bf16-cuda]") == "cuda"
    assert gpu_summary.backend_of("tests/t.py::test_cuda_graph") == "-"  # the test name is not a parameter


def test_gpu_bench_finds_the_bench_modules_entry_points():
    """gpu_bench calls into the bench_*.py modules (measured there on a GPU only): their names must exist."""
    from benchmarks import bench_gae, bench_kl, bench_logprobs, bench_losses, gpu_bench

    for mod in (bench_logprobs, bench_kl):
        assert mod.MODES and callable(mod.measure) and callable(mod.make_inputs) and callable(mod.run)
        assert {"torch", "compile"} <= set(mod.providers(torch.device("cpu")))
    assert callable(bench_gae.make_inputs) and "loop" in bench_gae.providers(torch.device("cpu"))
    assert callable(bench_losses.run)
    assert callable(gpu_bench.bandwidth) and callable(gpu_bench.heads)
