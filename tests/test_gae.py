"""rlhf_kernels.gae (masked scan) on every backend: hand-computed cases and a straightforward loop as oracle."""

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, assert_within_torch_error

import rlhf_kernels


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
