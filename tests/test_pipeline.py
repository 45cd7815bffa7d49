"""Pipeline and the predict batch job, end to end on real films with the shipped bundles."""
import json
import shutil

import numpy as np
import pytest
import torch

from patchflannel import Pipeline, Prediction, WeightsError
from patchflannel.labels import CLASSES

K = 4  # patches per film: enough to exercise every stage, cheap on CPU


@pytest.fixture(scope="module")
def films(cxr4_rows):
    """Two films of each class."""
    picked = []
    for label in CLASSES:
        picked += [r["image"] for r in cxr4_rows if r["label"] == label][:2]
    return picked



def test_predicts_files_and_arrays_reproducibly(pipeline, films):
    from patchflannel.io import load_image

    preds = pipeline.predict(films)
    assert len(preds) == len(films) and all(isinstance(p, Prediction) and p.ok for p in preds)
    for p in preds:
        assert p.label in CLASSES and sum(p.probabilities.values()) == pytest.approx(1, abs=1e-4)
        assert set(p.uncertainty) == {"entropy", "vote_entropy", "learner_disagreement", "margin"}
        assert all(0 <= v <= 1 for v in p.uncertainty.values())
        assert list(p.learners) == pipeline.learner_names
        for learner in p.learners.values():
            assert sum(learner["votes"].values()) == pytest.approx(1)
        assert p.centres.shape == (K, 2) and p.mask[tuple(p.centres.T)].all()  # every centre in the lung
    single = pipeline.predict(films[0])
    array = pipeline.predict(load_image(films[0]))
    assert single.probabilities == preds[0].probabilities == array.probabilities  # seeded by content
    assert json.loads(json.dumps(single.to_dict()))["label"] == single.label


def test_pipeline_sees_what_stage1_writes(pipeline, films, tmp_path):
    """The learners classify the masked film (zero outside the lung), as they were trained:
    the pipeline's learner probabilities equal the engine's on the Stage 1 output."""
    from patchflannel.segment.job import run_batch
    from patchflannel.store import read_masked_npz

    shutil.copy(films[0], tmp_path / "film.png")
    run_batch(tmp_path / "film.png", tmp_path / "masked", pipeline.segmenter)
    stage1 = read_masked_npz(next((tmp_path / "masked").rglob("*.npz")))
    from patchflannel.io import load_image
    from patchflannel.patches import image_seed

    seed = image_seed(load_image(tmp_path / "film.png"), pipeline.engine.seed)  # what the pipeline seeds with
    direct = pipeline.engine.predict(stage1["masked_image"][None], stage1["mask"][None], seeds=[seed])
    pred = pipeline.predict(tmp_path / "film.png")
    for li, name in enumerate(pipeline.learner_names):
        got = np.array(list(pred.learners[name]["probabilities"].values()))
        np.testing.assert_allclose(got, direct.probs[0, li].numpy(), atol=1e-5)


def test_predictions_write_to_csv_and_json(pipeline, films, tmp_path):
    import csv

    from patchflannel.jobs.records import write_predictions

    preds = pipeline.predict([films[0], tmp_path / "missing.png"])
    write_predictions(preds, tmp_path / "p.csv")
    write_predictions(preds, tmp_path / "p.json")
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "rejected"] and rows[0]["predicted"] == preds[0].label
    assert float(rows[0]["p_covid"]) == pytest.approx(preds[0].probabilities["covid"])
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved[0]["learners"] == preds[0].learners and "does not exist" in saved[1]["rejection"]
    with pytest.raises(ValueError, match="csv or .json"):
        write_predictions(preds, tmp_path / "p.txt")


def test_bad_inputs_are_rejections_not_exceptions(pipeline, films, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(films[0], "rb").read()[:200])
    blank = np.zeros((600, 500), dtype=np.uint8)  # a readable image without lungs
    preds = pipeline.predict([broken, films[0], blank, tmp_path / "missing.png"])
    assert [p.ok for p in preds] == [False, True, False, False]
    assert "broken.png" in preds[0].rejection and "lungs" in preds[2].rejection
    assert "does not exist" in preds[3].rejection and preds[3].label is None


