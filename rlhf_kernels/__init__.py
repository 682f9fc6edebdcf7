"""rlhf-kernels: fused kernels for LLM post-training.

Ops: :func:`logprobs`, :func:`entropy`, :func:`fused_linear_logprobs` (per-token log-probs and entropy);
:func:`kl_penalty` (sampled-token KL estimators), :func:`kl_from_logits`, :func:`fused_linear_kl` (exact KL to
the reference over the vocabulary); :func:`gae`, :func:`masked_mean`, :func:`masked_var`, :func:`masked_whiten`,
:func:`token_rewards`, :func:`group_advantages` (advantages for PPO, GRPO and RLOO).

Backends: Triton (GPU), CUDA C++ and CPU C++ (``rlhf_kernels._C``, optional), and the PyTorch reference
(``rlhf_kernels.reference``).
"""

from . import reference
from ._backend import BACKENDS, available_backends, backend_status
from .ops.fused_linear_kl import fused_linear_kl
from .ops.fused_linear_logprobs import fused_linear_logprobs
from .ops.gae import gae
from .ops.group_advantages import broadcast_to_tokens, group_advantages
from .ops.kl import kl_from_logits
from .ops.kl_penalty import kl_penalty
from .ops.logprobs import entropy, logprobs
from .ops.masked_stats import masked_mean, masked_var, masked_whiten
from .ops.token_rewards import token_rewards

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "broadcast_to_tokens",
    "backend_status",
    "entropy",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "gae",
    "group_advantages",
    "kl_from_logits",
    "kl_penalty",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs",
    "reference",
    "token_rewards",
]
