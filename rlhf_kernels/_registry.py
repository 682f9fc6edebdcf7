"""The table of low-level ops and their backends: the one place that says what each op computes and who runs it.

Every low-level op ``X`` in :data:`OPS` exists twice under the same name and contract:

* ``torch.ops.rlhf_kernels.X(*args, backend)``: a ``torch.library`` custom op, defined here from the table, whose
  trailing ``str backend`` picks the implementation (``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``);
  the autograd Functions and fused heads call it, and it traces under ``torch.compile``;
* ``torch.ops.rlhf_kernels_C.X(*args)``: the compiled op of ``rlhf_kernels._C`` (schema in csrc/module.cpp, CPU
  kernels in csrc/cpu, CUDA kernels in csrc/cuda), dispatched on the device of its tensors.

Both take the arguments of :attr:`OpSpec.schema` (the Python op adds ``backend``) and return the same outputs:
same shapes, dtypes and values up to rounding; tests/test_backend_registry.py checks the compiled schemas against
the table, and tests/test_cross_backend.py runs every backend on the same inputs and compares every output. The
fake (meta) implementation of each op, registered here for both names, gives the output shapes from the inputs.

Conventions shared by every op and backend:

* Statistics are fp32 and split the log-sum-exp of a row of z = logits * inv_temperature (rounded once in fp32)
  into ``row_max`` = max z and ``log_norm`` = log sum exp(z - row_max), never summed (the sum would round to
  ulp(|lse|)).
* Ignored rows: a row whose label is ``ignore_index`` (logprobs_*) or whose mask entry is False (kl_*) is never
  read, and every per-row output of it is +0.0: logprob, entropy, row_max, log_norm (hence lse = 0), kl and the
  four KL statistics; its gradient row is all zeros. A GAE row without a masked step has statistics (0, 0, 0); a
  PPO token of weight 0 is never read and gets gradient 0 and adds nothing to the sums.
* A row holding a NaN or +-inf logit gives NaN for its logprob / entropy / kl; its statistics are then unspecified.
* Layouts: logits need unit stride along V only; per-row inputs (labels, incoming gradients, saved statistics) may
  have any strides; every other tensor argument must be contiguous. Every kernel backend accepts and rejects the
  same layouts (tests/test_cross_backend.py), and a row's outputs never depend on the layout.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _reference_ops as ref
from ._backend import BACKENDS, load_ext

F32 = torch.float32


@dataclass(frozen=True)
class OpSpec:
    """One low-level op: its contract, its implementations, its shape function and example inputs."""

    name: str  # torch.ops.rlhf_kernels.<name> (Python) and torch.ops.rlhf_kernels_C.<name> (C++)
    schema: str  # "(args) -> outputs", the compiled op's schema without its name
    outputs: tuple[str, ...]  # names of the outputs, in order
    contract: str  # shapes, dtypes, layouts and maths of arguments and outputs
    fake: Callable[..., Any]  # the schema's arguments -> empty outputs of the right shapes, dtypes and device
    examples: Callable[..., list[tuple]]  # (device, big=False) -> argument tuples covering the op's edge cases
    module: str | None = None  # module of the Triton launcher and kernels
    triton: str | None = None  # the Triton launcher in `module`, with the schema's arguments
    kernels: tuple[str, ...] = ()  # the @triton.jit kernels of `module` that the launcher runs
    native: bool = True  # compiled into rlhf_kernels._C (csrc/cpu and csrc/cuda)
    reference: Callable[..., Any] | None = None  # plain PyTorch, fp64 inside
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # outputs whose last dim stacks quantities

    @property
    def cpp_name(self) -> str | None:
        return f"rlhf_kernels_C::{self.name}" if self.native else None

    @property
    def python_schema(self) -> str:
        args, outs = self.schema.split(") -> ", 1)
        return f"{args}, str backend) -> {outs}"

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends that implement this op, in the order of :data:`rlhf_kernels.BACKENDS`."""
        has = {"triton": self.triton is not None, "cuda": self.native, "cpu": self.native}
        has["reference"] = self.reference is not None
        return tuple(b for b in BACKENDS if has[b])


def _rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    return tuple(x.new_empty(x.shape[:2], dtype=F32) for _ in range(k))


