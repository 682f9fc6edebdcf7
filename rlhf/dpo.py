"""Direct preference optimisation: the DPO family of losses on chosen/rejected pairs, through the fused LM head.

``rlhf dpo --config FILE key=value ...`` or :func:`train`. Each micro-batch stacks ``B`` pairs as ``2B`` rows (the
chosen responses, then the rejected ones, as :class:`rlhf.collators.PreferenceCollator` does). The policy runs to
its last hidden states, and :func:`rlhf_kernels.fused_linear_dpo_loss` turns them and the LM head weight into the
pairs' sequence log-probs, the loss and its gradients without materialising the logits
(Rafailov et al. 2023, https://arxiv.org/abs/2305.18290; the other loss types are listed in
:func:`rlhf_kernels.dpo_loss`). The loss of an optimizer step is the mean over all its pairs.

The reference log-probs ``log pi_ref(y | x)`` of each pair come from one of:

- a frozen reference model: ``ref_model`` when given, else a copy of the initial policy (eval mode, no grad);
- with LoRA (``lora_r > 0``) and no ``ref_model``: the policy itself with its adapter disabled (no copy);
- with ``precompute_ref_logps``: one no-grad pass over the train and held-out rows before training stores them in
  the rows (``ref_chosen_logps``, ``ref_rejected_logps``); no reference model stays in memory. Without LoRA or
  ``ref_model`` that pass runs the initial policy, which is the reference.

Reference-free loss types (``simpo``) use none of these. The implicit reward of a response is
``beta * (log pi - log pi_ref)``; the metrics ``rewards/*`` and ``logps/*`` are means over the pairs. A preference
row's optional ``margin`` (used by the reward model) plays no part here.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_kernels.ops.dpo_loss import AVERAGED_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES

from . import distributed
from .collators import PreferenceCollator
from .config import DPOConfig
from .errors import UserError
from .models import IGNORE_INDEX, LMHead, load_causal_lm, load_tokenizer
from .ranked_data import is_ranked
from .sft import build_policy, save_policy
from .train import (
    Stage,
    autocast_context,
    build_device,
    eval_totals,
    load_splits,
    run,
    shard_eval_batches,
    start_stage,
    supervised_batch,
    supervised_step,
    to_device,
)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class DPOCollator(PreferenceCollator):
    """:class:`PreferenceCollator` plus ``ref_chosen_logps, ref_rejected_logps (B,)`` fp32 when the rows carry them."""

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        if REF_KEYS[0] in rows[0]:
            for key in REF_KEYS:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch


def count_pairs(batch: dict) -> int:
    return int(batch["input_ids"].shape[0] // 2)


def uses_average(cfg: DPOConfig) -> bool:
    """Whether sequence log-probs are token means (``average_log_prob``, by default per loss type) or sums."""
    return cfg.loss_type in AVERAGED_LOSS_TYPES if cfg.average_log_prob is None else cfg.average_log_prob


def loss_options(cfg: DPOConfig) -> dict:
    """The keyword options of :func:`rlhf_kernels.fused_linear_dpo_loss` set by the config."""
    return dict(
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        gamma=cfg.simpo_gamma,
        average_log_prob=uses_average(cfg),
    )


# ---------------------------------------------------------------------------------------------------- reference


@torch.no_grad()
def reference_logps(model, batch: dict, *, average: bool, head: LMHead, context=None):
    """Sequence log-probs ``(chosen (B,), rejected (B,))`` fp32 of a pair batch under ``model``, without gradient.

    ``batch``: ``input_ids, attention_mask, labels (2B, T)``. Sums (or, with ``average``, means) of the log-probs
    of the labelled tokens. ``model`` runs in eval mode (restored after), inside ``context()`` when given (e.g.
    ``policy.disable_adapter`` for the LoRA base).
    """
    was_training = model.training
    model.eval()
    try:
        with context() if context is not None else contextlib.nullcontext():
            logps = head.logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # (2B, T-1)
    finally:
        model.train(was_training)
    seq = logps.sum(-1)  # (2B,)
    if average:
        seq = seq / (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp_min(1)
    pairs = seq.shape[0] // 2
    return seq[:pairs], seq[pairs:]


def frozen(model):
    """``model`` in eval mode with every parameter frozen."""
    model.eval()
    model.requires_grad_(False)
    return model


def build_reference(cfg: DPOConfig, policy, tokenizer, device) -> tuple[torch.nn.Module | None, Callable | None]:
    """``(model, context)`` that score the reference log-probs; ``(None, None)`` for reference-free losses.

    ``ref_model`` when given; else the LoRA policy with ``context = policy.disable_adapter``; else, when the
    log-probs are precomputed, the (still initial) policy itself; else a frozen copy of the initial policy.
    """
    if getattr(cfg, "loss_type", None) in REFERENCE_FREE_LOSS_TYPES:  # (KTO has no loss_type: always a reference)
        return None, None
    if cfg.ref_model is not None:
        ref = load_causal_lm(
            cfg.ref_model,
            tokenizer,
            dtype=cfg.dtype,
            device=device,
            trust_remote_code=cfg.trust_remote_code,
            seed=cfg.seed,
        )
        return frozen(ref), None
    if cfg.lora_r > 0:
        return policy, policy.disable_adapter
    if cfg.precompute_ref_logps:
        return policy, None
    return frozen(copy.deepcopy(policy)), None


def annotate_rows(rows: list[dict], keys: tuple[str, ...], score, collate, batch_size: int, autocast, device):
    """Copies of ``rows`` with one python float per key of ``keys`` from ``score(batch) -> (B,) tensors`` (one
    per key), computed in one pass over batches of ``batch_size``: on many processes each scores its share of the
    rows and every process gets all the values. The precomputed reference log-probs of DPO and KTO."""
    values = []
    for part, real in distributed.shard_for_eval(rows, batch_size):
        batch = to_device(collate(list(part)), device)
        with autocast():
            columns = score(batch)
        if real:
            values += list(zip(*(c.tolist() for c in columns), strict=True))
    values = [v for share in distributed.all_gather_objects(values) for v in share]  # in row order
    return [{**row, **dict(zip(keys, v, strict=True))} for row, v in zip(rows, values, strict=True)]


def precompute_reference(
    rows: list[dict], ref, collate, cfg: DPOConfig, autocast, *, head: LMHead, context=None
) -> list[dict]:
    """Copies of ``rows`` with ``ref_chosen_logps`` and ``ref_rejected_logps`` (python floats) from ``ref``: the
    values :func:`reference_logps` gives live (:func:`annotate_rows`)."""

    def score(batch):
        return reference_logps(ref, batch, average=uses_average(cfg), head=head, context=context)

    device = next(ref.parameters()).device
    return annotate_rows(rows, REF_KEYS, score, collate, cfg.eval_batch_size, autocast, device)


def batch_reference(batch: dict, ref, context, cfg: DPOConfig, head: LMHead):
    """The reference log-probs of a batch: precomputed in it, scored live by ``ref``, or ``(None, None)``."""
    if REF_KEYS[0] in batch:
        return batch[REF_KEYS[0]], batch[REF_KEYS[1]]
    if ref is None:
        return None, None
    return reference_logps(ref, batch, average=uses_average(cfg), head=head, context=context)


# ---------------------------------------------------------------------------------------------------- loss


def dpo_loss(
    model,
    batch: dict,
    normalizer: float,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    options: dict,
    head: LMHead,
):
    """``(loss, stats)`` of a batch of ``B`` pairs: the summed pair losses divided by ``normalizer`` (the step's
    pair count).

    ``batch``: ``input_ids, attention_mask, labels (2B, T)`` (chosen rows first); ``ref_chosen, ref_rejected (B,)``
    or None for reference-free losses. ``options``: :func:`loss_options`. Stats (detached) are the
    :func:`rlhf_kernels.dpo_loss` batch means scaled by ``B / normalizer``, so micro-batches add up to step means.
    """
    loss, stats = head.dpo_loss(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        ref_chosen,
        ref_rejected,
        normalizer=normalizer,
        **options,
    )  # hidden[:, t] predicts labels[:, t + 1]
    pairs = count_pairs(batch)
    scale = pairs / normalizer
    stats = {key: value.detach() * scale for key, value in stats.items()}
    stats["loss"] = loss.detach()
    stats["num_pairs"] = torch.tensor(pairs)
    return loss, stats


def evaluate(model, rows, collate, cfg: DPOConfig, autocast, ref, context, head: LMHead) -> dict:
    """Held-out loss and reward/log-prob statistics, averaged over all pairs (each process evaluates its share)."""
    parts = []
    for batch, real in shard_eval_batches(rows, collate, cfg.eval_batch_size, next(model.parameters()).device):
        with autocast():  # normalizer 1: sums over the batch's pairs, divided once at the end
            ref_chosen, ref_rejected = batch_reference(batch, ref, context, cfg, head)
            _, stats = dpo_loss(model, batch, 1, ref_chosen, ref_rejected, options=loss_options(cfg), head=head)
        parts.append(stats if real else distributed.neutral_stats(stats))
    totals = eval_totals(parts)
    return {k: v if k == "num_pairs" else v / len(rows) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------------- trainer


def train(cfg: DPOConfig, resume: bool = False) -> dict:
    """Run DPO as configured; returns the final train and eval metrics (``eval/rewards/accuracies`` ...)."""
    device = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_rows, eval_rows = load_splits(cfg, tokenizer, "preference")
    if is_ranked(train_rows) or (eval_rows and is_ranked(eval_rows)):
        raise UserError("DPO trains on chosen/rejected pairs; ranked rows (prompt, responses) are for `rlhf rm`")
    model = build_policy(cfg, tokenizer, build_device(device))
    collate = DPOCollator(tokenizer.pad_token_id)
    autocast = autocast_context(cfg, device)
    head = LMHead.from_config(cfg)

    ref, context = build_reference(cfg, model, tokenizer, build_device(device))  # copies the unsharded policy
    if ref is not None and ref is not model:
        ref = distributed.place_frozen(ref)
    model = distributed.shard(model)
    if cfg.precompute_ref_logps and ref is not None:  # before any update: the policy may be its own reference
        train_rows = precompute_reference(train_rows, ref, collate, cfg, autocast, head=head, context=context)
        if eval_rows:
            eval_rows = precompute_reference(eval_rows, ref, collate, cfg, autocast, head=head, context=context)
        ref, context = None, None  # rows now carry the reference; drop the model (unless it is the policy)
    options = loss_options(cfg)

    def loss_fn(model, batch, normalizer, detailed):
        ref_chosen, ref_rejected = batch_reference(batch, ref, context, cfg, head)
        return dpo_loss(model, batch, normalizer, ref_chosen, ref_rejected, options=options, head=head)

    def evaluate_fn():
        return evaluate(model, eval_rows, collate, cfg, autocast, ref, context, head)

    rows_per_step, rows_name = supervised_batch(cfg)
    stage = Stage(
        models={"model": model},
        rows=train_rows,
        rows_per_step=rows_per_step,
        step=supervised_step("model", collate, loss_fn, count_pairs, cfg),
        save_final=lambda path, trained: save_policy(trained["model"], tokenizer, path),
        evaluate=evaluate_fn if eval_rows else None,
        show=("loss", "rewards/accuracies"),
        plain_models=lambda: {"model": build_policy(cfg, tokenizer, "cpu")},
        rows_name=rows_name,
    )
    return run(cfg, stage, resume=resume)
