"""Drop-in uses of the ops in other trainers. None needs its trainer installed to import.

- ``elva_kernels.integrations.trl``: ``elva_reward_function(embed)``, a reward function for TRL's
  ``GRPOTrainer`` (``fn(prompts, completions, **columns) -> list[float]``), and
  ``rewards_for_groups``, the same rewards for custom loops holding flat [B*G, d] embeddings.
- ``elva_kernels.integrations.sentence_transformers``: ``MultipleNegativesRankingLoss`` on
  ``infonce_loss`` (imported on first use: it needs sentence-transformers).
- ``elva_kernels.integrations.open_clip``: ``ClipLoss`` on ``infonce_loss``.
"""
from elva_kernels.integrations.open_clip import ClipLoss
from elva_kernels.integrations.trl import elva_reward_function, rewards_for_groups

__all__ = ["ClipLoss", "MultipleNegativesRankingLoss", "elva_reward_function", "rewards_for_groups"]


def __getattr__(name: str):
    if name == "MultipleNegativesRankingLoss":
        from elva_kernels.integrations.sentence_transformers import MultipleNegativesRankingLoss

        return MultipleNegativesRankingLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
