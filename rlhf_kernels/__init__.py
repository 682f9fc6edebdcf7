"""rlhf-kernels: fused kernels for LLM post-training.

Ops: :func:`logprobs`, :func:`entropy`, :func:`fused_linear_logprobs`. Backends: Triton (GPU), CUDA C++ and
CPU C++ (``rlhf_kernels._C``, optional), and the PyTorch reference (``rlhf_kernels.reference``).
"""

from . import reference
from ._backend import BACKENDS, available_backends, backend_status
from .ops.fused_linear_logprobs import fused_linear_logprobs
from .ops.logprobs import entropy, logprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_status",
    "entropy",
    "fused_linear_logprobs",
    "logprobs",
    "reference",
]
