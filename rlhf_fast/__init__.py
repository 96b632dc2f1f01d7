"""rlhf_fast: fused kernels for the loss side of LLM RL fine-tuning (PPO, GRPO, DPO).

Functional ops (each docstring gives shapes, dtypes and defaults), two `nn.Module` wrappers, and
`rlhf_fast.reference`, the pure-PyTorch ground truth with the same API. Importing the package
touches neither CUDA nor Triton: the kernels load on first use.
"""

from rlhf_fast import reference
from rlhf_fast._version import __version__
from rlhf_fast.advantages import discounted_returns, gae, group_advantages, masked_whiten
from rlhf_fast.aggregation import aggregate
from rlhf_fast.dpo import dpo_loss, dpo_loss_from_logits
from rlhf_fast.kl import kl_penalty, shape_rewards
from rlhf_fast.linear import linear_logprobs
from rlhf_fast.modules import DPOLoss, PPOLoss
from rlhf_fast.ppo import ppo_policy_loss, ppo_value_loss
from rlhf_fast.ppo_from_logits import ppo_loss_from_logits
from rlhf_fast.token_logprobs import entropy, logprobs, sequence_logprobs

# The API contract (DESIGN.md): public name -> defining module.
_EXPORTS = {
    "logprobs": "rlhf_fast.token_logprobs",
    "entropy": "rlhf_fast.token_logprobs",
    "sequence_logprobs": "rlhf_fast.token_logprobs",
    "linear_logprobs": "rlhf_fast.linear",
    "kl_penalty": "rlhf_fast.kl",
    "shape_rewards": "rlhf_fast.kl",
    "gae": "rlhf_fast.advantages",
    "discounted_returns": "rlhf_fast.advantages",
    "masked_whiten": "rlhf_fast.advantages",
    "group_advantages": "rlhf_fast.advantages",
    "aggregate": "rlhf_fast.aggregation",
    "ppo_policy_loss": "rlhf_fast.ppo",
    "ppo_value_loss": "rlhf_fast.ppo",
    "ppo_loss_from_logits": "rlhf_fast.ppo_from_logits",
    "dpo_loss": "rlhf_fast.dpo",
    "dpo_loss_from_logits": "rlhf_fast.dpo",
    "PPOLoss": "rlhf_fast.modules",
    "DPOLoss": "rlhf_fast.modules",
}

__all__ = ["__version__", "reference", *_EXPORTS]
