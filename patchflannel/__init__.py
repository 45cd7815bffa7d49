"""patchflannel: lung-masked patch ensembles for COVID-19 and pneumonia on chest X-rays.

The whole method in one object::

    from patchflannel import Pipeline
    pipe = Pipeline.from_pretrained()          # the shipped bundle, offline
    pred = pipe.predict("chest.png")           # .label, .probabilities, .rejection, ...

Public names (imported on first use, so ``import patchflannel`` stays light):

* `Pipeline`, `Prediction`, `write_predictions`: the pipeline, one
  input's result, and writing results to CSV/JSON.
* `PatchEngine`, `create_learner`: batched patch inference; patch-learner backbones.
* `FlannelWeightModule`, `FocalLoss`: the FLANNEL weight module and multiclass focal loss.
* `Segmenter`, `load_image`: Stage 1 lung segmentation; decoding CXR files.
* Errors: `PatchflannelError` (base), `InvalidImageError`, `WeightsError`,
  `DataNotFoundError`.

Stage 1 (lung segmentation, masked stores) lives in `patchflannel.segment` and
`patchflannel.store`; image decoding in `patchflannel.io`. Stage 2 (patch
learners, batched patch inference) in `patchflannel.learners`; the FLANNEL weight
module and focal loss in `patchflannel.ensemble`. ``python -m patchflannel.segment``
and ``python -m patchflannel.predict`` run the batch jobs over folders and manifests.
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
    "FocalLoss": "losses", "FlannelWeightModule": "ensemble",
    "PatchEngine": "learners", "create_learner": "learners",
    "Pipeline": "pipeline", "Prediction": "pipeline", "write_predictions": "jobs.records",
    "Segmenter": "segment", "load_image": "io",
}

__all__ = [
    "DataNotFoundError", "FlannelWeightModule", "FocalLoss", "InvalidImageError", "PatchEngine",
    "PatchflannelError", "Pipeline", "Prediction", "Segmenter", "WeightsError", "__version__", "create_learner",
    "load_image", "write_predictions",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