def _flat(x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    return tuple(x.new_empty(x.shape[0] * x.shape[1], dtype=F32) for _ in range(k))


def _gae_fake(rewards, *_):
    adv = rewards.new_empty(rewards.shape, dtype=F32)
    return adv, torch.empty_like(adv), rewards.new_empty((rewards.shape[0], 3), dtype=F32)


def _ppo_fake(k: int):
    return lambda x, *_: (torch.empty_like(x), x.new_empty((k,)))


_OPS = "rlhf_kernels.ops."
_ROWS = "logits: (B, T, V) float32 / bfloat16 / float16, stride(2) == 1, any other strides"
_OP_LIST = [
    OpSpec(
        "logprobs_fwd",
        "(Tensor logits, Tensor labels, float inv_temperature, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)",
        ("logprobs", "entropy", "row_max", "log_norm"),
        f"""{_ROWS}; labels: (B, T) int64, any strides. With z = logits * inv_temperature and p = softmax(z),
        returns fp32 (B, T) contiguous: logprobs = log p[label], entropy = -sum_v p_v log p_v, row_max, log_norm.
        A label outside [0, V) that is not ignore_index gives logprob NaN (the other outputs as usual).""",
        lambda logits, *_: _rows(logits, 4),
        ref.logprobs_fwd_examples,
        _OPS + "logprobs",
        "logprobs_fwd_triton",
        ("_logprobs_fwd_kernel", "_logprobs_fwd_merge_kernel", "_logprobs_fwd_split_kernel"),
        reference=ref.logprobs_fwd,
    ),
    OpSpec(
        "logprobs_bwd",
        "(Tensor logits, Tensor labels, Tensor grad_logprobs, Tensor grad_entropy, Tensor row_max, Tensor log_norm,"
        " Tensor entropy, float inv_temperature, int ignore_index) -> Tensor",
        ("grad_logits",),
        f"""{_ROWS}; labels as for logprobs_fwd; the five other tensors fp32 (B, T), any strides, the statistics as
        logprobs_fwd returned them. Returns the gradient of sum(grad_logprobs * logprobs + grad_entropy * entropy)
        with respect to logits, recomputed from the logits and statistics: (B, T, V) contiguous, logits dtype;
        dz = onehot(label) g_lp - p (g_lp + g_H (log p + entropy)), dlogits = dz * inv_temperature.""",
        lambda logits, *_: logits.new_empty(logits.shape),
        ref.logprobs_bwd_examples,
        _OPS + "logprobs",
        "logprobs_bwd_triton",
        ("_logprobs_bwd_kernel",),
        reference=ref.logprobs_bwd,
    ),
    OpSpec(
        "kl_fwd",
        "(Tensor logits, Tensor ref_logits, Tensor? mask, float inv_temperature, bool reverse)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        ("kl", "row_max", "log_norm", "ref_row_max", "ref_log_norm"),
        f"""{_ROWS}; ref_logits: (B2, T2, V) with B2 * T2 = B * T = N, any of the three float dtypes, stride(2) == 1;
        mask: None or (N,) bool contiguous. With p = softmax(logits * inv_temperature) and q = softmax(ref_logits *
        inv_temperature), returns fp32 (N,) contiguous: kl = KL(p || q) if reverse else KL(q || p), clamped to >= 0
        (exactly 0 for identical rows), and the row_max / log_norm of both.""",
        lambda logits, *_: _flat(logits, 5),
        ref.kl_fwd_examples,
        _OPS + "kl",
        "kl_fwd_triton",
        ("_kl_fwd_kernel", "_kl_fwd_merge_kernel", "_kl_fwd_split_kernel"),
        reference=ref.kl_fwd,
    ),
    OpSpec(
        "kl_bwd",
        "(Tensor logits, Tensor ref_logits, Tensor? mask, Tensor grad_kl, Tensor row_max, Tensor log_norm,"
        " Tensor ref_row_max, Tensor ref_log_norm, Tensor kl, float inv_temperature, bool reverse) -> Tensor",
        ("grad_logits",),
        """logits, ref_logits, mask as for kl_fwd; grad_kl and the outputs of kl_fwd: fp32 (N,), any strides.
        Returns grad_kl * dkl/dlogits: (B, T, V) contiguous, logits dtype; with log p, log q from the statistics,
        dkl/dz = p (log p - log q - kl) (reverse) or p - q (forward), dlogits = dz * inv_temperature.""",
        lambda logits, *_: logits.new_empty(logits.shape),
        ref.kl_bwd_examples,
        _OPS + "kl",
        "kl_bwd_triton",
        ("_kl_bwd_kernel",),
        reference=ref.kl_bwd,
    ),
    OpSpec(
        "gae_fwd",
        "(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor, Tensor)",
        ("advantages", "returns", "row_stats"),
        """rewards, values: (B, T) contiguous, one float dtype (float32 / bfloat16 / float16); mask: (B, T) bool
        contiguous. Backwards over t from next_value = acc = 0: where mask, acc = r + gamma next_value - V +
        gamma lam acc (gamma lam rounded once to fp32) and next_value = V; elsewhere both carry. Returns fp32
        advantages (B, T) (acc after step t), returns (B, T) = advantages + values, and row_stats (B, 3): count,
        mean and M2 (sum of squared deviations from the mean) of the advantages at the row's masked steps.""",
        _gae_fake,
        ref.gae_fwd_examples,
        _OPS + "gae",
        "gae_triton",
        ("_gae_kernel",),
        reference=ref.gae_fwd,
        columns={"row_stats": ("count", "mean", "M2")},
    ),
    OpSpec(
        "ppo_policy_fwd",
        "(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor weight, Tensor seq_offsets,"
        " float clip_low, float clip_high, float dual_clip, int loss_type, int ratio_level, float tau_pos,"
        " float tau_neg) -> (Tensor, Tensor)",
        ("grad", "sums"),
        """PPO-family policy loss per token fused with its gradient. The four inputs: (N,) fp32 contiguous, one device;
        token i counts iff weight[i] != 0 (its other inputs are then never read). seq_offsets: (S + 1,) int64 contiguous
        on that device, 0 = o_0 <= o_1 <= ... <= o_S = N, sequence s being tokens [o_s, o_s+1); read only when
        ratio_level != 0 (at ratio_level 0 it may be empty). The CPU backends check the table; the accelerator kernels
        clamp every offset into [0, N] instead (no host sync): a malformed table then gives wrong values (tokens outside
        every sequence get grad 0), never an out-of-bounds access. d = logprobs - old_logprobs (fp32), A = advantages.
        The log-ratio x: ratio_level 0 (token): x = d; 1 (sequence, GSPO) and 2 (sequence_token, GSPO-token): x = D_s =
        (sum of the counted d of the token's sequence, in fp64) / n_s, n_s its counted tokens, rounded to fp32. rho =
        exp(clamp(x, -20, 20)), saturated = |x| > 20, lo = 1 - clip_low, hi = 1 + clip_high (formed in fp64, rounded
        once). Per loss_type, the loss l, q = dl/dlog(rho) and the direct derivative e = dl/dlogprobs (at fixed rho): 0
        (clip): l1 = -A rho, l2 = -A clamp(rho, lo, hi), clipped = l2 > l1, l = clipped ? l2 : l1; if dual_clip > 0 and
        A < 0 and l > -A dual_clip: l = -A dual_clip, lower; q = 0 if clipped, lower or saturated, else l1; e = 0; clip-
        low = clipped and A < 0, clip-high = clipped and A > 0. 1 (cispo): rc = clamp(rho, lo, hi) (a constant), l = -rc
        A logprobs, q = 0, e = -rc A; clip-low = rho < lo, clip-high = rho > hi. 2 (sapo): tau = A > 0 ? tau_pos :
        tau_neg, g = sigmoid(tau (rho - 1)), l = -g (4 / tau) A, q = saturated ? 0 : -4 A g (1 - g) rho, e = 0; clip-low
        = A < 0 and rho < lo, clip-high = A > 0 and rho > hi (where the hard clip would act). dual_clip must be 0 unless
        loss_type is 0; tau_pos, tau_neg > 0. Gradient of sum_i weight_i l_i: levels 0 and 2: grad_i = weight_i (q_i +
        e_i); level 1: grad_i = weight_i e_i + G_s, G_s = (sum of weight_j q_j over the sequence's counted tokens, in
        fp64) / n_s rounded to fp32. grad (N,) fp32 is 0 where a token does not count. sums (5,) fp32 over the counted
        tokens: [sum weight * l, count of clip-low, count of clip-high, sum (old_logprobs - logprobs), count of lower],
        added by the backend in a fixed order (bitwise reproducible).""",
        _ppo_fake(5),
        ref.ppo_policy_fwd_examples,
        _OPS + "ppo_loss",
        "ppo_policy_fwd_triton",
        ("_ppo_policy_fwd_kernel", "_ppo_policy_seq_kernel"),
        reference=ref.ppo_policy_fwd,
        columns={
            "sums": ("weighted_loss", "clip_low_count", "clip_high_count", "old_minus_new_logprob", "lower_count")
        },  # fmt: skip
    ),
    OpSpec(
        "ppo_value_fwd",
        "(Tensor values, Tensor old_values, Tensor returns, Tensor weight, float clip) -> (Tensor, Tensor)",
        ("grad", "sums"),
        """Clipped value loss per token fused with its gradient. Inputs as for ppo_policy_fwd; clip >= 0 (+inf: no
        clipping). With a = v - R, vc = min(max(v, old - clip), old + clip), b = vc - R: clipped = b^2 > a^2,
        l = 0.5 (clipped ? b^2 : a^2), dl/dv = clipped ? 0 : a. Returns grad (N,) fp32 = weight * dl/dv and
        sums (2,) fp32: [sum weight * l, count of clipped] over the counted tokens.""",
        _ppo_fake(2),
        ref.ppo_value_fwd_examples,
        _OPS + "ppo_loss",
        "ppo_value_fwd_triton",
        ("_ppo_value_fwd_kernel",),
        reference=ref.ppo_value_fwd,
        columns={"sums": ("weighted_loss", "clipped_count")},
    ),
]
OPS: dict[str, OpSpec] = {spec.name: spec for spec in _OP_LIST}


def get_spec(op: str) -> OpSpec:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the low-level ops are {', '.join(OPS)}")
    return OPS[op]


def resolve(spec: OpSpec, attr: str) -> Any:
    """``spec.module.attr`` (imported on first use: the ops modules import this one)."""
    return getattr(importlib.import_module(spec.module), attr)


def native_op_names() -> set[str]:
    """Names of the ops that rlhf_kernels._C registers (empty when it is not built)."""
    if not load_ext()[0]:
        return set()
    prefix = "rlhf_kernels_C::"
    return {n[len(prefix) :] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


@functools.cache
def implementation(op: str, backend: str) -> Callable[..., Any]:
    """The function that runs ``op`` on ``backend``, taking the schema's arguments."""
    spec = get_spec(op)
    if backend not in spec.backends:
        raise ValueError(f"{op} has no {backend!r} implementation; it has {', '.join(spec.backends)}")
    if backend == "triton":
        return on_input_device(resolve(spec, spec.triton))
    if backend == "reference":
        return spec.reference
    loaded, why = load_ext()
    if not loaded or op not in native_op_names():
        raise RuntimeError(f"{op}: backend={backend!r} needs the compiled op {spec.cpp_name}: {why or 'not built'}")
    return on_backend_device(op, backend, getattr(torch.ops.rlhf_kernels_C, op).default)


def on_backend_device(op: str, backend: str, native: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled op, refusing tensors on another device type than its backend's: the dispatcher would otherwise
    run the CPU kernel for ``backend="cuda"`` on CPU tensors (and the reverse) without a word."""
    want = "cuda" if backend == "cuda" else "cpu"

    @functools.wraps(native)
    def run(*args: Any) -> Any:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.device.type != want:
                raise ValueError(f"{op}: backend={backend!r} runs on {want} tensors, but argument {i} is on {a.device}")
        return native(*args)

    return run


def on_input_device(launcher: Callable[..., Any]) -> Callable[..., Any]:
    """``launcher`` run with the current CUDA device set to its first tensor argument's device (Triton launches on
    the current device and its current stream; inputs on ``cuda:1`` while the current device is 0 would otherwise
    run on the wrong device). CPU tensors (the interpreter) run as they are."""

    @functools.wraps(launcher)
    def run(*args: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return launcher(*args)
        with torch.cuda.device(first.device):
            return launcher(*args)

    return run


def call(op: str, backend: str, *args: Any) -> Any:
    """Runs ``op`` on ``backend`` directly (eager, without the custom-op layer and its ~20 us on CPU)."""
    return implementation(op, backend)(*args)


def _define(spec: OpSpec) -> None:
    def run(*args):
        return call(spec.name, args[-1], *args[:-1])

    def fake(*args):
        return spec.fake(*args[:-1])

    op = torch.library.custom_op(f"rlhf_kernels::{spec.name}", run, mutates_args=(), schema=spec.python_schema)
    op.register_fake(fake)
    op.__doc__ = f"{spec.name}{spec.python_schema}\n\n{inspect.cleandoc(spec.contract)}"
    if spec.native and spec.name in native_op_names():  # the compiled op traces under torch.compile too
        torch.library.register_fake(spec.cpp_name)(spec.fake)


for _spec in _OP_LIST:
    _define(_spec)
