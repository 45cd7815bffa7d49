"""Stage 1: lung segmentation (FC-DenseNet or segmentation-models-pytorch), post-processing, batch job."""
from .bundle import load_bundle, save_bundle
from .fcdensenet import PRESETS, FCDenseNet, FCDenseNetConfig, create_fcdensenet
from .model import build_segmentation_model
from .postprocess import keep_largest_components, postprocess_mask
from .segmenter import LungCheck, Segmentation, Segmenter, default_bundle_path

__all__ = [
    "FCDenseNet", "FCDenseNetConfig", "PRESETS", "create_fcdensenet", "build_segmentation_model",
    "keep_largest_components", "postprocess_mask", "load_bundle", "save_bundle",
    "LungCheck", "Segmentation", "Segmenter", "default_bundle_path",
]
