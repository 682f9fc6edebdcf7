"""Models for training: tokenizer, policy (causal LM), reward model, LoRA, and the fused log-prob forward.

The policy forward used for training never materialises the ``(B, T, V)`` logits: it runs the backbone to the
last hidden states and hands them with the LM head weight to :func:`rlhf_kernels.fused_linear_logprobs`.
Positions come from the attention mask (``cumsum - 1``), so a left-padded row scores like its right-padded twin.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import rlhf_kernels

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

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
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


def causal_lm_parts(model) -> tuple[nn.Module, nn.Linear]:
    """``(backbone, lm_head)`` of a causal LM, a LoRA-wrapped one included."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


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


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_hidden: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
):
    """Per-token log-probs of ``labels`` under a causal LM, through the fused head (no full logits).

    ``input_ids, attention_mask, labels``: ``(B, T)``; ``labels[t]`` is the token at position ``t`` or
    ``IGNORE_INDEX``. Returns fp32 ``logprobs (B, T-1)`` for the targets ``labels[:, 1:]`` (0 where ignored), then
    ``entropy (B, T-1)`` and ``(hidden (B, T-1, H), lm_head)`` when asked.
    """
    backbone, head = causal_lm_parts(model)
    hidden = last_hidden(backbone, input_ids, attention_mask)[:, :-1]
    hidden = hidden.to(head_dtype(hidden, head))
    weight = head.weight.to(hidden.dtype)
    bias = None if head.bias is None else head.bias.to(hidden.dtype)
    out = rlhf_kernels.fused_linear_logprobs(
        hidden,
        weight,
        labels[:, 1:],
        bias=bias,
        temperature=temperature,
        ignore_index=IGNORE_INDEX,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        backend=backend,
    )
    out = out if isinstance(out, tuple) else (out,)
    if return_hidden:
        out = out + ((hidden, head),)
    return out if len(out) > 1 else out[0]


def head_dtype(hidden: torch.Tensor, head: nn.Linear) -> torch.dtype:
    """The dtype the fused head runs in: the autocast dtype inside autocast (as ``nn.Linear`` would), else the
    head weight's dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return head.weight.dtype


@torch.no_grad()
def token_accuracy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Number of targets that are the argmax of ``head(hidden)``, computed in row chunks (no full logits).

    ``hidden (..., H)``, ``targets (...)`` with ``IGNORE_INDEX`` skipped. Returns a 0-dim int64 tensor.
    """
    keep = targets.reshape(-1) != IGNORE_INDEX
    h, t = hidden.reshape(-1, hidden.shape[-1])[keep], targets.reshape(-1)[keep]
    weight = head.weight.to(h.dtype)
    bias = None if head.bias is None else head.bias.to(h.dtype)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    for i in range(0, h.shape[0], chunk):
        correct += (F.linear(h[i : i + chunk], weight, bias).argmax(-1) == t[i : i + chunk]).sum()
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
        return self.score(picked.to(self.score.weight.dtype)).squeeze(-1).float()

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head at every position: ``(B, T)`` fp32 (a critic's per-token values; padding gives garbage)."""
        hidden = last_hidden(self.backbone, input_ids, attention_mask)  # (B, T, H)
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()

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

        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {HEAD_FILE}: not a saved RewardModel")
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
