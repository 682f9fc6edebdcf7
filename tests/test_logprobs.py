"""rlhf_kernels.logprobs / entropy against the fp64 reference, for every backend available here."""

import pytest
import torch
from conftest import ALL_BACKENDS, DEVICE, INVARIANT_BACKENDS, KERNEL_BACKENDS, assert_within_torch_error

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops.logprobs import packed_rows, row_tile

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def plain_torch(x, y, temperature=1.0, ignore_index=-100):
    """What users write, computed in the dtype of x: the baseline whose error bounds ours."""
    logp = torch.log_softmax(x / temperature, dim=-1)
    ignored = y == ignore_index
    lp = logp.gather(-1, y.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp.masked_fill(ignored, 0), ent.masked_fill(ignored, 0)


def _grads(fn, x_leaf, make_input, w_lp, w_ent):
    x_leaf.grad = None
    lp, ent = fn(make_input(x_leaf))
    ((lp.float() * w_lp).sum() + (ent.float() * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), x_leaf.grad.detach().clone()


def check_against_reference(backend, x_leaf, y, temperature=1.0, make_input=lambda x: x, ignore_index=-100):
    """Forward of both outputs and the gradient of a random mix of both, ours vs plain torch vs fp64."""
    lead = y.shape
    w_lp, w_ent = torch.randn(lead, device=y.device), torch.randn(lead, device=y.device)
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    ours = _grads(
        lambda x: rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend, **kw), x_leaf, make_input,
        w_lp, w_ent,
    )  # fmt: skip
    plain = _grads(lambda x: plain_torch(x, y, **kw), x_leaf, make_input, w_lp, w_ent)
    x64 = x_leaf.detach().double().requires_grad_()
    ref = _grads(lambda x: reference.logprobs(x, y, **kw), x64, make_input, w_lp, w_ent)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == x_leaf.dtype
    assert ours[0].shape == lead and ours[1].shape == lead
    atol = ATOL[x_leaf.dtype]
    for i, what in enumerate(("logprobs", "entropy", "grad")):
        assert_within_torch_error(ours[i], plain[i], ref[i], atol, f"{backend} {x_leaf.dtype} {what}")
    return ours


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (7, 1000), (2, 5, 333), (3, 4096), (2, 70000)])
def test_matches_reference(backend, dtype, shape):
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, shape[-1], shape[:-1], device=DEVICE)
    check_against_reference(backend, x, y)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_and_int32_labels(backend, temperature):
    x = (torch.randn(6, 513, device=DEVICE) * 4).requires_grad_()
    y = torch.randint(0, 513, (6,), device=DEVICE, dtype=torch.int32)
    check_against_reference(backend, x, y, temperature=temperature)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda x: x[:, :-1], id="shifted"),  # (B, T-1, V) with strides (T*V, V, 1)
        pytest.param(lambda x: x.transpose(0, 1), id="transposed"),
        pytest.param(lambda x: x[:, 1::2], id="strided"),
        pytest.param(lambda x: x[..., :300], id="row-padding"),  # row stride 301 > V: unaligned rows
    ],
)
def test_non_contiguous_leading_dims(backend, view):
    x = torch.randn(3, 9, 301, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    vx = view(x.detach())
    y = torch.randint(0, vx.shape[-1], vx.shape[:-1], device=DEVICE)
    y[0, 0] = -100
    check_against_reference(backend, x, y, make_input=view)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_last_dim_is_copied(backend):
    x = torch.randn(4, 600, device=DEVICE)
    y = torch.randint(0, 300, (4,), device=DEVICE)
    got = rlhf_kernels.logprobs(x[:, ::2], y, backend=backend)
    assert torch.equal(got, rlhf_kernels.logprobs(x[:, ::2].contiguous(), y, backend=backend))
    one = rlhf_kernels.logprobs(x[:, :2][:, ::2], y * 0, return_entropy=True, backend=backend)  # V = 1, stride 2
    assert torch.equal(one[0], torch.zeros(4, device=DEVICE)) and torch.equal(one[1], torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_low_level_op_rejects_non_unit_last_stride(backend):
    x = torch.randn(1, 4, 600, device=DEVICE)[..., ::2]
    y = torch.zeros(1, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        torch.ops.rlhf_kernels.logprobs_fwd(x, y, 1.0, -100, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_rows(backend, dtype):
    x = torch.randn(2, 8, 257, device=DEVICE).to(dtype).requires_grad_()
    y = torch.randint(0, 257, (2, 8), device=DEVICE)
    y[0, 3:] = -100
    y[1, 0] = -100
    lp, ent, grad = check_against_reference(backend, x, y)
    ignored = y == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any(dim=-1).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_rows_ignored_and_custom_ignore_index(backend):
    x = torch.randn(5, 100, device=DEVICE, requires_grad=True)
    y = torch.full((5,), 7, device=DEVICE)
    lp, ent = rlhf_kernels.logprobs(x, y, ignore_index=7, return_entropy=True, backend=backend)
    assert torch.equal(lp, torch.zeros(5, device=DEVICE)) and torch.equal(ent, torch.zeros(5, device=DEVICE))
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", INVARIANT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance_bitwise(backend, dtype):
    """A row's outputs and gradient are bitwise identical whatever the batch around it and its shape."""
    V = 5000
    batch = (torch.randn(37, V, device=DEVICE) * 2).to(dtype)
    y = torch.randint(0, V, (37,), device=DEVICE)
    g_lp, g_ent = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE)

    def run(x, lab, glp, gent):
        x = x.detach().requires_grad_()
        lp, ent = rlhf_kernels.logprobs(x, lab, return_entropy=True, backend=backend)
        ((lp * glp).sum() + (ent * gent).sum()).backward()
        return lp.detach(), ent.detach(), x.grad

    full = run(batch, y, g_lp, g_ent)
    for i in (0, 5, 36):
        alone = run(batch[i : i + 1], y[i : i + 1], g_lp[i : i + 1], g_ent[i : i + 1])
        for a, b in zip(alone, full):
            assert torch.equal(a[0], b[i])
    # Same rows as a (B, T, V) tensor, reordered, inside a larger padded layout.
    perm = torch.randperm(37, device=DEVICE)
    big = torch.randn(2, 40, V + 3, device=DEVICE).to(dtype)
    big[1, :37, 1 : V + 1] = batch[perm]
    lp3 = rlhf_kernels.logprobs(big[1:, :37, 1 : V + 1], y[perm][None], backend=backend)
    assert torch.equal(lp3[0], full[0][perm])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "dtype,V",
    [(torch.bfloat16, 2 * 8192 + 80), (torch.bfloat16, 8193), (torch.float32, 3 * 4096 + 4), (torch.float32, 4101)],
)
def test_layout_never_changes_bits_over_several_blocks(backend, dtype, V):
    """Rows longer than a block read with vector loads (V * element size a multiple of 16; bf16 as 32-bit words)
    or element by element (rows at an odd offset): the same bits, and the same as the row alone."""
    x = (torch.randn(3, V, device=DEVICE) * 3).to(dtype)
    x[1, ::5] += 20.0  # the maxima move from block to block
    y = torch.randint(0, V, (3,), device=DEVICE)
    full = rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend)
    padded = torch.zeros(3, V + 3, device=DEVICE, dtype=dtype)
    padded[:, 1 : V + 1] = x  # rows at an odd element offset and odd stride
    shifted = rlhf_kernels.logprobs(padded[:, 1 : V + 1], y, return_entropy=True, backend=backend)
    vec = row_tile(V, x.element_size())[0]["VEC"]
    assert packed_rows(x[None], vec) == (dtype == torch.bfloat16 and vec > 1)
    assert not packed_rows(padded[None, :, 1 : V + 1], vec)
    alone = rlhf_kernels.logprobs(x[2:], y[2:], return_entropy=True, backend=backend)
    for a, b in zip(full, shifted):
        assert torch.equal(a, b)
    assert torch.equal(full[0][2:], alone[0]) and torch.equal(full[1][2:], alone[1])
    ref = reference.logprobs(x.double(), y)[0]
    assert (full[0] - ref).abs().max() < 1e-3


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize(
    "dtype,V",
    [
        (torch.float32, 3 * 4096),  # segments of 2 blocks: [0, 1], [2]; no masked block
        (torch.float32, 4 * 4096 + 1),  # the last segment is the masked one-element block alone
        (torch.float32, 9 * 4096 + 77),  # 5 segments, the last one full + masked
        (torch.bfloat16, 2 * 8192 + 80),  # 32-bit word loads (packed rows)
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_split_rows_equal_one_program_bitwise(monkeypatch, dtype, V, inplace):
    """Small batches split each row over programs (one per segment) and merge the segments in a second kernel;
    every output is bitwise the one-program kernel's (so a row's bits never depend on the batch size), and
    ignored and non-finite rows behave the same."""
    from rlhf_kernels.ops import logprobs as lp_module

    assert lp_module.seg_blocks(V, torch.tensor([], dtype=dtype).element_size()) == 2
    x = (torch.randn(2, 4, V + 1, device=DEVICE) * 3).to(dtype)
    x[0, 1, ::9] += 25.0  # maxima in different segments per group
    x[1, 2, 5] = float("inf")
    logits = x[:, :, :-1] if inplace else x[:, :, :-1].contiguous()
    y = torch.randint(0, V, (2, 4), device=DEVICE)
    y[0, 3] = -100
    y[1, 0] = V + 3  # out of range: NaN log-prob
    outs = {}
    for force in (False, True):
        monkeypatch.setattr(lp_module, "FORCE_SPLIT", force)
        outs[force] = torch.ops.rlhf_kernels.logprobs_fwd(logits, y, 1 / 0.9, -100, "triton")
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and torch.equal(a.isnan(), b.isnan())
    lp, ent, _, _ = outs[True]
    assert lp[0, 3] == 0 and ent[0, 3] == 0 and lp[1, 0].isnan() and lp[1, 2].isnan() and ent[1, 2].isnan()
    ok = torch.ones_like(y, dtype=torch.bool)
    ok[0, 3] = ok[1, 0] = ok[1, 2] = False
    ref_lp, ref_ent = reference.logprobs(logits.double(), y.clamp(max=V - 1), 0.9)
    assert (lp - ref_lp)[ok].abs().max() < 1e-3 and (ent - ref_ent)[ok].abs().max() < 1e-3


def test_split_rule():
    """The split path is taken for fewer rows than twice the SM count on CUDA, and only for rows of >= 2
    segments; never on CPU tensors unless forced."""
    from rlhf_kernels.ops import logprobs as lp_module

    cuda = torch.device("cuda")
    orig = lp_module._sm_count
    try:
        lp_module._sm_count = lambda device: 132
        assert lp_module.split_rows(263, 2, cuda) and not lp_module.split_rows(264, 2, cuda)
        assert not lp_module.split_rows(1, 1, cuda)
        assert not lp_module.split_rows(1, 8, torch.device("cpu"))
    finally:
        lp_module._sm_count = orig
    # at most 16 segments, each of >= 2 blocks, from V and the dtype only
    assert lp_module.seg_blocks(256000, 2) == 2 and lp_module.seg_blocks(1_000_000, 2) == 8  # 32, 123 blocks
    assert lp_module.seg_blocks(600_000, 2) == 8  # 74 blocks: 5 per segment rounded up to a power of two
    assert lp_module.seg_blocks(100, 4) == 2


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_rows_are_nan_and_isolated(backend):
    x = torch.randn(6, 300, device=DEVICE)
    x[1, 10] = float("nan")
    x[2, 0] = float("inf")
    x[3, 299] = float("-inf")
    x[4, :] = float("-inf")
    y = torch.randint(0, 300, (6,), device=DEVICE)
    lp, ent = rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend)
    assert torch.isnan(lp[1:5]).all() and torch.isnan(ent[1:5]).all()
    clean = rlhf_kernels.logprobs(x[[0, 5]], y[[0, 5]], return_entropy=True, backend=backend)
    assert torch.equal(lp[[0, 5]], clean[0]) and torch.equal(ent[[0, 5]], clean[1])
    assert torch.isfinite(clean[0]).all() and torch.isfinite(clean[1]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unchecked_bad_label_gives_nan_not_a_crash(backend):
    x = torch.randn(3, 50, device=DEVICE)
    y = torch.tensor([1, 50, -3], device=DEVICE)
    lp = rlhf_kernels.logprobs(x, y, check=False, backend=backend)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1:]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_input(backend):
    x = torch.randn(0, 7, 11, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, 7, dtype=torch.int64, device=DEVICE)
    lp, ent = rlhf_kernels.logprobs(x, y, return_entropy=True, backend=backend)
    assert lp.shape == (0, 7) and ent.shape == (0, 7)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_alone(backend, dtype):
    x = (torch.randn(4, 3, 777, device=DEVICE) * 2).to(dtype).requires_grad_()
    ent = rlhf_kernels.entropy(x, temperature=0.9, backend=backend)
    ent.sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref = reference.entropy(x64, temperature=0.9)
    ref.sum().backward()
    plain_x = x.detach().requires_grad_()
    plain = plain_torch(plain_x, torch.zeros(4, 3, dtype=torch.long, device=DEVICE), 0.9)[1]
    plain.sum().backward()
    assert_within_torch_error(ent, plain, ref, ATOL[dtype], "entropy")
    assert_within_torch_error(x.grad, plain_x.grad, x64.grad, ATOL[dtype], "entropy grad")


def test_bad_inputs():
    x = torch.randn(4, 10, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        rlhf_kernels.logprobs(x, torch.tensor([0, 10, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="labels must lie"):
        rlhf_kernels.logprobs(x, torch.tensor([0, -1, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="does not match"):
        rlhf_kernels.logprobs(x, y[:3])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rlhf_kernels.logprobs(x.long(), y)
    with pytest.raises(TypeError, match="int64 or int32"):
        rlhf_kernels.logprobs(x, y.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        rlhf_kernels.logprobs(x.tolist(), y)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            rlhf_kernels.logprobs(x, y, temperature=t)
        with pytest.raises(ValueError, match="temperature"):
            rlhf_kernels.entropy(x, temperature=t)
    with pytest.raises(ValueError, match="V >= 1"):
        rlhf_kernels.logprobs(torch.randn(4, 0, device=DEVICE), y)
    with pytest.raises(ValueError, match="unknown backend"):
        rlhf_kernels.logprobs(x, y, backend="fortran")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rlhf_kernels.entropy(x.int())


def test_backend_selection(monkeypatch):
    assert "reference" in rlhf_kernels.available_backends()
    assert set(rlhf_kernels.backend_status()) == set(rlhf_kernels.BACKENDS)
    x = torch.randn(2, 10, device=DEVICE)
    y = torch.zeros(2, dtype=torch.long, device=DEVICE)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        rlhf_kernels.logprobs(x, y)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    assert torch.allclose(rlhf_kernels.logprobs(x, y), rlhf_kernels.logprobs(x, y, backend="reference"))
    # the variable applies to the tensors its backend serves: CPU tensors keep their default under "cuda"
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    x_cpu, y_cpu = x.cpu(), y.cpu()
    cpu_default = rlhf_kernels.available_backends("cpu")[0]  # cpu, or reference without the extension
    assert torch.equal(rlhf_kernels.logprobs(x_cpu, y_cpu), rlhf_kernels.logprobs(x_cpu, y_cpu, backend=cpu_default))
    if DEVICE.type == "cpu":
        monkeypatch.delenv("RLHF_KERNELS_BACKEND")
        with pytest.raises(ValueError, match="cannot run on cpu"):
            rlhf_kernels.logprobs(x, y, backend="cuda")  # backend= is never overridden


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(logits, labels):
        lp, ent = rlhf_kernels.logprobs(logits, labels, return_entropy=True, temperature=0.8, backend=backend)
        return (lp * 2).sum() - 0.01 * ent.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    x = torch.randn(3, 5, 301, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 301, (3, 5), device=DEVICE)
    loss = compiled(x, y)
    loss.backward()
    g = x.grad.clone()
    x.grad = None
    eager = step(x, y)
    eager.backward()
    assert torch.allclose(loss, eager) and torch.allclose(g, x.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("N,V", [(4096, 131072), (1024, 256000), (32768, 32000)])
def test_gpu_large_vocab(backend, N, V):
    x = (torch.randn(N, V, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    check_against_reference(backend, x, y)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hand_computed(backend):
    # Row 0: logits (0, ln 3), T = 1 -> p = (1/4, 3/4). Row 1: logits (0, 2 ln 3) at T = 2 is the same distribution.
    # log p(label=1) = ln(3/4) = -0.2876821; entropy = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.3465736 + 0.2157616 = 0.5623351
    # d logp / dz = onehot - p = (-1/4, 1/4); d/dlogits divides by T: row 1 gives (-1/8, 1/8).
    ln3 = torch.log(torch.tensor(3.0)).item()
    for logits, temperature, grad in (([0.0, ln3], 1.0, [-0.25, 0.25]), ([0.0, 2 * ln3], 2.0, [-0.125, 0.125])):
        x = torch.tensor([logits], device=DEVICE, requires_grad=True)
        y = torch.tensor([1], device=DEVICE)
        lp, ent = rlhf_kernels.logprobs(x, y, temperature=temperature, return_entropy=True, backend=backend)
        assert lp.item() == pytest.approx(-0.2876821, abs=1e-6)
        assert ent.item() == pytest.approx(0.5623351, abs=1e-6)
        lp.sum().backward()
        assert x.grad[0].tolist() == pytest.approx(grad, abs=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [30.0, 300.0])
def test_large_logits_keep_fp32_precision(backend, offset):
    """Softmax ignores a constant offset; the log-sum-exp (~offset) must not cost ulp(offset) of precision."""
    x = (torch.randn(16, 4000, device=DEVICE) * 3 + offset).requires_grad_()
    y = torch.randint(0, 4000, (16,), device=DEVICE)
    ours, plain, ref = (
        _grads(fn, leaf, lambda t: t, torch.ones(16, device=DEVICE), torch.ones(16, device=DEVICE))
        for fn, leaf in (
            (lambda t: rlhf_kernels.logprobs(t, y, return_entropy=True, backend=backend), x),
            (lambda t: plain_torch(t, y), x),
            (lambda t: reference.logprobs(t, y), x.detach().double().requires_grad_()),
        )
    )
    for i, what in enumerate(("logprobs", "entropy", "grad")):
        assert_within_torch_error(ours[i], plain[i], ref[i], 1e-6, f"{backend} offset {offset} {what}")
