"""Models for training: tokenizer, policy (causal LM), reward model, LoRA, and the LM-head adapter.

The policy forward used for training never materialises the ``(B, T, V)`` logits: it runs the backbone to the
last hidden states and hands them to the fused kernels through :class:`LMHead`, the one adapter every stage and the
evaluation use. Positions come from the attention mask (``cumsum - 1``), so a left-padded row scores like its
right-padded twin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import rlhf_kernels

from .distributed import forward_call

IGNORE_INDEX = -100
PAD_TOKEN = "<pad>"

# Built-in Llama sizes, built locally (no download): "builtin" is the default run's model, "builtin-small" the tests'.
BUILTIN_MODELS = {
    "builtin": {},
    "builtin-small": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_FILE, HEAD_CONFIG = "score_head.safetensors", "reward_head.json"


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but CUDA is not available here")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str = "builtin", *, trust_remote_code: bool = False):
    """The built-in tokenizer or ``AutoTokenizer.from_pretrained``, with a pad token distinct from EOS.

    A tokenizer without a pad token, or whose pad token is EOS, gets a new ``<pad>`` special token: the models'
    embeddings are resized to match when loaded with :func:`load_causal_lm` / :func:`load_reward_model`.
    """
    if name_or_path in BUILTIN_MODELS:
        from .tiny import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    from .errors import UserError, check_local_path

    check_local_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:  # neither a model directory nor a hub name that can be reached
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from err
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def _fit_to_tokenizer(model, tokenizer):
    """Resize the embeddings when the tokenizer gained tokens; record the special ids in the config."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
    return model


def load_causal_lm(
    name_or_path: str,
    tokenizer,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    seed: int = 0,
):
    """A policy / reference model: a built-in tiny Llama (seeded init) or ``AutoModelForCausalLM``."""
    if name_or_path in BUILTIN_MODELS:
        from .tiny import tiny_llama

        model = tiny_llama(tokenizer, seed=seed, **BUILTIN_MODELS[name_or_path]).to(resolve_dtype(dtype))
    else:
        from transformers import AutoModelForCausalLM

        from .errors import check_local_path

        check_local_path(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
        )
    model = _fit_to_tokenizer(model, tokenizer).to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward (non-reentrant checkpointing)."""
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)


def apply_lora(model, *, r: int, alpha: float, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (``peft``); only the adapters are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    return get_peft_model(model, config)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` positions counted over real tokens only (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)`` final hidden states (after the final norm) of ``backbone``."""
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


class HeadStates(NamedTuple):
    """Last hidden states ``(..., H)`` of ``model`` in the dtype its LM head runs in (see :class:`LMHead`)."""

    hidden: torch.Tensor
    model: nn.Module


