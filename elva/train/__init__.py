"""Trainers: stages 1-2 (contrastive InfoNCE, :mod:`elva.train.contrastive`), stage 3 (GRPO, :mod:`elva.train.grpo`)
and their checkpoints."""
from elva.train.contrastive import run_training
from elva.train.grpo import run_grpo

__all__ = ["run_training", "run_grpo", "run_stage"]


def run_stage(config):
    """Train the stage ``config.train.stage`` names; returns the final model folder."""
    return run_grpo(config) if config.train.stage == 3 else run_training(config)
