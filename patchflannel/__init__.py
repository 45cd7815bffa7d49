"""patchflannel: lung-masked patch ensembles for COVID-19 and pneumonia on chest X-rays.

The whole method in one object::

    from patchflannel import Pipeline
    pipe = Pipeline.from_pretrained("lite")    # the shipped bundle, by name, offline
    pred = pipe.predict("chest.png")           # .label, .probabilities, .rejection, ...

Public names (imported on first use, so ``import patchflannel`` stays light):

* `Pipeline`, `Prediction`, `write_predictions`: the pipeline, one
  input's result, and writing results to CSV/JSON.
* `PatchEngine`, `create_learner`: batched patch inference; patch-learner backbones.
* `FlannelWeightModule`, `FocalLoss`: the FLANNEL weight module and multiclass focal loss.
* `Segmenter`, `load_image`: Stage 1 lung segmentation; decoding CXR files.
* Errors: `PatchflannelError` (base), `InvalidImageError`, `WeightsError`,
  `DataNotFoundError`.

The package reads as the pipeline: `patchflannel.io` and `patchflannel.preprocess` (decoding,
preprocessing), `patchflannel.segment` (Stage 1), `patchflannel.store` (masked films),
`patchflannel.patches`, `patchflannel.learners` and `patchflannel.ensemble` (Stage 2),
`patchflannel.pipeline`; support code in `patchflannel.training`, `patchflannel.evaluation`
and `patchflannel.jobs`; shipped bundles by name in `patchflannel.hub`. The ``patchflannel``
command (`patchflannel.cli`) runs the jobs: ``patchflannel predict``, ``patchflannel segment``...
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
