"""rlhf-kernels: fused kernels for LLM post-training.

Ops: :func:`logprobs`, :func:`entropy`, :func:`fused_linear_logprobs` (per-token log-probs and entropy);
:func:`kl_penalty` (sampled-token KL estimators), :func:`kl_from_logits`, :func:`fused_linear_kl` (exact KL to
the reference over the vocabulary); :func:`gae`, :func:`masked_mean`, :func:`masked_var`, :func:`masked_whiten`,
:func:`token_rewards`, :func:`group_advantages` (advantages for PPO, GRPO and RLOO); :func:`ppo_policy_loss`,
:func:`ppo_value_loss`, :func:`aggregate_loss`, :func:`fused_linear_ppo_loss` (PPO / GRPO losses);
:func:`dpo_loss`, :func:`fused_linear_dpo_loss` (the DPO family); :func:`kto_loss`,
:func:`fused_linear_kto_loss` (KTO, unpaired feedback); :func:`ranked_reward_loss` (reward models on K ranked
responses); :func:`aggregation_denominator` (the ``normalizer=`` of these losses for a step split into
micro-batches).

Backends: Triton (GPU), CUDA C++ and CPU C++ (``rlhf_kernels._C``, optional), and the PyTorch reference
(``rlhf_kernels.reference``).
"""

from . import reference
from ._backend import BACKENDS, available_backends, backend_status
from .ops._policy_inputs import LOSS_TYPES, RATIO_LEVELS
from .ops.aggregation import AGG_MODES, aggregate_loss, aggregation_denominator
from .ops.dpo_loss import DPO_LOSS_TYPES, dpo_loss
from .ops.fused_linear_dpo_loss import fused_linear_dpo_loss
from .ops.fused_linear_kl import fused_linear_kl
from .ops.fused_linear_kto_loss import fused_linear_kto_loss
from .ops.fused_linear_logprobs import fused_linear_logprobs
from .ops.fused_linear_ppo_loss import fused_linear_ppo_loss
from .ops.gae import gae
from .ops.group_advantages import broadcast_to_tokens, group_advantages
from .ops.kl import kl_from_logits
from .ops.kl_penalty import KL_ESTIMATORS, KL_PENALTY_KINDS, kl_penalty
from .ops.kto_loss import kto_loss
from .ops.logprobs import entropy, logprobs
from .ops.masked_stats import masked_mean, masked_var, masked_whiten
from .ops.ppo_loss import ppo_policy_loss, ppo_value_loss
from .ops.ranked_reward_loss import RANK_LOSS_MODES, ranked_reward_loss
from .ops.token_rewards import token_rewards

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "BACKENDS",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "KL_PENALTY_KINDS",
    "LOSS_TYPES",
    "RANK_LOSS_MODES",
    "RATIO_LEVELS",
    "aggregate_loss",
    "aggregation_denominator",
    "available_backends",
    "broadcast_to_tokens",
    "backend_status",
    "dpo_loss",
    "entropy",
    "fused_linear_dpo_loss",
    "fused_linear_kl",
    "fused_linear_kto_loss",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "gae",
    "group_advantages",
    "kl_from_logits",
    "kl_penalty",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranked_reward_loss",
    "reference",
    "token_rewards",
]
