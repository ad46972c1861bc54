"""Drop-in uses of the ops in other trainers.

- ``elva_kernels.integrations.trl``: ``elva_reward_function(embed)``, a reward function for TRL's
  ``GRPOTrainer`` (``fn(prompts, completions, **columns) -> list[float]``), and
  ``rewards_for_groups``, the same rewards for custom loops holding flat [B*G, d] embeddings.

Neither needs TRL installed to import.
"""
from elva_kernels.integrations.trl import elva_reward_function, rewards_for_groups

__all__ = ["elva_reward_function", "rewards_for_groups"]
