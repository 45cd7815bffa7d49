"""patchflannel: lung-masked patch ensembles for COVID-19 and pneumonia on chest X-rays.

Stage 1 (lung segmentation, masked stores) lives in :mod:`patchflannel.segment` and
:mod:`patchflannel.store`; image decoding in :mod:`patchflannel.io`. Stage 2 (patch
learners, batched patch inference) in :mod:`patchflannel.learners`; the FLANNEL weight
module and focal loss in :mod:`patchflannel.ensemble`. :class:`Pipeline` runs all of it on
image files or arrays (``python -m patchflannel.predict`` over folders).
"""
from .errors import (
    DataNotFoundError,
    InvalidImageError,
    PatchflannelError,
    WeightsError,
)

__version__ = "0.1.0"

# Imported on first use, so `import patchflannel` stays light (no torch until needed).
_LAZY = {
    "FocalLoss": "ensemble", "FlannelWeightModule": "ensemble",
    "PatchEngine": "learners", "create_learner": "learners",
    "Pipeline": "pipeline", "Prediction": "pipeline",
}

__all__ = [
    "DataNotFoundError", "FlannelWeightModule", "FocalLoss", "InvalidImageError", "PatchEngine",
    "PatchflannelError", "Pipeline", "Prediction", "WeightsError", "__version__", "create_learner",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
