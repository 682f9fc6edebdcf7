"""rlhf_kernels.kl_from_logits (exact KL over the vocabulary) and kl_penalty (sampled-token estimators)."""

import math

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, INVARIANT_BACKENDS, KERNEL_BACKENDS, assert_within_torch_error

import rlhf_kernels
from rlhf_kernels import reference

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F16, BF16)]
ATOL = {F32: 1e-5, BF16: 1e-3, F16: 1e-4}
DIRECTIONS = ["reverse", "forward"]


def plain_torch(x, y, temperature=1.0, mask=None, direction="reverse"):
    """What users write, in the inputs' own dtypes: the baseline whose error bounds ours."""
    logp = torch.log_softmax(x / temperature, dim=-1)
    logq = torch.log_softmax(y / temperature, dim=-1)
    if direction == "forward":
        logp, logq = logq, logp
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl if mask is None else kl * mask


def _run(fn, x_leaf, y, weight, make_input):
    x_leaf.grad = None
    kl = fn(make_input(x_leaf), make_input(y))
    (kl.float() * weight).sum().backward()
    return kl.detach(), x_leaf.grad.detach().clone()


def check_against_reference(
    backend, x_leaf, y, temperature=1.0, mask=None, direction="reverse", make_input=None, kl_ulps=0
):
    """Value and gradient (for a random upstream gradient): ours vs plain torch vs the fp64 reference. kl_ulps > 0
    adds that many fp32 ulps of the largest KL (times the largest upstream weight, for the gradient) to the
    tolerance: for KLs far above 1 the fp32 rounding of the KL itself, and of the terms of that size that cancel
    in its gradient (p (log p - log q - KL)), is the floor of any fp32 implementation."""
    make_input = make_input or (lambda t: t)
    lead = make_input(y).shape[:-1]
    weight = torch.randn(lead, device=DEVICE)
    kw = dict(temperature=temperature, mask=mask, direction=direction)
    ours = _run(lambda a, b: rlhf_kernels.kl_from_logits(a, b, backend=backend, **kw), x_leaf, y, weight, make_input)
    plain = _run(lambda a, b: plain_torch(a, b, **kw), x_leaf, y, weight, make_input)
    ref = _run(
        lambda a, b: reference.kl_from_logits(a, b.double(), **kw), x_leaf.detach().double().requires_grad_(), y,
        weight, make_input,
    )  # fmt: skip
    assert ours[0].dtype == torch.float32 and ours[0].shape == lead
    assert ours[1].dtype == x_leaf.dtype
    atol = max(ATOL[x_leaf.dtype], ATOL[y.dtype])
    ulp = kl_ulps * torch.finfo(torch.float32).eps * ref[0].abs().max().item()
    what = f"{backend} {x_leaf.dtype}/{y.dtype} {direction}"
    assert_within_torch_error(ours[0], plain[0], ref[0], atol + ulp, what + " kl")
    assert_within_torch_error(
        ours[1], plain[1], ref[1], atol + ulp * max(1.0, weight.abs().max().item()), what + " grad"
    )
    assert (ours[0] >= 0).all()
    return ours


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (7, 1000), (2, 5, 333), (3, 4099), (2, 70001)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_reference(backend, dtypes, shape, direction):
    x = (torch.randn(shape, device=DEVICE) * 2).to(dtypes[0]).requires_grad_()
    y = (torch.randn(shape, device=DEVICE) * 2).to(dtypes[1])
    check_against_reference(backend, x, y, direction=direction)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_close_distributions(backend, direction, temperature):
    """The PPO regime: the policy is a small perturbation of the reference, KL ~ 1e-3."""
    y = torch.randn(8, 2000, device=DEVICE) * 3
    x = (y + 0.05 * torch.randn_like(y)).requires_grad_()
    kl, _ = check_against_reference(backend, x, y, temperature=temperature, direction=direction)
    assert (kl > 0).all() and (kl < 0.05).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_mask_with_holes(backend, direction):
    x = torch.randn(3, 11, 517, device=DEVICE, dtype=BF16).requires_grad_()
    y = torch.randn(3, 11, 517, device=DEVICE, dtype=BF16)
    mask = torch.rand(3, 11, device=DEVICE) > 0.4
    mask[0] = False
    kl, grad = check_against_reference(backend, x, y, mask=mask, direction=direction)
    assert (kl[~mask] == 0).all() and (kl[mask] > 0).all()
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any(-1).all()
    as_float = rlhf_kernels.kl_from_logits(x, y, mask=mask.float(), direction=direction, backend=backend)
    assert torch.equal(as_float, kl)  # a 0/1 mask of another dtype means the same


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_rows_masked(backend):
    x = torch.randn(4, 100, device=DEVICE, requires_grad=True)
    x.data[1, 3] = float("nan")  # masked rows are not read: no NaN either
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    kl = rlhf_kernels.kl_from_logits(x, torch.randn(4, 100, device=DEVICE), mask=mask, backend=backend)
    assert torch.equal(kl, torch.zeros(4, device=DEVICE))
    kl.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_inputs_give_exact_zero(backend, dtype, direction):
    x = (torch.randn(5, 3001, device=DEVICE) * 4).to(dtype).requires_grad_()
    kl = rlhf_kernels.kl_from_logits(x, x.detach().clone(), temperature=0.8, direction=direction, backend=backend)
    assert torch.equal(kl, torch.zeros(5, device=DEVICE))
    kl.sum().backward()
    if backend == "reference":  # autograd's p - p * sum(p) is not exactly 0
        assert x.grad.abs().max() < 1e-6
    else:
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_peaked_distributions_stay_finite(backend, direction):
    """One-hot-like rows (logit gaps of 1e4): p and q put all mass on different tokens, KL ~ 1e4 / T."""
    x = torch.randn(6, 700, device=DEVICE)
    y = torch.randn(6, 700, device=DEVICE)
    x[torch.arange(6), torch.arange(6) * 7] += 1e4
    y[torch.arange(6), torch.arange(6) * 7 + 1] += 1e4
    y[5] = x[5]  # and one row where both peak on the same token: KL ~ 0
    x.requires_grad_()
    # KL ~ 7.7e3, represented to 4.6e-4 in fp32: on a GPU (approximate exp2/log2) our errors were 1-2 ulps of it,
    # torch's 0.7; 4 ulps of the KL (times the largest upstream weight for the gradient) is the tolerance here
    kl, grad = check_against_reference(backend, x, y, temperature=1.3, direction=direction, kl_ulps=4)
    assert torch.isfinite(kl).all() and torch.isfinite(grad).all()
    assert (kl[:5] > 7000).all() and kl[5] < 1e-6


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [30.0, 300.0])
def test_large_logits_keep_fp32_precision(backend, offset):
    y = torch.randn(16, 4000, device=DEVICE) * 3 + offset
    x = (y + 0.3 * torch.randn_like(y) - 7.0).requires_grad_()  # a different offset for the policy
    check_against_reference(backend, x, y)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda t: t[:, :-1], id="shifted"),
        pytest.param(lambda t: t.transpose(0, 1), id="transposed"),
        pytest.param(lambda t: t[..., :300], id="row-padding"),
    ],
)
def test_non_contiguous_leading_dims(backend, view):
    x = torch.randn(3, 9, 301, device=DEVICE, dtype=BF16).requires_grad_()
    y = torch.randn(3, 9, 301, device=DEVICE)
    check_against_reference(backend, x, y, make_input=view)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_differently_laid_out_inputs(backend):
    """logits[:, :-1] is a (B, T-1) view while the reference is one contiguous run of rows: split differently."""
    x = torch.randn(3, 9, 301, device=DEVICE, requires_grad=True)
    y = torch.randn(3 * 8, 301, device=DEVICE)
    kl = rlhf_kernels.kl_from_logits(x[:, :-1], y.view(3, 8, 301), backend=backend)
    same = rlhf_kernels.kl_from_logits(x[:, :-1].contiguous(), y.view(3, 8, 301), backend=backend)
    assert torch.equal(kl, same)
    t = torch.randn(9, 3, 301, device=DEVICE)
    kl_t = rlhf_kernels.kl_from_logits(x, t.transpose(0, 1), backend=backend)  # ref strided, policy contiguous
    assert torch.equal(kl_t, rlhf_kernels.kl_from_logits(x, t.transpose(0, 1).contiguous(), backend=backend))
    x_nc = torch.randn(4, 600, device=DEVICE)[:, ::2]  # last dimension not contiguous: copied by the public API
    assert torch.equal(
        rlhf_kernels.kl_from_logits(x_nc, y[:4, :300], backend=backend),
        rlhf_kernels.kl_from_logits(x_nc.contiguous(), y[:4, :300], backend=backend),
    )


