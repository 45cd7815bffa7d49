"""Grad-CAM over patches: placement, the per-patch maps, and explained pipeline predictions."""
import csv

import pytest
import torch

from patchflannel import Pipeline
from patchflannel.explain import last_conv, patch_cams, place_cams

K = 4


def test_place_cams_averages_where_patches_overlap():
    cams = torch.stack([torch.ones(8, 8), torch.full((8, 8), 3.0)])
    centres = torch.tensor([[8, 8], [8, 12]])  # second patch shifted 4 px right
    heat = place_cams(cams, centres, (32, 32), stride=1)
    assert heat[8, 5] == 1 and heat[8, 9] == 2 and heat[8, 14] == 3  # alone, overlap, alone
    assert heat[20, 20] == 0 and heat[:4].sum() == 0  # no patch covers these



@pytest.fixture(scope="module")
def film(cxr4_rows):
    return next(r["image"] for r in cxr4_rows if r["label"] == "covid")


def test_patch_cams_leave_no_hooks_or_graph(pipeline):
    model = pipeline.engine.models[0]
    layer = last_conv(model)
    patches = torch.randn(3, 1, 224, 224)
    cams = patch_cams(model, patches, torch.tensor([0, 1, 2]), batch_size=2)
    assert cams.shape == (3, 224, 224) and (cams >= 0).all() and not cams.requires_grad
    assert not layer._forward_hooks  # removed, so memory stays flat over many calls
    assert not torch.is_grad_enabled() or all(p.grad is None for p in model.parameters())


def test_explanations_backpropagate_at_most_explain_batch_size_patches_at_once(pipeline, film, monkeypatch):
    """Grad-CAM memory is bounded by the patches of one backward pass, not by K."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: seen.append((torch.is_grad_enabled(), len(args[0]))))
             for m in pipeline.engine.models]
    monkeypatch.setattr(pipeline, "explain_batch_size", 3)
    try:
        pipeline.predict(film, explain=True)
    finally:
        for h in hooks:
            h.remove()
    backward_batches = [n for grad, n in seen if grad]
    assert backward_batches and max(backward_batches) <= 3
    assert sum(backward_batches) >= pipeline.engine.k  # every patch of the vote is explained


def test_explained_prediction_has_lung_heatmaps(pipeline, film):
    plain = pipeline.predict(film)
    pred = pipeline.predict(film, explain=True)
    assert pred.probabilities == plain.probabilities and plain.heatmap is None
    side = pred.mask.shape[0] // 4
    lung = pred.mask[::4, ::4]
    assert pred.heatmap.shape == (side, side) and pred.heatmap.max() == pytest.approx(1)
    assert (pred.heatmap[~lung] == 0).all() and (pred.heatmap[lung] > 0).any()
    assert list(pred.learner_heatmaps) == pipeline.learner_names
    for m in pred.learner_heatmaps.values():
        assert m.shape == (side, side) and (m[~lung] == 0).all()
    assert "heatmap" not in pred.to_dict()


def test_predict_job_writes_overlays_inside_its_folder(pipeline, film, tmp_path):
    import cv2

    from patchflannel.predict import overlay_name, run_predict

    assert "/" not in overlay_name("../../etc/passwd") and not overlay_name("../x").startswith(".")
    counts = run_predict(film, tmp_path / "out", pipeline, explain=True, progress=False)
    assert counts["ok"] == 1
    with open(tmp_path / "out" / "predictions.csv") as f:
        (row,) = list(csv.DictReader(f))
    figure = cv2.imread(str(tmp_path / "out" / row["overlay"]))
    assert figure is not None and figure.shape[0] == 512 and figure.shape[1] > 1024
    assert float(row["entropy"]) >= 0 and row["learner_disagreement"] != ""
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == [row["overlay"].split("/")[-1]]
