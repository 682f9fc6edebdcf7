"""KTO: Kahneman-Tversky optimisation on unpaired desirable / undesirable examples, through the fused LM head.

``rlhf kto --config FILE key=value ...`` or :func:`train`. Data: :mod:`rlhf.kto_data` (``prompt``,
``completion``, ``label``; preference pairs are split into a desirable and an undesirable example; with no
arguments the built-in preference pairs). Loss: :func:`rlhf_kernels.fused_linear_kto_loss` on the policy's last
hidden states (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306), averaged over the examples of the
optimizer step.

One optimizer step:

1. z, the reference point: one no-grad pass of the policy (and of the reference, unless precomputed) over the
   step's mismatched pairs (each example's prompt with another example's completion), z = max(0, mean of
   log pi - log pi_ref over all of them), summed over the micro-batches and the processes first, so z is the
   same for every micro-batch and does not depend on how the step is split;
2. the update: ``grad_accum`` micro-batches through the fused KTO head with that z, one optimizer step.

The reference is the one DPO uses (:func:`rlhf.dpo.build_reference`): ``ref_model``, a frozen copy of the initial
policy, the LoRA policy with its adapter disabled, or ``precompute_ref_logps`` (one pass before training stores
``ref_logps`` and ``ref_kl_logps`` in the rows). Metrics: ``loss``, ``kl`` (z), ``rewards/chosen`` and
``rewards/rejected`` (mean beta (log pi - log pi_ref) over the desirable / undesirable examples),
``rewards/margins`` (their difference), ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import contextlib

import torch

from . import distributed
from .config import KTOConfig
from .dpo import annotate_rows, build_reference
from .kto_data import REF_KEYS, KTOCollator, add_mismatched, check_both_labels
from .models import LMHead, load_tokenizer
from .sft import build_policy, save_policy
from .train import (
    Stage,
    accumulate_and_step,
    autocast_context,
    build_device,
    eval_totals,
    load_splits,
    micro_batches,
    run,
    shard_eval_batches,
    start_stage,
    supervised_batch,
)


@torch.no_grad()
def sequence_logps(model, ids, mask, labels, head: LMHead, *, context=None, eval_mode: bool = False) -> torch.Tensor:
    """Summed completion log-probs ``(B,)`` fp32 of ``labels`` under ``model``, no gradient; ``eval_mode`` for a
    reference (restored after), inside ``context()`` when given (the LoRA base)."""
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with context() if context is not None else contextlib.nullcontext():
            return head.logprobs(model, ids, mask, labels).sum(-1)
    finally:
        model.train(was_training)


def batch_reference(batch: dict, ref, context, head: LMHead, *, mismatched: bool = False) -> torch.Tensor:
    """The reference log-probs ``(B,)`` of a batch's examples (or, with ``mismatched``, of its mismatched pairs):
    precomputed in it, or scored live by ``ref``."""
    if REF_KEYS[0] in batch:
        return batch[REF_KEYS[1] if mismatched else REF_KEYS[0]]
    prefix = "kl_" if mismatched else ""
    ids, mask, labels = (batch[prefix + k] for k in ("input_ids", "attention_mask", "labels"))
    return sequence_logps(ref, ids, mask, labels, head, context=context, eval_mode=True)


def reference_point(model, batches, ref, context, head: LMHead, autocast) -> torch.Tensor:
    """z = max(0, mean over every mismatched pair of the step, on every process, of log pi - log pi_ref)."""
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            policy_kl = sequence_logps(
                model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"], head
            )
            ref_kl = batch_reference(batch, ref, context, head, mismatched=True)
        total += float((policy_kl - ref_kl.to(policy_kl.device)).sum())
        count += policy_kl.shape[0]
    total, count = distributed.all_reduce([total, count]).tolist()
    return torch.tensor(max(total / max(count, 1), 0.0), dtype=torch.float32)


def loss_options(cfg: KTOConfig) -> dict:
    return dict(beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)


def side_counts(batches) -> tuple[float, float]:
    """(desirable, undesirable) examples of ``batches`` over every process."""
    desirable = sum(int(b["desirable"].sum()) for b in batches)
    total = sum(int(b["desirable"].numel()) for b in batches)
    return tuple(distributed.all_reduce([desirable, total - desirable]).tolist())


def kto_loss(model, batch: dict, normalizer: float, z: torch.Tensor, ref, context, head: LMHead, options: dict,
             sides: tuple[float, float]):  # fmt: skip
    """``(loss, stats)`` of a micro-batch: the summed example losses divided by ``normalizer`` (the step's example
    count). Stats add up over the micro-batches to the step's exact means: ``rewards/chosen`` and ``logps/chosen``
    are this batch's sums over its desirable examples divided by the step's desirable count ``sides[0]``, the
    ``rejected`` ones likewise with ``sides[1]``, ``kl`` (z) scaled by ``B / normalizer``."""
    ref_logps = batch_reference(batch, ref, context, head)
    device = batch["input_ids"].device
    loss, stats = head.kto_loss(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], ref_logps.to(device),
        batch["desirable"].to(device), kl=z.to(device), normalizer=normalizer, **options,
    )  # fmt: skip
    examples = batch["input_ids"].shape[0]
    weights = {
        "chosen": stats["num_desirable"] / max(sides[0], 1),
        "rejected": stats["num_undesirable"] / max(sides[1], 1),
    }
    out = {
        f"{kind}/{side}": stats[f"{kind}/{side}"] * w for side, w in weights.items() for kind in ("rewards", "logps")
    }
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["kl"] = z.detach().clone() * examples / normalizer
    out["loss"] = loss.detach()
    out["num_examples"] = torch.tensor(examples)
    return loss, out


def evaluate(model, rows, collate, cfg: KTOConfig, autocast, ref, context, head: LMHead) -> dict:
    """Held-out loss and statistics, averaged over the examples, with z from the held-out mismatched pairs."""
    device = next(model.parameters()).device
    batches = [(batch, real) for batch, real in shard_eval_batches(rows, collate, cfg.eval_batch_size, device)]
    z = reference_point(model, [b for b, real in batches if real], ref, context, head, autocast)
    desirable = sum(1 for r in rows if r["label"])
    sides = (desirable, len(rows) - desirable)
    parts = []
    for batch, real in batches:
        with autocast():  # normalizer: every held-out example, so the totals are the means
            _, stats = kto_loss(model, batch, len(rows), z, ref, context, head, loss_options(cfg), sides)
        parts.append(stats if real else distributed.neutral_stats(stats))
    return eval_totals(parts)


def precompute_reference(rows: list[dict], ref, collate, cfg: KTOConfig, autocast, head: LMHead, context=None):
    """Copies of ``rows`` with ``ref_logps`` and ``ref_kl_logps`` from ``ref`` (:func:`rlhf.dpo.annotate_rows`)."""

    def score(batch):
        return batch_reference(batch, ref, context, head), batch_reference(batch, ref, context, head, mismatched=True)

    device = next(ref.parameters()).device
    return annotate_rows(rows, REF_KEYS, score, collate, cfg.eval_batch_size, autocast, device)


def train(cfg: KTOConfig, resume: bool = False) -> dict:
    """Run KTO as configured; returns the final train and eval metrics (``eval/rewards/margins`` ...)."""
    device = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_splits(cfg, tokenizer, "unpaired")
    check_both_labels(train_rows, "training")
    train_rows = add_mismatched(train_rows, cfg.max_length)
    eval_rows = add_mismatched(eval_rows, cfg.max_length) if eval_rows else eval_rows
    model = build_policy(cfg, tokenizer, build_device(device))
    collate = KTOCollator(tokenizer.pad_token_id)
    autocast = autocast_context(cfg, device)
    head = LMHead.from_config(cfg)
    options = loss_options(cfg)

    ref, context = build_reference(cfg, model, tokenizer, build_device(device))  # copies the unsharded policy
    if ref is not model:
        ref = distributed.place_frozen(ref)
    model = distributed.shard(model)
    if cfg.precompute_ref_logps:  # before any update: the policy may be its own reference
        train_rows = precompute_reference(train_rows, ref, collate, cfg, autocast, head, context)
        if eval_rows:
            eval_rows = precompute_reference(eval_rows, ref, collate, cfg, autocast, head, context)
        ref, context = None, None

    def step(ctx) -> dict:
        model = ctx.models["model"]
        batches = micro_batches(ctx.rows, cfg.batch_size, collate, ctx.device)
        normalizer = max(int(distributed.all_reduce([sum(b["input_ids"].shape[0] for b in batches)]).item()), 1)
        z = reference_point(model, batches, ref, context, head, ctx.autocast)
        sides = side_counts(batches)
        return accumulate_and_step(
            ctx.models,
            ctx.optimizers,
            batches,
            lambda batch, norm: kto_loss(model, batch, norm, z, ref, context, head, options, sides),
            normalizer,
            max_grad_norm=cfg.max_grad_norm,
            autocast=ctx.autocast,
        )

    def evaluate_fn():
        return evaluate(model, eval_rows, collate, cfg, autocast, ref, context, head)

    rows_per_step, rows_name = supervised_batch(cfg)
    stage = Stage(
        models={"model": model},
        rows=train_rows,
        rows_per_step=rows_per_step,
        step=step,
        save_final=lambda path, trained: save_policy(trained["model"], tokenizer, path),
        evaluate=evaluate_fn if eval_rows else None,
        show=("loss", "rewards/margins"),
        plain_models=lambda: {"model": build_policy(cfg, tokenizer, "cpu")},
        rows_name=rows_name,
    )
    return run(cfg, stage, resume=resume)
