"""Stage 2: patch-based base learners (backbone registry, batched patch inference, training)."""
from .engine import PatchEngine, PatchPredictions, vote
from .registry import PRESETS, Normalization, create_learner

__all__ = ["PRESETS", "Normalization", "PatchEngine", "PatchPredictions", "create_learner", "vote"]
