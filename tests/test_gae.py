"""rlhf_kernels.gae (masked scan) on every backend: hand-computed cases and a straightforward loop as oracle."""

import importlib.util
import os

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, assert_within_torch_error
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels
from rlhf_kernels._utils import tl, triton

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    from rlhf_kernels.ops.gae import _compose


def loop_gae(rewards, values, mask, gamma, lam):
    """The textbook backward loop, written independently of the library, in the inputs' dtype."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(B):
        acc, next_value = 0.0, 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                acc = delta + gamma * lam * acc
                next_value = values[b, t]
            adv[b, t] = acc
    return adv, adv + values


def batched_loop_gae(rewards, values, mask, gamma, lam):
    """The same recursion vectorised over the batch (one step per time index), for long inputs."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    acc = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(acc)
    for t in reversed(range(T)):
        m = mask[:, t]
        acc = torch.where(m, rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * acc, acc)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = acc
    return adv, adv + values


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype, device=DEVICE)


# (rewards, values, mask, gamma, lam, advantages) with the arithmetic in comments
HAND_CASES = {
    # gamma = lam = 1: advantage = (sum of later rewards) - V_t: 1 - 0.5, 1 - 0.25, 1 - 0.125
    "gamma=lam=1": ([[0, 0, 1]], [[0.5, 0.25, 0.125]], [[1, 1, 1]], 1.0, 1.0, [[0.5, 0.75, 0.875]]),
    # t=1: delta = 2 - 4 = -2 -> acc = -2; t=0: delta = 1 + 0.5 * 4 - 0 = 3 -> acc = 3 + 0.25 * -2 = 2.5
    "gamma<1": ([[1, 2]], [[0, 4]], [[1, 1]], 0.5, 0.5, [[2.5, -2.0]]),
    # hole at t=1 is skipped: t=2: delta = 2 - 4 = -2; t=1 carries -2; t=0: delta = 1 + 0.5 * 4 = 3, acc = 3 - 1
    "hole": ([[1, 100, 2]], [[0, 100, 4]], [[1, 0, 1]], 0.5, 1.0, [[2.0, -2.0, -2.0]]),
    # left padding: t=3: 1 - 0.5 = 0.5; t=2: 0 + 0.5 - 0.25 + 0.5 = 0.75; t=1, t=0 carry 0.75
    "left padding": ([[9, 9, 0, 1]], [[9, 9, 0.25, 0.5]], [[0, 0, 1, 1]], 1.0, 1.0, [[0.75, 0.75, 0.75, 0.5]]),
    # right padding: t=3, t=2 stay 0; t=1: 1 - 0.25 = 0.75; t=0: 0 + 0.25 - 0.5 + 0.75 = 0.5
    "right padding": ([[0, 1, 9, 9]], [[0.5, 0.25, 9, 9]], [[1, 1, 0, 0]], 1.0, 1.0, [[0.5, 0.75, 0.0, 0.0]]),
    # T = 1: 2 - 0.5
    "T=1": ([[2]], [[0.5]], [[1]], 0.9, 0.9, [[1.5]]),
    # a fully masked row: all zeros (returns = values); next to a normal row
    "masked row": ([[5, 5], [1, 1]], [[1, 2], [0, 0]], [[0, 0], [1, 1]], 1.0, 0.5, [[0, 0], [1.5, 1.0]]),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(HAND_CASES))
def test_hand_computed(backend, dtype, case):
    r, v, m, gamma, lam, expect = HAND_CASES[case]
    rewards, values, mask = t(r, dtype), t(v, dtype), t(m, torch.bool)
    adv, ret = rlhf_kernels.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert torch.allclose(adv, t(expect), atol=1e-6), adv
    assert torch.allclose(ret, adv + values.float(), atol=1e-6)
    loop = loop_gae(rewards.float(), values.float(), mask, gamma, lam)[0]
    assert torch.allclose(adv, loop, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (5, 300), (3, 1025), (2, 5000), (257, 9)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9)])
