"""Trainers: stages 1-2 (contrastive InfoNCE) and their checkpoints."""
from elva.train.contrastive import run_training

__all__ = ["run_training"]
