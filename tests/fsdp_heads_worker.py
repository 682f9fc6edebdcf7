"""The fused LM heads (through rlhf.models.LMHead), the reward/value model and generation on a sharded model,
against the same unsharded model in the same process: values and gradients.

``torchrun --nproc_per_node 2 tests/fsdp_heads_worker.py MODE REPORT.json`` with ``MODE`` fsdp2 or ddp; writes
``{quantity: largest absolute difference}``. Every process feeds the same inputs, so FSDP2's average of the
processes' gradients is the single-process gradient.
"""

import copy
import json
import sys

import torch

from rlhf import distributed
from rlhf.config import SFTConfig
from rlhf.generation import generate
from rlhf.models import IGNORE_INDEX, LMHead, RewardModel, load_causal_lm
from rlhf.tiny import build_tokenizer


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def grad_diff(plain: torch.nn.Module, sharded: torch.nn.Module) -> float:
    """Largest gradient difference over the parameters; both models' gradients are cleared afterwards."""
    worst = 0.0
    named = dict(sharded.named_parameters())
    for name, param in plain.named_parameters():
        other = named[name]
        assert (param.grad is None) == (other.grad is None), name
        if param.grad is not None:
            worst = max(worst, (full(other.grad) - param.grad).abs().max().item())
    for model in (plain, sharded):
        model.zero_grad(set_to_none=True)
    return worst


def main(mode: str, report: str) -> None:
    ctx = distributed.setup(SFTConfig(distributed=mode, device="cpu"))
    tok = build_tokenizer()
    plain = load_causal_lm("builtin-small", tok, seed=0)
    ref_plain = load_causal_lm("builtin-small", tok, seed=1).requires_grad_(False)
    torch.manual_seed(2)  # the value head's init: the same on every process (shard() checks)
    critic_plain = RewardModel(load_causal_lm("builtin-small", tok, seed=2).get_decoder())
    sharded = distributed.shard(copy.deepcopy(plain))
    ref_sharded = distributed.shard(copy.deepcopy(ref_plain))
    critic_sharded = distributed.shard(copy.deepcopy(critic_plain))
    head = LMHead()
    results: dict[str, float] = {}

    gen = torch.Generator().manual_seed(0)  # the same inputs on every process
    B, T, P = 4, 16, 8
    ids = torch.randint(3, len(tok), (B, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.detach().float() - b.detach().float()).abs().max().item()

    # log-probs, entropy and argmax count, with gradients
    out = {m: head.logprobs(m, ids, mask, labels, return_entropy=True, return_correct=True) for m in (plain, sharded)}
    results["logprobs"] = diff(out[plain][0], out[sharded][0])
    results["entropy"] = diff(out[plain][1], out[sharded][1])
    results["correct"] = diff(out[plain][2], out[sharded][2])
    for model in (plain, sharded):
        (out[model][0].sum() + 0.1 * out[model][1].sum()).backward()
    results["logprobs_grad"] = grad_diff(plain, sharded)

    # PPO loss on the response part
    old = out[plain][0].detach()[:, P - 1 :] + 0.01 * torch.randn(B, T - P, generator=gen)
    advantages = torch.randn(B, T - P, generator=gen)
    response_mask = torch.ones(B, T - P, dtype=torch.bool)
    response_mask[1, -2:] = False
    losses = {}
    for model in (plain, sharded):
        loss, _ = head.ppo_loss(
            model, ids, mask, ids[:, P:], old, advantages, response_mask, start=P - 1, agg="seq-mean-token-mean"
        )
        loss.backward()
        losses[model] = loss
    results["ppo_loss"] = diff(losses[plain], losses[sharded])
    results["ppo_loss_grad"] = grad_diff(plain, sharded)

    # DPO loss: rows 0, 1 chosen, rows 2, 3 rejected
    ref_chosen, ref_rejected = torch.randn(2, generator=gen) - 20, torch.randn(2, generator=gen) - 20
    for model in (plain, sharded):
        loss, _ = head.dpo_loss(model, ids, mask, labels, ref_chosen, ref_rejected, beta=0.5, loss_type="sigmoid")
        loss.backward()
        losses[model] = loss
    results["dpo_loss"] = diff(losses[plain], losses[sharded])
    results["dpo_loss_grad"] = grad_diff(plain, sharded)

    # exact KL between two models, without gradients
    with torch.no_grad():
        kl = {}
        for model, ref in ((plain, ref_plain), (sharded, ref_sharded)):
            *_, states = head.logprobs(model, ids, mask, labels, return_hidden=True)
            *_, ref_states = head.logprobs(ref, ids, mask, labels, return_hidden=True)
            kl[model] = head.kl(states, ref_states, labels[:, 1:] != IGNORE_INDEX)
    results["kl"] = diff(kl[plain], kl[sharded])

    # the value model: per-token values and the reward at the last token, with gradients
    values = {m: m.token_values(ids, mask) for m in (critic_plain, critic_sharded)}
    rewards = {m: m(ids, mask) for m in (critic_plain, critic_sharded)}
    results["values"] = diff(values[critic_plain], values[critic_sharded])
    results["reward"] = diff(rewards[critic_plain], rewards[critic_sharded])
    for model in (critic_plain, critic_sharded):
        (values[model][:, 5:].sum() + rewards[model].sum()).backward()
    results["values_grad"] = grad_diff(critic_plain, critic_sharded)

    # greedy generation (parameters gathered once for all the new tokens); processes could stop at different
    # lengths, so every process generates alone: no collective inside
    prompts = {"input_ids": ids[:, :P], "attention_mask": mask[:, :P]}
    batches = {m: generate(m, tok, prompts, max_new_tokens=6, do_sample=False) for m in (plain, sharded)}
    results["generate"] = diff(batches[plain]["input_ids"], batches[sharded]["input_ids"])

    # the training step still works after generation (parameters resharded, hooks intact)
    lp = head.logprobs(sharded, ids, mask, labels)
    lp_plain = head.logprobs(plain, ids, mask, labels)
    lp.sum().backward()
    lp_plain.sum().backward()
    results["after_generate_grad"] = grad_diff(plain, sharded)

    if ctx.main:
        with open(report, "w") as f:
            json.dump(results, f, indent=2)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