def test_weight_module_combines_the_learners(pipeline, films, tmp_path):
    from patchflannel.ensemble.fit import fit_weight_module
    from patchflannel.ensemble.module import save_weight_module

    probs = torch.softmax(torch.randn(64, len(pipeline.learner_names), 4, generator=torch.Generator().manual_seed(0)), -1)
    module = fit_weight_module(probs, probs[:, 0].argmax(-1))
    save_weight_module(tmp_path / "ens", module, learners=pipeline.learner_names, classes=list(CLASSES),
                       temperature=0.5)
    combined = Pipeline.from_bundles(ensemble=tmp_path / "ens", device="cpu", k=K)
    assert combined.temperature == 0.5
    pred = combined.predict(films[0])
    assert pred.combiner == "FLANNEL ensemble" and set(pred.learner_weights) == set(pipeline.learner_names)
    learner_probs = torch.tensor([[v["probabilities"][c] for c in CLASSES] for v in pred.learners.values()])
    expected = (module(learner_probs[None]) / 0.5).softmax(-1)[0]  # temperature-scaled logits
    assert [pred.probabilities[c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-4)
    save_weight_module(tmp_path / "ens3", fit_weight_module(probs[:, :2], probs[:, 0].argmax(-1)),
                       learners=pipeline.learner_names[:2], classes=list(CLASSES))
    with pytest.raises(WeightsError, match="combines"):
        Pipeline.from_bundles(ensemble=tmp_path / "ens3", device="cpu")

    # A saved pipeline bundle predicts exactly what the pipeline it came from predicts.
    combined.save_pretrained(tmp_path / "pipe")
    loaded = Pipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert loaded.engine.k == K and loaded.learner_names == combined.learner_names and loaded.temperature == 0.5
    again = loaded.predict(films[0])
    assert again.probabilities == pred.probabilities and again.learner_weights == pred.learner_weights
    with pytest.raises(WeightsError, match="pipeline.json"):
        Pipeline.from_pretrained(tmp_path, device="cpu")


def test_predict_job_records_every_input_and_resumes(pipeline, films, tmp_path):
    from patchflannel.predict import JSONL, run_predict
    from patchflannel.jobs.records import read_records

    folder = tmp_path / "in"
    folder.mkdir()
    for f in films[:3]:
        shutil.copy(f, folder)
    (folder / "zero.png").write_bytes(b"")
    out = tmp_path / "out"
    counts = run_predict(folder, out, pipeline, batch_size=2, progress=False)
    assert counts == {"inputs": 4, "ok": 3, "rejected": 1, "error": 0, "skipped": 0, "total": 4}
    lines = (out / JSONL).read_text().splitlines()
    assert len(lines) == 4
    # A killed run leaves a torn last line; the rerun ignores it, redoes that input only.
    (out / JSONL).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    again = run_predict(folder, out, pipeline, batch_size=2, progress=False)
    assert again["skipped"] == 3 and again["ok"] + again["rejected"] == 1
    assert len(read_records(out / JSONL)) == 4
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("input,path")


def test_predict_job_keeps_manifest_columns_apart_from_the_prediction(pipeline, films, tmp_path):
    import csv

    from patchflannel.predict import run_predict

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,label,source\n" + "".join(f"{f},{lab},cxr4\n" for f, lab in
                                                         zip(films[:2], ["covid", "covid"])))
    assert run_predict(manifest, tmp_path / "out", pipeline, progress=False)["ok"] == 2
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["covid", "covid"] and all(r["source"] == "cxr4" for r in rows)
    assert all(r["predicted"] in CLASSES and float(r["p_covid"]) >= 0 for r in rows)


def test_films_segmented_by_the_job_classify_as_the_pipeline_does(pipeline, films):
    from patchflannel.io import load_image

    images = [load_image(f) for f in films[:2]]
    segs = pipeline.segmenter.segment_batch(images, original_mask=False)
    staged = pipeline.predict_segmented(images, segs, names=[str(f) for f in films[:2]])
    whole = pipeline.predict(films[:2])
    assert [p.to_dict() for p in staged] == [p.to_dict() for p in whole]
    assert all(p.ok for p in staged)


@pytest.mark.slow
def test_adaptive_k_uses_a_prefix_of_the_same_patches_and_keeps_the_labels(pipeline, cxr4_rows):
    from patchflannel.io import load_image
    from patchflannel.learners.engine import PatchEngine

    rows = [r for r in cxr4_rows if r["label"] == "covid"][:3] + [r for r in cxr4_rows if r["label"] == "normal"][:3]
    films = [pipeline.segmenter.segment(load_image(r["image"])) for r in rows]
    images = np.stack([f.masked_working_image for f in films])
    masks = np.stack([f.working_mask for f in films])
    models = dict(list(zip(pipeline.learner_names, pipeline.engine.torch_models))[:2])
    fixed = PatchEngine(models, k=16, device="cpu").predict(images, masks, return_patch_probs=True)
    adaptive = PatchEngine(models, k=16, device="cpu", adaptive=True, adaptive_min=8).predict(images, masks)
    assert set(adaptive.used.tolist()) <= {8, 16} and adaptive.used.float().mean() < 16
    for i, n in enumerate(adaptive.used.tolist()):  # the first n of the fixed run's patches
        assert torch.allclose(adaptive.probs[i], fixed.patch_probs[i, :, :n].mean(1), atol=1e-5)
    agree = (adaptive.probs.mean(1).argmax(-1) == fixed.probs.mean(1).argmax(-1)).float().mean()
    assert agree >= 5 / 6