@dataclass(frozen=True)
class LMHead:
    """The one way from a causal LM to the fused LM-head kernels of :mod:`rlhf_kernels`.

    Every stage and the evaluation reach ``fused_linear_logprobs``, ``fused_linear_kl``, ``fused_linear_ppo_loss``
    ``fused_linear_dpo_loss`` and ``fused_linear_kto_loss`` through this adapter, which owns what they share:

    - ``backend``, ``chunk_size`` and ``temperature`` (the sampling temperature the log-probs are taken at);
    - the dtype rule: inside autocast the head runs in the autocast dtype (as ``nn.Linear`` would), else in the
      head weight's dtype; hidden states, weight and bias are cast to it;
    - the no-grad rule: under ``torch.no_grad()`` the weight is detached, so heads that compute gradients in their
      forward skip that work;
    - access to the LM-head weight (:meth:`params`): no stage reads ``lm_head.weight`` itself, so this is the one
      place where sharded weights are gathered (the gradient must reach the parameter the model owns);
    - one forward call per computation (:func:`rlhf.distributed.forward_call`): :meth:`logprobs`,
      :meth:`ppo_loss` and :meth:`dpo_loss` run the backbone and the head in a single call of the model, so a
      sharded model gathers its root's parameters (embeddings, final norm, head) once and reduces their gradients
      once, after the whole loss's backward.
    """

    backend: str | None = None
    chunk_size: int | None = None
    temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg, *, temperature: float = 1.0) -> LMHead:
        """The adapter of a stage config (``backend``, ``chunk_size``)."""
        return cls(backend=cfg.backend, chunk_size=cfg.chunk_size, temperature=temperature)

    @staticmethod
    def parts(model) -> tuple[nn.Module, nn.Module]:
        """``(backbone, lm_head)`` of a causal LM, a LoRA-wrapped one included."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.get_decoder(), base.get_output_embeddings()

    @staticmethod
    def run_dtype(model, device: torch.device) -> torch.dtype:
        """The dtype the head runs in: the autocast dtype inside autocast, else the head weight's dtype."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return LMHead.parts(model)[1].weight.dtype

    def params(self, model, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's ``(weight (V, H), bias (V,) | None)`` in ``dtype`` on ``device``, detached under no_grad.

        Call it only inside ``forward_call(model, ...)`` (:func:`rlhf.distributed.forward_call`) or ``model(...)``:
        a sharded model's head weight is gathered only there. The methods below do so."""
        head = self.parts(model)[1]
        weight, bias = head.weight, head.bias
        if not torch.is_grad_enabled():
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        weight = weight.to(device=device, dtype=dtype)
        return weight, None if bias is None else bias.to(device=device, dtype=dtype)

    def _hidden(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> HeadStates:
        """:meth:`hidden` without the ``forward_call``: for the methods that run inside one already."""
        backbone, head = self.parts(model)
        device = head.weight.device
        hidden = last_hidden(backbone, input_ids.to(device), attention_mask.to(device))[:, start:-1]
        return HeadStates(hidden.to(self.run_dtype(model, device)), model)

    def hidden(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> HeadStates:
        """The final hidden states of positions ``start .. T-2`` (those that predict tokens ``start+1 .. T-1``):
        ``(B, T-1-start, H)`` in the head's run dtype, on the head's device, computed in their own forward call.

        For no-grad uses (the states of :meth:`kl`). A loss needing gradients must compute its hidden states and
        its head in one call: :meth:`logprobs`, :meth:`ppo_loss`, :meth:`dpo_loss` (on a sharded model a second
        call on the same root would reduce its gradients before the first call's backward has run)."""
        return forward_call(model, lambda: self._hidden(model, input_ids, attention_mask, start))

    def logprobs(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        start: int = 0,
        return_entropy: bool = False,
        return_hidden: bool = False,
        return_correct: bool = False,
    ):
        """Per-token log-probs of ``labels`` under a causal LM through the fused head (no full logits).

        ``input_ids, attention_mask, labels``: ``(B, T)``; ``labels[t]`` is the token at position ``t`` or
        ``IGNORE_INDEX``. Returns fp32 ``logprobs (B, T-1-start)`` for the targets ``labels[:, start+1:]`` (0 where
        ignored), followed by the extras asked for, in this order: ``entropy`` (same shape, fp32), ``correct``
        (0-dim int64, no gradient: how many labelled targets are the argmax of the head's logits, computed in
        row chunks), the :class:`HeadStates` of positions ``start .. T-2``. One ``forward_call`` of ``model``.
        """

        def run():
            states = self._hidden(model, input_ids, attention_mask, start)
            h = states.hidden
            weight, bias = self.params(model, h.dtype, h.device)
            targets = labels[:, start + 1 :].to(h.device)
            out = rlhf_kernels.fused_linear_logprobs(
                h,
                weight,
                targets,
                bias=bias,
                temperature=self.temperature,
                ignore_index=IGNORE_INDEX,
                return_entropy=return_entropy,
                chunk_size=self.chunk_size,
                backend=self.backend,
            )
            out = out if isinstance(out, tuple) else (out,)
            if return_correct:
                out = out + (_count_correct(h, weight, bias, targets),)
            if return_hidden:
                out = out + (states,)
            return out if len(out) > 1 else out[0]

        return forward_call(model, run)

    def ppo_loss(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        start: int,
        normalizer=None,
        **options,
    ):
        """:func:`rlhf_kernels.fused_linear_ppo_loss` on the hidden states of positions ``start .. T-2`` of
        ``input_ids, attention_mask (B, T)``, which predict ``labels (B, R)`` (``R = T-1-start``; a PPO batch with
        prompt length ``P``: ``start = P-1``, ``labels = input_ids[:, P:]``); ``old_logprobs, advantages, mask
        (B, R)``; ``options``: its loss options (clip ranges, ``agg``, ``entropy_coef`` ...). One
        ``forward_call`` of ``model``. Returns ``(loss, stats)``."""

        def run():
            states = self._hidden(model, input_ids, attention_mask, start)  # (B, R, H)
            weight, bias = self.params(model, states.hidden.dtype, states.hidden.device)
            return rlhf_kernels.fused_linear_ppo_loss(
                states.hidden,
                weight,
                labels,
                old_logprobs,
                advantages,
                mask,
                bias=bias,
                temperature=self.temperature,
                normalizer=normalizer,
                chunk_size=self.chunk_size,
                backend=self.backend,
                **options,
            )

        return forward_call(model, run)

    def dpo_loss(
        self, model, input_ids, attention_mask, labels, ref_chosen, ref_rejected, *, normalizer=None, **options
    ):
        """:func:`rlhf_kernels.fused_linear_dpo_loss` of a pair batch: ``input_ids, attention_mask, labels (2B, T)``
        (chosen rows first; ``labels`` ``IGNORE_INDEX`` on prompt and padding, hidden state ``t`` predicts
        ``labels[:, t+1]``); ``ref_chosen, ref_rejected (B,)`` or None; ``options``: ``beta, loss_type,
        label_smoothing, gamma, average_log_prob``. One ``forward_call`` of ``model``. Returns ``(loss, stats)``."""
        op, refs = rlhf_kernels.fused_linear_dpo_loss, (ref_chosen, ref_rejected)
        return self._sequence_loss(op, model, input_ids, attention_mask, labels, refs, normalizer, options)

    def kto_loss(self, model, input_ids, attention_mask, labels, ref_logps, desirable, *, normalizer=None, **options):
        """:func:`rlhf_kernels.fused_linear_kto_loss` of a batch of examples: ``input_ids, attention_mask, labels
        (B, T)`` as for :meth:`dpo_loss`; ``ref_logps (B,)``, ``desirable (B,)`` bool; ``options``: ``kl`` (the
        reference point z), ``beta, desirable_weight, undesirable_weight``. One ``forward_call`` of ``model``."""
        op, args = rlhf_kernels.fused_linear_kto_loss, (ref_logps, desirable)
        return self._sequence_loss(op, model, input_ids, attention_mask, labels, args, normalizer, options)

    def _sequence_loss(self, op, model, input_ids, attention_mask, labels, args, normalizer, options):
        """A fused sequence-level loss ``op(hidden, weight, labels[:, 1:], *args, ...)`` in one forward call."""

        def run():
            states = self._hidden(model, input_ids, attention_mask, 0)  # (S, T-1, H)
            weight, bias = self.params(model, states.hidden.dtype, states.hidden.device)
            return op(
                states.hidden,
                weight,
                labels[:, 1:].to(states.hidden.device),
                *args,
                bias=bias,
                ignore_index=IGNORE_INDEX,
                normalizer=normalizer,
                chunk_size=self.chunk_size,
                backend=self.backend,
                **options,
            )

        return forward_call(model, run)

    def kl(self, states: HeadStates, ref_states: HeadStates, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Exact per-token KL(pi || pi_ref) over the vocabulary ``(...)`` fp32 from both models' hidden states
        (:func:`rlhf_kernels.fused_linear_kl`); the reference gets no gradient.

        Without gradients only (the rollout's exact KL, the evaluation): the states come from earlier calls
        (:meth:`hidden`, ``logprobs(return_hidden=True)``), and this one reads both heads inside a forward call of
        each model (one call when both are the same model, e.g. a LoRA policy and its adapter-free base)."""

        def run():
            h = states.hidden
            ref_h = ref_states.hidden.to(h.device)
            weight, bias = self.params(states.model, h.dtype, h.device)
            ref_weight, ref_bias = self.params(ref_states.model, ref_h.dtype, h.device)
            return rlhf_kernels.fused_linear_kl(
                h,
                weight,
                ref_h,
                ref_weight.detach(),
                bias=bias,
                ref_bias=None if ref_bias is None else ref_bias.detach(),
                temperature=self.temperature,
                mask=None if mask is None else mask.to(h.device),
                chunk_size=self.chunk_size,
                backend=self.backend,
            )

        if ref_states.model is states.model:
            return forward_call(states.model, run)
        return forward_call(states.model, lambda: forward_call(ref_states.model, run))


CORRECT_CHUNK_ROWS = 1024  # rows of logits the argmax count of LMHead.logprobs holds at a time


@torch.no_grad()
def _count_correct(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """Number of ``targets (...)`` (``IGNORE_INDEX`` skipped) that are the argmax of ``hidden (..., H)`` through
    the head ``weight, bias``, in chunks of :data:`CORRECT_CHUNK_ROWS` rows (no full logits): 0-dim int64."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    h, t = hidden.detach().reshape(-1, hidden.shape[-1])[keep], targets.reshape(-1)[keep]
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    for i in range(0, h.shape[0], CORRECT_CHUNK_ROWS):
        rows = slice(i, i + CORRECT_CHUNK_ROWS)
        correct += (F.linear(h[rows], weight, bias).argmax(-1) == t[rows]).sum()
    return correct


class RewardModel(nn.Module):
    """A causal LM's backbone plus a scalar head read at the last real token of each row.

    ``forward(input_ids, attention_mask) -> rewards (B,)`` fp32. The last real token is the last position whose
    mask is 1, so left and right padding give the same reward (positions also come from the mask). Saved as a
    ``save_pretrained`` directory (the backbone, loadable with ``AutoModel``) plus ``score_head.safetensors``.
    """

    def __init__(self, backbone: nn.Module, score: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if score is None:
            score = nn.Linear(hidden, 1, bias=True)
            nn.init.normal_(score.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(score.bias)
        self.score = score.to(device=next(backbone.parameters()).device)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("RewardModel: a row of attention_mask has no real token to score")
        hidden = last_hidden(self.backbone, input_ids, attention_mask)  # (B, T, H)
        positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(-1)  # (B,) last real token
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.score(picked.to(self.score.weight.dtype)).squeeze(-1).to(torch.float32, copy=True)

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head at every position: ``(B, T)`` fp32 (a critic's per-token values; padding gives garbage)."""
        hidden = last_hidden(self.backbone, input_ids, attention_mask)  # (B, T, H)
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).to(torch.float32, copy=True)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the backbone (LoRA merged in) with ``save_pretrained`` and the head beside it."""
        from safetensors.torch import save_file

        path = Path(path)
        backbone = self.backbone
        if hasattr(backbone, "merge_and_unload"):  # a copy, so training can go on with the adapters
            import copy

            backbone = copy.deepcopy(backbone).merge_and_unload()
        backbone.save_pretrained(path)
        head = {k: v.detach().contiguous().cpu() for k, v in self.score.state_dict().items()}
        save_file(head, str(path / HEAD_FILE))
        (path / HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.score.in_features}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False):
        """Load a directory written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        from .errors import MissingPathError

        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise MissingPathError(f"{path} has no {HEAD_FILE}: not a saved RewardModel")
        backbone = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
        model = cls(backbone)
        model.score.load_state_dict(load_file(str(path / HEAD_FILE)))
        return model


def load_reward_model(
    name_or_path: str,
    tokenizer,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> RewardModel:
    """A saved :class:`RewardModel`, or a new one on the backbone of a causal LM (built-in or from the hub/disk)."""
    if name_or_path not in BUILTIN_MODELS and (Path(name_or_path) / HEAD_FILE).is_file():
        model = RewardModel.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        _fit_to_tokenizer(model.backbone, tokenizer)
    else:
        lm = load_causal_lm(
            name_or_path, tokenizer, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, seed=seed
        )
        torch.manual_seed(seed)
        model = RewardModel(lm.get_decoder())
    model = model.to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model.backbone)
    return model
