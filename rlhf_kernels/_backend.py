"""Which backends exist on this machine, and which one an op call uses.

Backends, in order of preference for each device:
  * CUDA tensors: ``triton`` (GPU Triton kernels), ``cuda`` (CUDA C++ in ``rlhf_kernels._C``), ``reference``.
  * CPU tensors:  ``cpu`` (C++ in ``rlhf_kernels._C``, vectorised, parallel over rows), ``reference``.
    ``triton`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests only: it is slow), never by default.

A call picks a backend with ``backend=`` (highest priority), else the environment variable
``RLHF_KERNELS_BACKEND``, else the first available one in the order above; on CUDA the order of ``triton`` and
``cuda`` is chosen per op family (``CUDA_DEFAULTS``). Which backends implement each
low-level op is in the op table, ``rlhf_kernels._registry.OPS`` (``backend_status(device, op=...)``).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "RLHF_KERNELS_BACKEND"
# The device types each kernel backend serves: $RLHF_KERNELS_BACKEND applies to tensors of these (and Triton's to
# CPU tensors too under TRITON_INTERPRET=1).
SERVES = {"cuda": ("cuda",), "cpu": ("cpu",), "triton": ("cuda",)}


@functools.cache
def load_ext() -> tuple[bool, str]:
    """Import ``rlhf_kernels._C`` once; returns (loaded, reason-if-not)."""
    try:
        importlib.import_module("rlhf_kernels._C")
    except ImportError as exc:  # the package works without the compiled extension
        return False, f"rlhf_kernels._C not built or not loadable ({exc})"
    return True, ""


@functools.cache
def _triton_importable() -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return False, f"triton not installed ({exc})"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlhf_kernels_C::{op}", key)
    except RuntimeError:  # no such op in this build of rlhf_kernels._C
        return False


def backend_status(device: str | torch.device | None = None, op: str | None = None) -> dict[str, str]:
    """For each backend, ``"ok"`` or the reason it cannot run on ``device`` (default: CUDA if present, else CPU).

    With ``op`` (a low-level op of the op table, e.g. ``"gae_fwd"``; see ``rlhf_kernels._registry.OPS``), whether
    that op can run on each backend: the backend must implement it and, for ``cpu`` / ``cuda``, the compiled
    extension must hold its kernel. Without ``op``, whether the backend can run at all.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device).type
    status: dict[str, str] = {}
    if op is not None:
        from ._registry import get_spec  # the table imports this module

        implemented = get_spec(op).backends
    probe = op or "logprobs_fwd"  # the compiled op whose registration stands for the extension's kernels

    ok, why = _triton_importable()
    if not ok:
        status["triton"] = why
    elif dev == "cuda":
        status["triton"] = "ok" if torch.cuda.is_available() else "no CUDA device"
    elif dev == "cpu":
        status["triton"] = "ok" if triton_interpreted() else "CPU tensors need TRITON_INTERPRET=1"
    else:
        status["triton"] = f"unsupported device type {dev!r}"

    loaded, why = load_ext()
    if not loaded:
        status["cuda"] = status["cpu"] = why
    else:
        if dev != "cuda":
            status["cuda"] = "needs CUDA tensors"
        elif not torch.cuda.is_available():
            status["cuda"] = "no CUDA device"
        elif not _has_kernel(probe, "CUDA"):
            without = "CUDA sources" if op is None else f"the CUDA kernel of {op}"
            status["cuda"] = f"rlhf_kernels._C was built without {without}"
        else:
            status["cuda"] = "ok"
        if dev != "cpu":
            status["cpu"] = "needs CPU tensors"
        else:
            missing = "CPU kernels not registered" if op is None else f"rlhf_kernels._C has no CPU kernel of {op}"
            status["cpu"] = "ok" if _has_kernel(probe, "CPU") else missing
    status["reference"] = "ok"
    if op is not None:
        for name in BACKENDS:
            if name not in implemented:
                status[name] = f"{op} has no {name} implementation"
    return status


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (default: CUDA if present, else CPU), in order of preference."""
    status = backend_status(device)
    return [name for name in BACKENDS if status[name] == "ok"]


# The default kernel backend for CUDA tensors, per op family (the kernels an op runs): the first of the pair that
# is available. Chosen by the bandwidth measured on an H200 (benchmarks/results/gpu_h200_first_run.md, fraction
# of the copy bandwidth measured in the same run, bf16 N=4096 V=152064); the README's "Default backend per op"
# table gives the figures. One backend per family, forward and backward alike, so that a row's bits do not
# depend on whether a gradient was asked for (a rollout's log-probs equal the update's recomputation).
CUDA_DEFAULTS: dict[str, tuple[str, str]] = {
    # forward 89% (cuda) vs 93% (triton); forward + backward 88% vs 74%
    "logprobs": ("cuda", "triton"),  # logprobs, entropy and the fused-linear log-prob, PPO and DPO heads
    # forward 103% vs 97%; forward + backward 98% vs 97%
    "kl": ("cuda", "triton"),  # kl_from_logits, fused_linear_kl
    # 121% vs 51% (B=512, T=4096)
    "gae": ("cuda", "triton"),  # gae
    # policy 87% vs 73%, value 91% vs 93% (N = 2^24)
    "ppo_loss": ("cuda", "triton"),  # ppo_policy_loss, ppo_value_loss
}


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced through
def resolve_backend(requested: str | None, device: torch.device, family: str | None = None) -> str:
    """The backend an op call on ``device`` uses: ``requested``, else $RLHF_KERNELS_BACKEND, else the best one
    (on CUDA: the first available of ``CUDA_DEFAULTS[family]``, then the reference)."""
    name = requested if requested is not None else os.environ.get(ENV_VAR) or None
    return _resolve(name, requested is not None, device.type, triton_interpreted(), family)


@functools.lru_cache(maxsize=128)  # keyed by everything the answer depends on; errors are not cached
def _resolve(name: str | None, explicit: bool, device_type: str, interpreted: bool, family: str | None) -> str:
    if name is None:
        status = backend_status(device_type)
        if device_type == "cuda":
            order = (*CUDA_DEFAULTS.get(family, ("triton", "cuda")), "reference")
        else:
            order = ("cpu", "reference")
        return next(b for b in order if status[b] == "ok")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends are {', '.join(BACKENDS)}")
    serves = SERVES.get(name, (device_type,)) + (("cpu",) if name == "triton" and interpreted else ())
    if not explicit and device_type not in serves:
        # $RLHF_KERNELS_BACKEND=cuda picks the kernels of CUDA tensors; CPU tensors of the same process (a model
        # evaluated on CPU, a test) keep their default instead of failing. backend= is never overridden.
        return _resolve(None, False, device_type, interpreted, family)
    why = backend_status(device_type)[name]
    if why != "ok":
        src = "backend=" if explicit else f"${ENV_VAR}="
        raise ValueError(
            f"{src}{name!r} cannot run on {device_type} tensors here: {why}; "
            f"available: {', '.join(available_backends(device_type))}"
        )
    return name