@pytest.mark.parametrize("backend", INVARIANT_BACKENDS)
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F16)], ids=["f32", "bf16-f16"])
def test_batch_invariance_bitwise(backend, dtypes):
    V = 5000
    x = (torch.randn(37, V, device=DEVICE) * 2).to(dtypes[0])
    y = (torch.randn(37, V, device=DEVICE) * 2).to(dtypes[1])
    g = torch.randn(37, device=DEVICE)

    def run(a, b, w):
        a = a.detach().requires_grad_()
        kl = rlhf_kernels.kl_from_logits(a, b, backend=backend)
        (kl * w).sum().backward()
        return kl.detach(), a.grad

    full = run(x, y, g)
    for i in (0, 5, 36):
        alone = run(x[i : i + 1], y[i : i + 1], g[i : i + 1])
        assert torch.equal(alone[0][0], full[0][i]) and torch.equal(alone[1][0], full[1][i])
    perm = torch.randperm(37, device=DEVICE)
    big = torch.randn(2, 40, V + 3, device=DEVICE).to(dtypes[0])
    big[1, :37, 1 : V + 1] = x[perm]
    kl3 = rlhf_kernels.kl_from_logits(big[1:, :37, 1 : V + 1], y[perm][None], backend=backend)
    assert torch.equal(kl3[0], full[0][perm])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "dtypes,V",
    [((BF16, BF16), 2 * 8192 + 80), ((BF16, BF16), 8195), ((F32, BF16), 3 * 4096 + 4)],
    ids=["bf16", "bf16-odd", "f32-bf16"],
)
def test_layout_never_changes_bits_over_several_blocks(backend, dtypes, V):
    """Rows longer than a block read with vector loads (bf16 as 32-bit words) or element by element (rows at an
    odd offset): the same bits."""
    x = (torch.randn(3, V, device=DEVICE) * 3).to(dtypes[0])
    y = (torch.randn(3, V, device=DEVICE) * 3).to(dtypes[1])
    y[1, ::7] += 15.0
    full = rlhf_kernels.kl_from_logits(x, y, backend=backend)
    px = torch.zeros(3, V + 3, device=DEVICE, dtype=dtypes[0])
    py = torch.zeros(3, V + 1, device=DEVICE, dtype=dtypes[1])
    px[:, 1 : V + 1], py[:, 1:] = x, y
    assert torch.equal(full, rlhf_kernels.kl_from_logits(px[:, 1 : V + 1], py[:, 1:], backend=backend))
    assert torch.equal(full[1:2], rlhf_kernels.kl_from_logits(x[1:2], y[1:2], backend=backend))
    assert (full - reference.kl_from_logits(x.double(), y.double())).abs().max() < 1e-3


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize(
    "dtypes,V",
    [
        ((F32, F32), 3 * 4096),  # segments of 2 blocks: [0, 1], [2]; no masked block
        ((F32, F32), 4 * 4096 + 1),  # the last segment is the masked one-element block alone
        ((F32, F32), 9 * 4096 + 77),  # 5 segments, the last one full + masked
        ((BF16, BF16), 2 * 8192 + 80),  # 32-bit word loads (packed rows)
        ((BF16, F32), 2 * 4096 + 80),  # mixed dtypes: fp32 blocks (the larger element) for both rows
    ],
    ids=["f32-3blocks", "f32-tail-alone", "f32-5segments", "bf16", "bf16-f32"],
)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_split_rows_equal_one_program_bitwise(monkeypatch, dtypes, V, inplace, direction):
    """Small batches split each row pair over programs (one per segment) and merge the segments in a second
    kernel; every output (kl and the four statistics) is bitwise the one-program kernel's, for masked and
    non-finite rows too, so a row's bits never depend on the batch size."""
    from rlhf_kernels.ops import logprobs as lp_module

    assert lp_module.seg_blocks(V, max(t.itemsize for t in dtypes)) == 2
    x = (torch.randn(2, 4, V + 1, device=DEVICE) * 3).to(dtypes[0])
    y = (torch.randn(2, 4, V + 1, device=DEVICE) * 3).to(dtypes[1])
    x[0, 1, ::9] += 25.0  # maxima in different segments per group
    y[0, 1, 4::11] += 20.0
    y[1, 0, 1:] = x[1, 0, :-1].to(dtypes[1])  # the same row in both (as read below): KL exactly 0
    x[0, 3, 7] = float("nan")  # masked out: not read
    x[1, 2, 5] = float("inf")
    y[0, 2, V - 3] = float("nan")  # in the last segment
    # in place: the policy at offset 0 and the reference at offset 1 of rows of V + 1 (odd strides)
    logits = x[:, :, :-1] if inplace else x[:, :, :-1].contiguous()
    ref_logits = y[:, :, 1:] if inplace else y[:, :, 1:].contiguous()
    mask = torch.ones(8, dtype=torch.bool, device=DEVICE)
    mask[3] = False
    reverse = direction == "reverse"
    outs = {}
    for force in (False, True):
        monkeypatch.setattr(lp_module, "FORCE_SPLIT", force)
        outs[force] = torch.ops.rlhf_kernels.kl_fwd(logits, ref_logits, mask, 1 / 0.9, reverse, "triton")
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())
    kl = outs[True][0]
    assert all((out[3] == 0).all() for out in outs[True])  # the masked row: every output 0
    assert kl[[2, 6]].isnan().all() and kl[4] == 0
    ok = torch.ones(8, dtype=torch.bool, device=DEVICE)
    ok[[2, 3, 6]] = False
    ref = torch.ops.rlhf_kernels.kl_fwd(logits.double(), ref_logits.double(), mask, 1 / 0.9, reverse, "reference")
    for ours, exact in zip(outs[True], ref):
        assert (ours - exact)[ok].abs().max() < 1e-3


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
def test_split_rule_shared_with_logprobs(monkeypatch):
    """The KL forward splits by the log-prob forward's rule and switch (rlhf_kernels.ops.logprobs.split_rows,
    FORCE_SPLIT), with segments from V and the larger element size; one-segment rows never split."""
    from rlhf_kernels.ops import kl as kl_module
    from rlhf_kernels.ops import logprobs as lp_module

    assert kl_module.split_rows is lp_module.split_rows
    seen = []

    def spy(n_rows, n_seg, device):
        seen.append((n_rows, n_seg))
        return lp_module.split_rows(n_rows, n_seg, device)

    monkeypatch.setattr(kl_module, "split_rows", spy)
    monkeypatch.setattr(lp_module, "FORCE_SPLIT", True)
    for dtypes, V, n_seg in [((BF16, BF16), 70_001, 5), ((BF16, F32), 70_001, 9), ((F32, F32), 5003, 1)]:
        x = torch.randn(1, 2, V, device=DEVICE).to(dtypes[0])
        y = torch.randn(1, 2, V, device=DEVICE).to(dtypes[1])
        kl = torch.ops.rlhf_kernels.kl_fwd(x, y, None, 1.0, True, "triton")[0]
        assert seen[-1] == (2, n_seg)  # 9 bf16 blocks of 8192 / 18 fp32 blocks of 4096 in segments of 2
        assert (kl - reference.kl_from_logits(x.double(), y.double())).abs().max() < 1e-3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_rows_are_nan_and_isolated(backend):
    x = torch.randn(7, 300, device=DEVICE)
    y = torch.randn(7, 300, device=DEVICE)
    x[1, 10] = float("nan")
    y[2, 0] = float("inf")
    y[3, 299] = float("-inf")  # finite policy, -inf reference: would be +inf without the explicit rule
    x[4, 5] = float("-inf")
    y[5, :] = float("-inf")
    for direction in DIRECTIONS:
        kl = rlhf_kernels.kl_from_logits(x, y, direction=direction, backend=backend)
        assert torch.isnan(kl[1:6]).all(), kl
        clean = rlhf_kernels.kl_from_logits(x[[0, 6]], y[[0, 6]], direction=direction, backend=backend)
        assert torch.equal(kl[[0, 6]], clean) and torch.isfinite(clean).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_input(backend):
    x = torch.randn(0, 7, 11, device=DEVICE, requires_grad=True)
    kl = rlhf_kernels.kl_from_logits(x, torch.randn(0, 7, 11, device=DEVICE), backend=backend)
    assert kl.shape == (0, 7)
    kl.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hand_computed(backend):
    # p = softmax(0, ln 3) = (1/4, 3/4), q = softmax(0, 0) = (1/2, 1/2).
    # KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120
    # KL(q||p) = 1/2 ln 2 + 1/2 ln(2/3) = 0.3465736 - 0.2027326 = 0.1438410
    # reverse gradient p_v (ln(p_v/q_v) - KL): 1/4 (-0.6931472 - 0.1308120) = -0.2059898, and +0.2059898
    # forward gradient p - q = (-1/4, 1/4). At T = 2 the logits (0, 2 ln 3) give the same p; gradients halve.
    ln3 = math.log(3.0)
    cases = (
        ("reverse", 0.1308120, [-0.2059898, 0.2059898]),
        ("forward", 0.1438410, [-0.25, 0.25]),
    )
    inputs = (([0.0, ln3], [5.0, 5.0], 1.0, 1.0), ([0.0, 2 * ln3], [0.0, 0.0], 2.0, 0.5))
    for direction, value, grad in cases:
        for logits, ref_logits, temperature, scale in inputs:
            x = torch.tensor([logits], device=DEVICE, requires_grad=True)
            y = torch.tensor([ref_logits], device=DEVICE)
            kl = rlhf_kernels.kl_from_logits(x, y, temperature=temperature, direction=direction, backend=backend)
            assert kl.item() == pytest.approx(value, abs=1e-6)
            kl.sum().backward()
            assert x.grad[0].tolist() == pytest.approx([g * scale for g in grad], abs=1e-6)


