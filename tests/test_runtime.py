"""Inference backends: the ONNX Runtime graphs agree with PyTorch, are cached by weights, are
refused when they disagree, and the pipeline gives the same predictions through either."""
import numpy as np
import pytest
import torch

from patchflannel.learners.registry import create_learner
from patchflannel.runtime import BackendError, onnx_model, resolve_backend, weights_key

pytest.importorskip("onnxruntime")


def test_exported_graph_agrees_is_cached_by_weights_and_replaced_when_stale(tmp_path):
    folder = tmp_path / ".onnx"  # a bundle's own cache folder
    model = create_learner("efficientnet_lite0").eval()
    graph = onnx_model(model, (1, 1, 96, 96), folder)
    x = torch.randn(5, 1, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert float((graph(x) - model(x)).abs().max()) < 1e-4
    (path,) = folder.glob("*.onnx")
    mtime = path.stat().st_mtime_ns
    onnx_model(model, (1, 1, 96, 96), folder)  # the same weights: the cached graph
    assert path.stat().st_mtime_ns == mtime
    with torch.no_grad():
        model.classifier.bias += 1  # a new bundle version
    onnx_model(model, (1, 1, 96, 96), folder)
    (new,) = folder.glob("*.onnx")
    assert new != path and new.stem == weights_key(model, (1, 1, 96, 96))


def test_a_graph_that_disagrees_with_its_module_is_refused(tmp_path):
    model, other = create_learner("efficientnet_lite0").eval(), create_learner("efficientnet_lite0").eval()
    with torch.no_grad():
        other.classifier.weight.normal_()
    folder = tmp_path / "cache"
    onnx_model(other, (1, 1, 64, 64), folder).path.rename(folder / f"{weights_key(model, (1, 1, 64, 64))}.onnx")
    with pytest.raises(BackendError, match="differs"):
        onnx_model(model, (1, 1, 64, 64), folder)


def test_backend_names_are_checked():
    assert resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", torch.device("cpu"))
    with pytest.raises(BackendError, match="CPU"):
        resolve_backend("onnxruntime", torch.device("cuda"))


@pytest.mark.slow
def test_pipeline_through_onnxruntime_predicts_what_pytorch_does(pipeline, cxr4_rows, tmp_path, monkeypatch):
    from patchflannel import Pipeline

    monkeypatch.setenv("PATCHFLANNEL_CACHE", str(tmp_path))
    films = [r["image"] for r in cxr4_rows[::300][:4]]
    fast = Pipeline.from_bundles(device="cpu", k=pipeline.engine.k, backend="onnxruntime")
    assert fast.backend == "onnxruntime" and fast.segmenter.backend == "onnxruntime"
    for eager, onnx in zip(pipeline.predict(films), fast.predict(films)):
        assert onnx.label == eager.label and np.array_equal(onnx.mask, eager.mask)
        assert np.array_equal(onnx.centres, eager.centres)
        assert max(abs(onnx.probabilities[c] - eager.probabilities[c]) for c in eager.probabilities) < 1e-4
    assert fast.predict(films[0], explain=True).heatmap is not None  # Grad-CAM on the PyTorch networks
