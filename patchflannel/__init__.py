"""patchflannel: lung-masked patch ensembles for COVID-19 and pneumonia on chest X-rays.

Stage 1 (lung segmentation, masked stores) lives in :mod:`patchflannel.segment` and
:mod:`patchflannel.store`; image decoding in :mod:`patchflannel.io`.
"""
from .errors import DataNotFoundError, InvalidImageError, PatchflannelError, WeightsError

__version__ = "0.1.0"

__all__ = ["DataNotFoundError", "InvalidImageError", "PatchflannelError", "WeightsError", "__version__"]