def test_bad_inputs():
    x = torch.randn(4, 10, device=DEVICE)
    y = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="same vocabulary size"):
        rlhf_kernels.kl_from_logits(x, torch.randn(4, 11, device=DEVICE))
    with pytest.raises(ValueError, match="same leading shape"):
        rlhf_kernels.kl_from_logits(x, torch.randn(2, 2, 10, device=DEVICE))
    with pytest.raises(TypeError, match="ref_logits must be float32, bfloat16 or float16"):
        rlhf_kernels.kl_from_logits(x, y.long())
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        rlhf_kernels.kl_from_logits(x.int(), y)
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            rlhf_kernels.kl_from_logits(x, y, temperature=t)
    with pytest.raises(ValueError, match="unknown KL direction 'both'; valid directions are reverse, forward"):
        rlhf_kernels.kl_from_logits(x, y, direction="both")
    with pytest.raises(ValueError, match="mask shape"):
        rlhf_kernels.kl_from_logits(x, y, mask=torch.ones(5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="V >= 1"):
        rlhf_kernels.kl_from_logits(torch.randn(4, 0), torch.randn(4, 0))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_low_level_ops_check_layout(backend):
    x = torch.randn(1, 4, 600, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        torch.ops.rlhf_kernels.kl_fwd(x[..., ::2], x[..., :300], None, 1.0, True, backend)
    with pytest.raises((ValueError, RuntimeError), match="mask"):
        torch.ops.rlhf_kernels.kl_fwd(x, x, torch.ones(3, dtype=torch.bool, device=DEVICE), 1.0, True, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(logits, ref_logits, mask):
        kl = rlhf_kernels.kl_from_logits(logits, ref_logits, mask=mask, temperature=0.9, backend=backend)
        return (kl * 3).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    x = torch.randn(3, 5, 301, device=DEVICE, requires_grad=True)
    y = torch.randn(3, 5, 301, device=DEVICE, dtype=BF16)
    mask = torch.rand(3, 5, device=DEVICE) > 0.3
    loss = compiled(x, y, mask)
    loss.backward()
    g = x.grad.clone()
    x.grad = None
    eager = step(x, y, mask)
    eager.backward()
    assert torch.allclose(loss, eager) and torch.allclose(g, x.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("N,V", [(4096, 131072), (1024, 256000), (32768, 32000)])
def test_gpu_large_vocab(backend, N, V):
    x = (torch.randn(N, V, device="cuda") * 2).to(BF16).requires_grad_()
    y = (torch.randn(N, V, device="cuda") * 2).to(BF16)
    check_against_reference(backend, x, y)


# ---------------------------------------------------------------------------------------------------------
# The sampled-token estimators
# ---------------------------------------------------------------------------------------------------------


def test_kl_penalty_hand_computed():
    # delta = log pi - log pi_ref = (0.5, -1, 0); k3 uses d = -delta = (-0.5, 1, 0):
    # e^-0.5 + 0.5 - 1 = 0.6065307 - 0.5 = 0.1065307;  e^1 - 1 - 1 = 0.7182818;  0
    lp = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -2.0])
    expect = {
        "k1": [0.5, -1.0, 0.0],
        "abs": [0.5, 1.0, 0.0],
        "k2": [0.125, 0.5, 0.0],
        "k3": [0.1065307, 0.7182818, 0.0],
    }
    for kind, values in expect.items():
        out = rlhf_kernels.kl_penalty(lp, ref, kind)
        assert out.dtype == torch.float32 and out.shape == lp.shape
        assert out.tolist() == pytest.approx(values, abs=1e-6), kind
    # gradients with respect to log pi: k1 -> 1, k2 -> delta, k3 -> 1 - e^d = (1 - 0.6065307, 1 - e, 0)
    (g,) = torch.autograd.grad(rlhf_kernels.kl_penalty(lp, ref, "k3").sum(), lp)
    assert g.tolist() == pytest.approx([0.3934693, 1 - math.e, 0.0], abs=1e-6)
    (g,) = torch.autograd.grad(rlhf_kernels.kl_penalty(lp, ref, "k2").sum(), lp)
    assert g.tolist() == pytest.approx([0.5, -1.0, 0.0])


def test_kl_penalty_k3_clamps_keep_bf16_finite():
    lp = torch.tensor([-40.0, 0.0, -1e-4, -0.1], dtype=BF16)
    ref = torch.tensor([0.0, -40.0, 0.0, -0.1], dtype=BF16)
    out = rlhf_kernels.kl_penalty(lp, ref, "k3")
    # d = 40 -> clamped to 20 -> e^20 - 21 ~ 4.9e8 -> clamped to 10; d = -40 -> -20 -> e^-20 + 19 -> 10 as well
    assert out[0].item() == 10.0 and out[1].item() == 10.0
    assert torch.isfinite(out).all() and out[3].item() == 0.0
    assert out[2].item() == pytest.approx(0.5e-8, rel=0.05)  # expm1 keeps the tiny value (bf16 input, fp32 math)
    assert out.dtype == torch.float32


def test_kl_penalty_bad_inputs_and_frozen_reference():
    lp = torch.randn(3, requires_grad=True)
    ref = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4' for the sampled tokens; valid ones are k1, abs"):
        rlhf_kernels.kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="same shape"):
        rlhf_kernels.kl_penalty(lp, ref[:2])
    with pytest.raises(TypeError, match="floating-point"):
        rlhf_kernels.kl_penalty(lp, torch.zeros(3, dtype=torch.long))
    rlhf_kernels.kl_penalty(lp, ref, "k3").sum().backward()
    assert lp.grad is not None and ref.grad is None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_sampled_estimators_approach_exact_kl(backend, direction):
    """Monte Carlo: over tokens drawn from the weighting distribution, mean(k1) and mean(k3) estimate the exact
    KL (both are unbiased). 400k samples per row; the tolerance is 4 standard errors of each estimate."""
    gen = torch.Generator(device=DEVICE).manual_seed(1234)
    V, n = 64, 400_000
    x = torch.randn(3, V, generator=gen, device=DEVICE)
    y = x + 0.7 * torch.randn(3, V, generator=gen, device=DEVICE)
    exact = rlhf_kernels.kl_from_logits(x, y, direction=direction, backend=backend)
    logp, logq = torch.log_softmax(x.double(), -1), torch.log_softmax(y.double(), -1)
    if direction == "forward":  # KL(q || p): sample from q and swap the roles of the two log-prob sets
        logp, logq = logq, logp
    tokens = torch.multinomial(logp.exp(), n, replacement=True, generator=gen)  # (3, n)
    delta_lp, delta_ref = logp.gather(1, tokens), logq.gather(1, tokens)
    for kind in ("k1", "k3"):
        est = rlhf_kernels.kl_penalty(delta_lp, delta_ref, kind)
        mean, se = est.mean(1), est.std(1) / math.sqrt(n)
        assert (se < 2e-3).all()  # the test is sharp: 4 SE is far below the KL itself (~0.2)
        assert ((mean - exact.double()).abs() <= 4 * se).all(), (kind, mean, exact, se)
    assert (exact > 0.1).all()
