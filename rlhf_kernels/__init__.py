"""rlhf-kernels: fused kernels for LLM post-training.

Ops: :func:`logprobs`, :func:`entropy`, :func:`fused_linear_logprobs` (per-token log-probs and entropy);
:func:`kl_penalty` (sampled-token KL estimators), :func:`kl_from_logits`, :func:`fused_linear_kl` (exact KL to
the reference over the vocabulary). Backends: Triton (GPU), CUDA C++ and
CPU C++ (``rlhf_kernels._C``, optional), and the PyTorch reference (``rlhf_kernels.reference``).
"""

from . import reference
from ._backend import BACKENDS, available_backends, backend_status
from .ops.fused_linear_kl import fused_linear_kl
from .ops.fused_linear_logprobs import fused_linear_logprobs
from .ops.kl import kl_from_logits
from .ops.kl_penalty import kl_penalty
from .ops.logprobs import entropy, logprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "entropy",
    "fused_linear_kl",
    "fused_linear_logprobs",
    "kl_from_logits",
    "kl_penalty",
    "logprobs",
    "reference",
]
