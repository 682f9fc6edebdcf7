"""Batch-invariant attention: a token's attention output does not depend on how many queries are computed with it
or on how many keys follow it, so sampling (a KV-cache decode, one query per step) and training (one forward over
the whole sequence) compute bitwise the same hidden states, and the sampler's log-probs equal the trainer's.

Why the usual kernels differ: the softmax and the ``P @ V`` product reduce over all keys of the call, in an order
(vector lanes, blocks) that depends on the key count, so the decode step (keys ``0..t``) and the training forward
(keys ``0..T-1``, later ones masked) round differently; a GEMM with one or two rows can take another code path
than the same rows inside a larger GEMM. Here the keys are processed in blocks of :data:`KEY_BLOCK` from key 0 with
an online softmax: a block that is masked for a query adds exactly zero and rescales by exactly one, so the keys
after a query change nothing, and the within-block reductions have one fixed length. Calls with fewer than
:data:`MIN_QUERIES` queries are padded to that many rows.

Scope, stated plainly: the rest of the model must be row-invariant too (its linear layers' results per row must
not depend on the number of rows). The CPU GEMMs of PyTorch are, from :data:`MIN_QUERIES` rows on (tested in
``tests/test_rlhf_batch_invariant.py``); GPU GEMM libraries in general are not (split-K choices depend on the
shape), so on a GPU this attention alone does not make the mismatch zero. The cost: attention in PyTorch ops, one
block at a time (no fused kernel), fine for the small models this targets; the log-prob kernels of
:mod:`rlhf_kernels` are batch-invariant already.

Use: ``enable(model)`` (or ``batch_invariant=true`` in ``rlhf grpo``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NAME = "rlhf_batch_invariant"
KEY_BLOCK = 32  # keys per block of the online softmax
MIN_QUERIES = 8  # calls with fewer queries are padded to this many (row-invariant GEMM paths)

_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function (``transformers`` attention-interface signature): ``query (B, h, Tq, d)``,
    ``key, value (B, h_kv, Tk, d)``, ``attention_mask`` additive ``(B, 1, Tq, >= Tk)`` or None; returns
    ``((B, Tq, h, d), None)``."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"batch-invariant attention does not support {', '.join(bad)} (model {type(module).__name__})")
    if dropout and module.training:
        raise ValueError("batch-invariant attention has no attention dropout; disable dropout (the trainers do)")
    B, heads, Tq, d = query.shape
    if Tq < MIN_QUERIES:
        pad = MIN_QUERIES - Tq
        mask = None if attention_mask is None else F.pad(attention_mask, (0, 0, 0, pad))
        out, _ = attention(module, F.pad(query, (0, 0, 0, pad)), key, value, mask, scaling)
        return out[:, :Tq], None
    if key.shape[1] != heads:  # grouped-query attention
        key = key.repeat_interleave(heads // key.shape[1], 1)
        value = value.repeat_interleave(heads // value.shape[1], 1)
    Tk = key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    blocks = -(-Tk // KEY_BLOCK)
    pad = blocks * KEY_BLOCK - Tk
    lowest = torch.finfo(query.dtype).min
    if attention_mask is None:
        mask = query.new_zeros(B, 1, Tq, Tk)
    else:
        mask = attention_mask[..., :Tk]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, lowest)
    if pad:
        key, value = F.pad(key, (0, 0, 0, pad)), F.pad(value, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=lowest)
    m = query.new_full((B, heads, Tq, 1), -math.inf)
    total = query.new_zeros(B, heads, Tq, 1)
    acc = query.new_zeros(B, heads, Tq, d)
    for j in range(blocks):
        keys = slice(j * KEY_BLOCK, (j + 1) * KEY_BLOCK)
        s = torch.matmul(query, key[:, :, keys].transpose(-1, -2)) * scaling + mask[..., keys]
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)
        rescale = torch.exp(m - m_new)
        total = total * rescale + p.sum(-1, keepdim=True)
        acc = acc * rescale + torch.matmul(p, value[:, :, keys])
        m = m_new
    return (acc / total).transpose(1, 2).contiguous(), None


def register() -> None:
    """Registers :data:`NAME` with ``transformers``' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def enable(model) -> None:
    """Switches ``model`` (a ``transformers`` model, LoRA-wrapped or not) to batch-invariant attention."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(NAME)
    else:
        base.config._attn_implementation = NAME
