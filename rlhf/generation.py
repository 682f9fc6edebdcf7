"""Sampling responses with ``transformers`` ``generate`` and scoring their tokens through the fused head.

A rollout batch is one dict of tensors:

- ``input_ids, attention_mask (B, P + R)``: the left-padded prompts followed by the responses;
- ``response_mask (B, R)`` bool: the response tokens up to and including the first EOS (what the losses see);
- ``ended (B,)`` bool: the response stopped at EOS (not at ``max_new_tokens``);
- ``prompt_length``: ``P`` (an int);
- with ``record_logprobs=True``: ``sampler_logprobs (B, R)`` fp32, the log-probability of each sampled token under
  the distribution it was drawn from (after temperature, top-k and top-p), 0 off ``response_mask``.

Everything after a response's first EOS is padding (``pad_token_id``, mask 0).
"""

from __future__ import annotations

import torch

from . import distributed
from .models import IGNORE_INDEX


def sampling_config(
    tokenizer,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
):
    """A full ``GenerationConfig``, so a model's own generation defaults (penalties, top-k 50...) never apply."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=top_k if do_sample else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def response_mask_from(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask (B, R) bool, ended (B,) bool)``: tokens up to and including the first EOS of each response."""
    is_eos = responses == eos_token_id
    before_or_at_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no EOS strictly before this position
    return before_or_at_eos, is_eos.any(-1)


class SampledLogprobs:
    """A logits processor, last in the chain: at each step it keeps the final (warped) scores, and at the next step
    (or :meth:`finish`) takes the log-prob of the token that was sampled from them.

    Without truncation (no top-k / top-p) the log-prob is computed by :func:`rlhf_kernels.logprobs`, the
    batch-invariant kernel behind the trainers' fused head, so with batch-invariant attention
    (:mod:`rlhf.batch_invariant`) the sampler's log-probs equal the trainer's bitwise; truncated scores hold
    ``-inf`` and go through ``log_softmax``."""

    def __init__(self, truncated: bool = False):
        self.truncated = truncated
        self.previous: torch.Tensor | None = None  # (B, V) the last step's final scores
        self.steps: list[torch.Tensor] = []  # (B,) per sampled token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.previous = scores
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is None:
            return
        if self.truncated:
            lp = torch.log_softmax(self.previous.float(), -1).gather(1, tokens[:, None]).squeeze(1)
        else:
            import rlhf_kernels

            lp = rlhf_kernels.logprobs(self.previous, tokens).float()
        self.steps.append(lp)
        self.previous = None

    def finish(self, responses: torch.Tensor) -> torch.Tensor:
        """``(B, R)`` log-probs of ``responses`` (the generated tokens)."""
        if responses.shape[1] > len(self.steps):
            self._take(responses[:, -1])
        return torch.stack(self.steps[: responses.shape[1]], 1) if self.steps else responses.new_zeros(responses.shape)


class _InverseTemperature:
    """Temperature as the kernels apply it: scores times ``1 / temperature`` in fp32 (``x / T`` rounds differently),
    so the distribution sampled from is exactly the one the trainer's log-probs are taken under."""

    def __init__(self, temperature: float):
        self.inv_temperature = 1.0 / temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.inv_temperature


class InverseCDFSampler:
    """The sampling step as a logits processor, last in the chain: one uniform draw per row against the cumulative
    distribution of the final scores (fp64 cumulative sum, so every token keeps its share of the unit interval to
    ~1e-16), returning scores that are 0 at the drawn token and -inf elsewhere, for ``generate``'s greedy step to
    pick. The same distribution as ``torch.multinomial``, from ``B`` random numbers per step instead of ``B x V``
    (``multinomial`` draws an exponential variate per vocabulary entry: half of a CPU decode step at V = 32k)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), -1).double().cumsum(-1)
        u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(1, token, 0.0)


def _sampling_processors(config, temperature: float, top_p: float, top_k: int, record: bool):
    """The sampling warpers as an explicit processor list (temperature, top-k, top-p: the order ``generate`` uses),
    the recorder when ``record``, then :class:`InverseCDFSampler`; ``config`` is switched to greedy decoding (which
    then takes the sampler's token) with no warpers of its own, so none applies twice."""
    from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(_InverseTemperature(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    recorder = SampledLogprobs(truncated=bool(top_k) or top_p < 1.0) if record else None
    if recorder is not None:
        processors.append(recorder)
    processors.append(InverseCDFSampler())
    config.do_sample, config.temperature, config.top_k, config.top_p = False, None, None, None
    return processors, recorder


@torch.no_grad()
def generate(model, tokenizer, prompts: dict, *, record_logprobs: bool = False, **sampling) -> dict:
    """Sample one response per prompt. ``prompts``: left-padded ``input_ids, attention_mask (B, P)``.

    ``sampling``: ``max_new_tokens, temperature, top_p, top_k, do_sample`` (see :func:`sampling_config`). Uses
    the global torch RNG (restored by checkpoints, so resumed runs sample the same tokens). ``record_logprobs``:
    also return the sampler's own log-probs of the sampled tokens (the same samples as without it). Returns a
    rollout batch (module docstring).
    """
    config = sampling_config(tokenizer, **sampling)
    extra, recorder = {}, None
    if sampling.get("do_sample", True):
        s = dict(temperature=1.0, top_p=1.0, top_k=0) | sampling
        extra["logits_processor"], recorder = _sampling_processors(
            config, s["temperature"], s["top_p"], s["top_k"], record_logprobs
        )
    elif record_logprobs:
        raise ValueError("record_logprobs needs sampling (do_sample=True)")
    was_training = model.training
    model.eval()
    with distributed.gathered(model):  # sharded: gather once for every new token (no collective per token)
        out = model.generate(
            input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], generation_config=config,
            **extra,
        )  # fmt: skip
    model.train(was_training)
    P = prompts["input_ids"].shape[1]
    responses = out[:, P:]
    mask, ended = response_mask_from(responses, tokenizer.eos_token_id)
    batch = {
        "input_ids": torch.cat([prompts["input_ids"], responses.masked_fill(~mask, tokenizer.pad_token_id)], 1),
        "attention_mask": torch.cat([prompts["attention_mask"].long(), mask.long()], 1),
        "response_mask": mask,
        "ended": ended,
        "prompt_length": P,
    }
    if recorder is not None:
        batch["sampler_logprobs"] = recorder.finish(responses).masked_fill(~mask, 0.0)
    return batch


def response_labels(batch: dict) -> torch.Tensor:
    """``(B, P + R)`` labels: the response tokens, ``IGNORE_INDEX`` on prompts and padding."""
    P = batch["prompt_length"]
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, P:] = batch["input_ids"][:, P:].masked_fill(~batch["response_mask"], IGNORE_INDEX)
    return labels


def response_logprobs(head, model, batch: dict, *, return_entropy: bool = False, return_hidden: bool = False):
    """Per-token fp32 log-probs ``(B, R)`` of the responses under ``model`` (0 off ``response_mask``), through the
    head adapter ``head`` (:class:`rlhf.models.LMHead`, which holds the temperature).

    The targets of positions ``P .. P+R-1`` are predicted from positions ``P-1 .. P+R-2``. Optional entropy
    ``(B, R)`` and the :class:`rlhf.models.HeadStates` of those positions.
    """
    return head.logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        response_labels(batch),
        start=batch["prompt_length"] - 1,
        return_entropy=return_entropy,
        return_hidden=return_hidden,
    )
