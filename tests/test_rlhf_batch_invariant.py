"""Batch-invariant attention (rlhf.batch_invariant): cached decoding equals one full forward bit for bit, with
left padding, grouped-query attention and boolean masks; the same numbers as the usual attention up to rounding;
and the row-invariance of the CPU GEMMs that the mode relies on."""

import pytest
import torch
import torch.nn.functional as F

from rlhf import batch_invariant
from rlhf.models import load_causal_lm, load_tokenizer, position_ids_from_mask

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="bitwise equality is claimed for the CPU GEMMs (module docstring)"
)


def _model(**overrides):
    from rlhf.tiny import tiny_llama

    tok = load_tokenizer("builtin")
    kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4) | overrides  # fmt: skip
    model = tiny_llama(tok, seed=0, **kw).eval()
    return model


def _left_padded(lengths: list[int], P: int, R: int, seed: int = 0):
    """Prompts of ``lengths`` left-padded to ``P``, each followed by ``R`` tokens: ``(ids, mask) (B, P + R)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (len(lengths), P + R), generator=g)
    mask = torch.ones(len(lengths), P + R, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, : P - n] = 0
        ids[b, : P - n] = 0
    return ids, mask


def _decode_vs_full(model, ids, mask, P):
    """Logits of positions P-1 .. T-2 by cached decoding (prefill P, then one token at a time) and by one forward."""
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1 : -1]
        out = model(input_ids=ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], use_cache=True)
        cache, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(P, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                        past_key_values=cache, use_cache=True)  # fmt: skip
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), full


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_decoding_equals_the_full_forward_bitwise(kv_heads):
    model = _model(num_key_value_heads=kv_heads)
    batch_invariant.enable(model)
    ids, mask = _left_padded([5, 12, 9, 12, 3, 7, 12, 10], P=12, R=40)  # 40 decoded tokens: several key blocks
    dec, full = _decode_vs_full(model, ids, mask, P=12)
    assert torch.equal(dec, full)


def test_same_numbers_as_the_usual_attention():
    model = _model()
    ids, mask = _left_padded([6, 9, 9, 2], P=9, R=20)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        usual = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        batch_invariant.enable(model)
        ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], usual[keep], rtol=1e-5, atol=1e-5)


def test_boolean_mask_and_no_mask_agree_with_the_additive_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    allowed = torch.rand(2, 1, 9, 40) < 0.7
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = torch.nn.Module().eval()
    a, _ = batch_invariant.attention(module, q, k, v, additive)
    b, _ = batch_invariant.attention(module, q, k, v, allowed)
    assert torch.equal(a, b)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)
    c, _ = batch_invariant.attention(module, q, k, v, None)
    torch.testing.assert_close(c, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_unsupported_options_are_named():
    module = torch.nn.Module().eval()
    q = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="does not support sliding_window"):
        batch_invariant.attention(module, q, q, q, None, sliding_window=4)
    module.train()
    with pytest.raises(ValueError, match="no attention dropout"):
        batch_invariant.attention(module, q, q, q, None, dropout=0.1)


@pytest.mark.parametrize("shape", [(256, 768), (64, 176), (64, 2000)])
def test_cpu_gemm_rows_do_not_depend_on_the_row_count(shape):
    """What the mode relies on: from MIN_QUERIES rows on, a row of ``x @ w.T`` is the same whatever other rows are
    computed with it (one or two rows may take another code path: that is why short calls are padded)."""
    K, N = shape
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(96, K, generator=g), torch.randn(N, K, generator=g)
    full = F.linear(x, w)
    for rows in (batch_invariant.MIN_QUERIES, 13, 32):
        parts = torch.cat([F.linear(x[i : i + rows], w) for i in range(0, 96 - rows + 1, rows)])
        assert torch.equal(parts, full[: parts.shape[0]])


def test_enable_through_the_loader_and_lora():
    tok = load_tokenizer("builtin")
    model = load_causal_lm("builtin-small", tok)
    batch_invariant.enable(model)
    assert model.config._attn_implementation == batch_invariant.NAME
