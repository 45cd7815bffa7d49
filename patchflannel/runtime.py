"""Inference backends: eager PyTorch, or the same network exported to ONNX and run by ONNX Runtime.

On a CPU without native bf16 kernels, ONNX Runtime runs the EfficientNet-Lite learners and
their trunks about twice as fast as eager PyTorch in float32 (``benchmarks/learner_train_speed.py``).
`onnx_model` exports a module once (the ``torch.onnx`` exporter), caches the graph under a
name derived from the module's weights and input shape (a changed bundle gets a new graph;
stale graphs of a bundle folder are removed), and checks the exported graph against the
module on a fixed input before it is used. The result is called like the module: a torch
tensor in, a torch tensor out.

``backend="auto"`` is ONNX Runtime on a CPU when ``onnxruntime`` is installed
(``pip install patchflannel[fast]``), else eager PyTorch. Nothing here downloads anything.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import PatchflannelError
from .files import atomic_write

__all__ = ["BACKENDS", "BACKEND_HELP", "BackendError", "OnnxModel", "cache_folder", "has_onnxruntime", "onnx_model",
           "resolve_backend", "weights_key"]

log = logging.getLogger(__name__)

#: What ``backend=`` accepts.
BACKENDS = ("auto", "torch", "onnxruntime")
#: Largest relative difference between the exported graph's outputs and the module's on the
#: check input (float32 kernels in another order differ by ~1e-5).
TOLERANCE = 1e-3
CACHE_ENV = "PATCHFLANNEL_CACHE"
#: The ``--backend`` option's help, shared by every command.
BACKEND_HELP = ("torch (eager PyTorch), onnxruntime (the networks exported to ONNX and checked against PyTorch, "
                "on the CPU; pip install 'patchflannel[fast]') or auto (onnxruntime on a CPU when installed)")


class BackendError(PatchflannelError):
    """A backend that is not installed, or an exported graph that disagrees with its module."""


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"onnxruntime"`` for ``backend`` on ``device`` (``auto``: ONNX Runtime on
    a CPU when installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        return "onnxruntime" if device.type == "cpu" and has_onnxruntime() else "torch"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise BackendError(f"the onnxruntime backend runs on the CPU, not {device}: use backend='torch' there")
        if not has_onnxruntime():
            raise BackendError("backend 'onnxruntime' needs the onnxruntime package: pip install 'patchflannel[fast]'")
    return backend


def weights_key(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A name for ``module``'s exported graph: a hash of its weights and buffers, the input shape
    (batch left free) and the exporter's version."""
    digest = hashlib.sha256(f"{torch.__version__}|{tuple(input_shape[1:])}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def cache_folder(bundle: str | os.PathLike | None = None) -> Path:
    """Where exported graphs are kept: ``BUNDLE/.onnx`` when the bundle folder is writable, else
    ``$PATCHFLANNEL_CACHE`` or ``~/.cache/patchflannel/onnx``."""
    if bundle is not None and os.access(bundle, os.W_OK):
        return Path(bundle) / ".onnx"
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "patchflannel" / "onnx")


class OnnxModel:
    """An exported network run by ONNX Runtime, called like the module it came from."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {"x": array})[0])

    # What the engine and the segmenter do to their modules: nothing to do here.
    def eval(self) -> OnnxModel:
        return self

    def to(self, *args, **kwargs) -> OnnxModel:
        return self


def _export(module: nn.Module, example: torch.Tensor, path) -> None:
    with warnings.catch_warnings():  # the TorchScript-based exporter (the dynamo one needs onnxscript)
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)


def onnx_model(module: nn.Module, input_shape: tuple[int, ...], folder: str | os.PathLike,
               threads: int | None = None) -> OnnxModel:
    """``module`` exported for inputs of ``input_shape`` (any batch size) and run by ONNX Runtime.

    The graph is ``folder/<weights_key>.onnx``, exported on first use; other graphs in ``folder``
    (older weights) are removed then. Before it is returned, the graph is run on a fixed random
    input and compared with the module.

    Raises:
        BackendError: onnxruntime missing, or outputs that differ by more than `TOLERANCE`.
    """
    if not has_onnxruntime():
        raise BackendError("the onnxruntime backend needs the onnxruntime package: pip install 'patchflannel[fast]'")
    module = module.cpu().eval().to(memory_format=torch.contiguous_format)
    folder = Path(folder)
    path = folder / f"{weights_key(module, input_shape)}.onnx"
    example = torch.randn(2, *input_shape[1:], generator=torch.Generator().manual_seed(0))
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log.info("exporting %s to %s", type(module).__name__, path)
        atomic_write(path, lambda tmp: _export(module, example, tmp))
        for stale in folder.glob("*.onnx"):
            if stale != path and folder.name == ".onnx":  # a bundle's own cache: one graph per bundle
                stale.unlink(missing_ok=True)
    model = OnnxModel(path, threads)
    with torch.inference_mode():
        expected = module(example).float()
    got = model(example)
    gap = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
    if not gap <= TOLERANCE:
        raise BackendError(f"{path}: the exported graph differs from {type(module).__name__} by {gap:.2g} "
                           f"(relative; at most {TOLERANCE}): delete the file to export it again, or use "
                           "backend='torch'")
    return model
