"""PPO-ptx: the language-model loss on pretraining (or SFT) data mixed into every policy update.

InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 2) adds gamma * E_{x ~ D_pretrain}[log pi(x)]
to the RL objective to limit the "alignment tax", the loss of what the model could do before RL. Here every
optimizer update of the policy (PPO and GRPO) adds ``ptx_coef`` x the mean NLL of the response tokens of
``ptx_batch_size`` rows of ``ptx_dataset`` (SFT format), through the same fused log-prob head as SFT. The rows of
update ``u`` (counted over the whole run) are rows ``[u b, (u + 1) b)`` of an epoch permutation seeded by the run's
seed, so a resumed run reads the same rows; each process reads its contiguous share, and the loss is normalised by
the token count over all processes. The policy's gradient changes by exactly ``ptx_coef`` x the gradient of that
mean NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed
from .collators import SFTCollator
from .errors import UserError
from .models import LMHead
from .sft import count_tokens, sft_loss
from .train import micro_batches, step_rows

PTX_KEY = "ptx"  # marks a ptx micro-batch among an update's micro-batches
SEED_OFFSET = 7_919  # the ptx data order is its own permutation, not the prompts'


@dataclass
class PretrainMix:
    """The ptx term of a run: its rows, coefficient, rows per update and micro-batch size."""

    rows: list[dict]
    coef: float
    rows_per_update: int
    batch_size: int
    seed: int
    collate: SFTCollator
    head: LMHead

    def micro_batches(self, update: int, device) -> list[dict]:
        """This process's micro-batches of update ``update``, each marked and holding the update's token count."""
        indices, _ = step_rows(len(self.rows), self.rows_per_update, self.seed + SEED_OFFSET, update)
        mine = indices[distributed.rank_slice(len(indices))]
        batches = micro_batches([self.rows[i] for i in mine], self.batch_size, self.collate, device)
        tokens = max(float(distributed.all_reduce([sum(count_tokens(b) for b in batches)]).item()), 1.0)
        return [{**b, PTX_KEY: tokens} for b in batches]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """``coef`` x this micro-batch's share of the update's mean NLL; stats ``ptx/loss`` (that NLL share)."""
        nll, stats = sft_loss(model, batch, batch[PTX_KEY], False, head=self.head)
        return self.coef * nll, {"ptx/loss": stats["loss"]}


def build_ptx(cfg, tokenizer, log=print) -> PretrainMix | None:
    """The run's :class:`PretrainMix` (its head at temperature 1, whatever the sampling temperature), or None when
    ``ptx_coef`` is 0."""
    if cfg.ptx_coef <= 0:
        return None
    from .data import load_rows, prepare

    rows = prepare(load_rows(cfg.ptx_dataset), tokenizer, "sft", cfg.max_length, cfg.overlong, log=log)
    if len(rows) < cfg.ptx_batch_size:
        raise UserError(f"ptx_dataset has {len(rows)} rows, fewer than ptx_batch_size = {cfg.ptx_batch_size}")
    if cfg.ptx_batch_size % distributed.context().world:
        world = distributed.context().world
        raise UserError(f"ptx_batch_size={cfg.ptx_batch_size} does not split evenly over {world} processes")
    return PretrainMix(rows, cfg.ptx_coef, cfg.ptx_batch_size, cfg.batch_size, cfg.seed,
                       SFTCollator(tokenizer.pad_token_id), LMHead.from_config(cfg))  # fmt: skip


def with_ptx(micros: list[dict], loss_fn, ptx: PretrainMix | None, model, update: int, device):
    """``(micro-batches, loss function)`` of a policy update with the ptx micro-batches appended (unchanged when
    ``ptx`` is None): the loss function sends marked micro-batches to :meth:`PretrainMix.loss`."""
    if ptx is None:
        return micros, loss_fn

    def mixed(batch, normalizer):
        return ptx.loss(model, batch) if PTX_KEY in batch else loss_fn(batch, normalizer)

    return micros + ptx.micro_batches(update, device), mixed