def test_matches_loop(backend, dtype, shape, gamma, lam):
    rewards = torch.randn(shape, device=DEVICE).to(dtype)
    values = torch.randn(shape, device=DEVICE).to(dtype)
    mask = torch.rand(shape, device=DEVICE) > 0.2
    mask[0, : shape[1] // 3] = False  # left padding
    mask[-1, shape[1] // 2 :] = False  # right padding
    adv, ret = rlhf_kernels.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    ref = batched_loop_gae(rewards.double(), values.double(), mask, gamma, lam)
    plain = batched_loop_gae(rewards.float(), values.float(), mask, gamma, lam)
    assert_within_torch_error(adv, plain[0], ref[0], 1e-5, f"{backend} advantages")
    assert_within_torch_error(ret, plain[1], ref[1], 1e-5, f"{backend} returns")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_whiten_and_input_forms(backend, offset):
    """Whitening from the kernels' per-row statistics equals masked_whiten of the advantages, also when the
    advantages have a large mean and drift along the rows (the statistics must not cancel)."""
    rewards = torch.randn(6, 2000, device=DEVICE) * 3 + offset / 2000
    values = (torch.randn(6, 2000, device=DEVICE) + offset).to(torch.float16)
    mask = torch.rand(6, 2000, device=DEVICE) > 0.3
    adv, ret = rlhf_kernels.gae(rewards, values, mask, gamma=0.98, lam=0.9, backend=backend)
    white, ret_w = rlhf_kernels.gae(rewards, values, mask.float(), gamma=0.98, lam=0.9, whiten=True, backend=backend)
    assert torch.equal(ret, ret_w)  # returns come before whitening; a 0/1 float mask means the same as bool
    assert torch.allclose(white.double(), rlhf_kernels.masked_whiten(adv.double(), mask), atol=1e-5)
    sel = white[mask].double()
    assert abs(sel.mean().item()) < 1e-5 and abs(sel.var().item() - 1) < 1e-4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_and_empty_shapes(backend):
    rewards = torch.randn(0, 5, device=DEVICE)
    adv, ret = rlhf_kernels.gae(rewards, rewards, rewards > 0, backend=backend)
    assert adv.shape == (0, 5) and ret.shape == (0, 5)
    rewards = torch.randn(4, 0, device=DEVICE)
    assert rlhf_kernels.gae(rewards, rewards, rewards > 0, backend=backend)[0].shape == (4, 0)
    # rows are independent: a row's advantages do not depend on the rest of the batch
    r, v = torch.randn(9, 333, device=DEVICE), torch.randn(9, 333, device=DEVICE)
    m = torch.rand(9, 333, device=DEVICE) > 0.5
    full = rlhf_kernels.gae(r, v, m, gamma=0.97, backend=backend)[0]
    assert torch.equal(full[4:5], rlhf_kernels.gae(r[4:5], v[4:5], m[4:5], gamma=0.97, backend=backend)[0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(r, v, m):
        adv, ret = rlhf_kernels.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
        return adv * 2, ret

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    r, v = torch.randn(3, 50, device=DEVICE), torch.randn(3, 50, device=DEVICE)
    m = torch.rand(3, 50, device=DEVICE) > 0.3
    for a, b in zip(compiled(r, v, m), step(r, v, m)):
        assert torch.allclose(a, b)


def test_bad_inputs():
    r = torch.randn(2, 5, device=DEVICE)
    m = r > 0
    with pytest.raises(ValueError, match="values shape"):
        rlhf_kernels.gae(r, r[:, :4], m)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rlhf_kernels.gae(r[0], r[0], m[0])
    with pytest.raises(ValueError, match="mask shape"):
        rlhf_kernels.gae(r, r, m[:1])
    with pytest.raises(TypeError, match="floating-point"):
        rlhf_kernels.gae(r.long(), r, m)
    with pytest.raises(ValueError, match="gamma"):
        rlhf_kernels.gae(r, r, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        rlhf_kernels.gae(r, r, m, lam=-0.1)
    with pytest.raises(ValueError, match="selects 0 elements"):
        rlhf_kernels.gae(r, r, torch.zeros_like(m), whiten=True)


# The CPU kernel runs groups of rows side by side in vector lanes (16 rows on AVX-512, 8 on AVX2) and the rows
# left over (B % 16, B % 8) one at a time; a batch of one row always takes the one-row path. Each lane repeats
# the one-row arithmetic exactly, so every row must come out bitwise the same either way, in any lane.
needs_cpu_kernel = pytest.mark.skipif(
    "cpu" not in rlhf_kernels.available_backends("cpu"), reason="needs the compiled CPU backend"
)


def bits(x):
    return x.contiguous().view(torch.int32)


def same_bits_or_both_nan(a, b):
    """Bitwise equal, except that two NaNs match whatever their payloads: where two different NaNs meet in one
    addition, which one comes out depends on the operand order the compiler picked, also in the one-row path."""
    return bool(((bits(a) == bits(b)) | (a.isnan() & b.isnan())).all())


def row_pool(n, T, dtype, seed):
    """n rows of the kinds the lanes must reproduce: holes, right and left padding of every length (so the first
    masked step from the end falls anywhere in a tile, or in the T % G tail), fully masked and fully unmasked rows,
    large per-row offsets (advantages far from 0, whose fp64 statistics depend on the shift being the row's first
    advantage down to the last fp32 bit)."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, T, generator=g) * 3 + 1e4 * torch.rand(n, 1, generator=g)
    values = torch.randn(n, T, generator=g) + 40 * torch.rand(n, 1, generator=g)
    mask = torch.rand(n, T, generator=g) > 0.3
    t, lengths, kind = torch.arange(T), torch.randint(0, T + 1, (n, 1), generator=g), torch.arange(n) % 5
    mask[kind == 1] = (t < lengths)[kind == 1]
    mask[kind == 2] = (t >= lengths)[kind == 2]
    mask[kind == 3] = False
    mask[kind == 4] = True
    return rewards.to(dtype), values.to(dtype), mask


def cpu_gae_fwd(r, v, m, gamma=0.99, lam=0.95):
    return torch.ops.rlhf_kernels.gae_fwd(r, v, m, gamma, lam, "cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 16, 33, 100, 517])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.0, 0.9)])  # gamma = 0: advantages = r - V, no decay
def test_cpu_lane_groups_bitwise_identical_to_single_rows(dtype, T, gamma, lam):
    r, v, m = row_pool(64, T, dtype, seed=T)
    alone = [cpu_gae_fwd(r[i : i + 1], v[i : i + 1], m[i : i + 1], gamma, lam) for i in range(64)]
    g = torch.Generator().manual_seed(1)
    for B in (1, 7, 16, 17, 37, 64):
        rows = torch.randperm(64, generator=g)[:B]  # a row sits in a different lane (or the rest) for each B
        batch = cpu_gae_fwd(r[rows], v[rows], m[rows], gamma, lam)
        for k, i in enumerate(rows.tolist()):
            for name, got, want in zip(("advantages", "returns", "stats"), batch, alone[i]):
                assert torch.equal(bits(got[k]), bits(want[0])), f"B={B}: row {i} at position {k}, {name}"


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_lane_conversion_of_every_half_identical(dtype):
    """Every fp16 / bf16 bit pattern (subnormals, signed zeros, infinities, NaNs) as values and as rewards: the
    lanes widen whole vectors with integer steps, the one-row path element by element."""
    pattern = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(32, 2048)
    shuffled = pattern.flatten()[torch.randperm(pattern.numel())].reshape(pattern.shape)
    mask = torch.rand(pattern.shape) > 0.1
    for r, v in ((shuffled, pattern), (pattern, torch.randn(pattern.shape).to(dtype))):
        batch = cpu_gae_fwd(r, v, mask)
        for i in range(0, 32, 5):
            alone = cpu_gae_fwd(r[i : i + 1], v[i : i + 1], mask[i : i + 1])
            for got, want in zip(batch, alone):
                assert same_bits_or_both_nan(got[i], want[0]), f"row {i}"


@needs_cpu_kernel
def test_cpu_thread_count_bitwise_identical():
    r, v, m = row_pool(100, 700, torch.float32, seed=3)  # groups of rows and a rest, split over several tasks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gae_fwd(r, v, m)
        torch.set_num_threads(max(2, threads))
        many = cpu_gae_fwd(r, v, m)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(bits(a), bits(b))


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eager_calls_skip_the_custom_op_layer(backend):
    """Eager calls run the kernels directly (the custom-op layer costs ~20 us per call); under a dispatch mode,
    as under torch.compile, the call stays one rlhf_kernels.gae_fwd op."""
    r, v = torch.randn(5, 40, device=DEVICE), torch.randn(5, 40, device=DEVICE).to(torch.bfloat16)
    m = torch.rand(5, 40, device=DEVICE) > 0.3
    adv, ret = rlhf_kernels.gae(r, v, m, gamma=0.99, lam=0.9, backend=backend)
    op_adv, op_ret, _ = torch.ops.rlhf_kernels.gae_fwd(r, v.float(), m, 0.99, 0.9, backend)
    assert torch.equal(adv, op_adv) and torch.equal(ret, op_ret)
    with _RecordOps() as record:
        rlhf_kernels.gae(r, v, m, gamma=0.99, lam=0.9, backend=backend)
    assert "rlhf_kernels.gae_fwd.default" in record.ops, record.ops
    with FakeTensorMode() as mode:
        fake = rlhf_kernels.gae(mode.from_tensor(r), mode.from_tensor(v), mode.from_tensor(m), backend=backend)
        assert fake[0].shape == (5, 40) and fake[1].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_large(backend):
    rewards = torch.randn(512, 4096, device="cuda")
    values = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(512, 4096, device="cuda") > 0.1
    adv, ret = rlhf_kernels.gae(rewards, values, mask, gamma=0.999, lam=0.95, backend=backend)
    ref = batched_loop_gae(rewards.double(), values.double(), mask, 0.999, 0.95)
    plain = batched_loop_gae(rewards, values.float(), mask, 0.999, 0.95)
    assert_within_torch_error(adv, plain[0], ref[0], 1e-5, f"{backend} advantages")


if HAVE_TRITON:

    @triton.jit
    def _both_scans(src, rev_out, fwd_out, N: tl.constexpr):
        """The reverse scan of 5 components of length N, and the forward scan of the same lanes reversed."""
        lane = tl.arange(0, N)
        back = N - 1 - lane
        a0, a1, a2, a3, a4 = tl.associative_scan(
            (tl.load(src + lane), tl.load(src + N + lane), tl.load(src + 2 * N + lane), tl.load(src + 3 * N + lane),
             tl.load(src + 4 * N + lane)), 0, _compose, reverse=True,
        )  # fmt: skip
        b0, b1, b2, b3, b4 = tl.associative_scan(
            (tl.load(src + back), tl.load(src + N + back), tl.load(src + 2 * N + back), tl.load(src + 3 * N + back),
             tl.load(src + 4 * N + back)), 0, _compose,
        )  # fmt: skip
        tl.store(rev_out + lane, a0)
        tl.store(rev_out + N + lane, a1)
        tl.store(rev_out + 2 * N + lane, a2)
        tl.store(rev_out + 3 * N + lane, a3)
        tl.store(rev_out + 4 * N + lane, a4)
        tl.store(fwd_out + back, b0)
        tl.store(fwd_out + N + back, b1)
        tl.store(fwd_out + 2 * N + back, b2)
        tl.store(fwd_out + 3 * N + back, b3)
        tl.store(fwd_out + 4 * N + back, b4)


def test_triton_scan_over_reversed_tiles_equals_the_reverse_scan():
    """The GAE kernel scans each tile forward over time-reversed lanes instead of calling
    ``tl.associative_scan(reverse=True)`` (an open upstream report says the latter miscompiles). Under the
    interpreter the two give bitwise the same compositions, on data that exercises every kind of step."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not HAVE_TRITON:
        pytest.skip("compares against the reverse scan under the Triton interpreter only")
    gen = torch.Generator().manual_seed(0)
    for n in (1, 16, 128, 1024):
        keep = torch.rand(n, generator=gen) > 0.3  # masked steps and skipped (identity) steps
        gamma, gamma_lam = 0.99, 0.99 * 0.95
        r, v = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
        one, zero = torch.ones(n), torch.zeros(n)
        src = torch.stack(
            [
                torch.where(keep, zero, one),
                torch.where(keep, gamma * one, zero),
                torch.where(keep, gamma_lam * one, one),
                torch.where(keep, v, zero),
                torch.where(keep, r - v, zero),
            ]
        ).contiguous()
        rev, fwd = torch.empty_like(src), torch.empty_like(src)
        _both_scans[(1,)](src, rev, fwd, N=n)
        assert torch.equal(rev, fwd), n
