"""Stage 1: lung segmentation (FC-DenseNet or segmentation-models-pytorch), post-processing, batch job."""
from .bundle import load_bundle, save_bundle
from .fcdensenet import PRESETS, FCDenseNet, FCDenseNetConfig, create_fcdensenet
from .gate import LungCheck, lung_features
from .model import build_segmentation_model
from .postprocess import keep_largest_components, postprocess_mask
from .segmenter import Segmentation, Segmenter

__all__ = [
    "PRESETS",
    "FCDenseNet",
    "FCDenseNetConfig",
    "LungCheck",
    "Segmentation",
    "Segmenter",
    "build_segmentation_model",
    "create_fcdensenet",
    "keep_largest_components",
    "load_bundle",
    "lung_features",
    "postprocess_mask",
    "save_bundle",
]
