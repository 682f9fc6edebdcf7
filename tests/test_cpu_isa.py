"""The CPU backend's generic and AVX2 code paths (selected at run time) pass the same tests as the default one
(log-probs, KL, GAE, PPO losses)."""

import os
import subprocess
import sys

import pytest
from conftest import DEVICE, KERNEL_BACKENDS


@pytest.mark.skipif(DEVICE.type != "cpu" or "cpu" not in KERNEL_BACKENDS, reason="needs the CPU backend")
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_isa_variant(isa):
    env = dict(os.environ, RLHF_KERNELS_CPU_ISA=isa)
    kinds = " or ".join(
        ("matches_reference", "matches_loop", "batch_invariance", "non_finite", "ignored", "hand_computed", "peaked")
    )
    selection = f"cpu and ({kinds} or identical)"
    here = os.path.dirname(__file__)
    names = ("test_logprobs.py", "test_kl.py", "test_gae.py", "test_ppo_loss_ops.py", "test_ppo_loss_ops_modes.py")
    files = [os.path.join(here, f) for f in names]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    proc = subprocess.run([*cmd, "-k", selection], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
