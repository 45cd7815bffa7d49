"""The five-fold benchmark's protocol on a small real set: folds, stacking on out-of-fold
predictions, the whole-image baseline, reports, and resuming a finished fold."""
import csv
import json

import pytest

from patchflannel.evaluation.splits import read_folds

pytestmark = pytest.mark.slow  # trains models or starts clusters: minutes


@pytest.fixture(scope="module")
def cross_validation():
    from patchflannel import cv

    return cv


def _common(packs) -> list[str]:
    return ["--packs", *map(str, packs), "--image-roots", *(str(p.with_suffix("")) for p in packs),
            "--n-folds", "3", "--folds", "0", "--learners", "resnet18", "mobilenet_v3_small", "--quick", "--no-progress"]


@pytest.fixture(scope="module")
def quick_fold(cross_validation, packs, tmp_path_factory):
    """One quick fold run as one job (shared: the scheduler test compares its jobs with it)."""
    out = tmp_path_factory.mktemp("cv") / "cv"
    argv = [*_common(packs), "--out", str(out)]
    return out, argv, cross_validation.main(argv)


def test_quick_fold_trains_stacks_on_validation_predictions_and_resumes(cross_validation, quick_fold):
    out, argv, summary = quick_fold

    folds = read_folds(out / "folds.csv")  # also checks that no patient crosses folds
    assert {r["fold"] for r in folds} == {0, 1, 2}
    with open(out / "fold0" / "split.csv") as f:
        role = {r["patient_id"]: r["split"] for r in csv.DictReader(f)}
    for r in folds:  # test fold 0, validation fold 1 (the stacking set), the rest train
        assert role[r["patient_id"]] == {0: "test", 1: "val", 2: "train"}[r["fold"]]

    result = json.loads((out / "fold0" / "result.json").read_text())
    names = ["resnet18", "mobilenet_v3_small", "mean of learners", "FLANNEL ensemble", "whole-image baseline"]
    assert list(result["models"]) == names
    test_films = sum(r["fold"] == 0 and r["label"] != "other_pneumonia" for r in folds)
    assert result["n"]["test"] == min(test_films, cross_validation.QUICK["eval_limit"])
    for entry in result["models"].values():
        assert sum(map(sum, entry["confusion_matrix"])) == result["n"]["test"]
    ensemble = json.loads((out / "fold0" / "ensemble" / "config.json").read_text())
    assert ensemble["learners"] == ["resnet18", "mobilenet_v3_small"]
    fold_of = {r["film"]: r for r in folds}  # stacked only on validation-fold films: none a learner trained on
    assert ensemble["fitted_on_films"] and all(fold_of[f]["fold"] == 1 for f in ensemble["fitted_on_films"])
    assert json.loads((out / "fold0" / "whole_image" / "bundle" / "config.json").read_text())["input"] == "whole_image"

    assert summary["folds"] == [0] and list(summary["models"]) == names
    table = (out / "summary.md").read_text()
    assert "| FLANNEL ensemble |" in table and "| whole-image baseline |" in table
    assert (out / "confusion.png").stat().st_size > 0 and (out / "pr_curves.png").stat().st_size > 0

    mtime = (out / "fold0" / "result.json").stat().st_mtime_ns
    again = cross_validation.main(argv)  # a finished fold is read back, not recomputed
    assert (out / "fold0" / "result.json").stat().st_mtime_ns == mtime
    assert again["models"]["FLANNEL ensemble"]["macro_f1"] == summary["models"]["FLANNEL ensemble"]["macro_f1"]
    assert "temperature" in result["calibration"] and "ece" in result["models"]["FLANNEL ensemble"]


def test_jobs_and_collector_reproduce_the_single_run(cross_validation, packs, quick_fold, tmp_path, capsys):
    """A scheduler's view: one job per fold x member, then the collector; same result."""
    common = _common(packs)
    cross_validation.main([*common, "--out", str(tmp_path / "jobs"), "--print-jobs"])
    commands = capsys.readouterr().out.strip().splitlines()
    # resnet18, mobilenet_v3_small, whole_image, collect
    assert len(commands) == 4 and commands[-1].endswith("--job collect")
    for job in ("resnet18", "mobilenet_v3_small"):
        cross_validation.main([*common, "--out", str(tmp_path / "jobs"), "--job", job])
    with pytest.raises(SystemExit, match="no fold has finished"):  # the baseline job has not run
        cross_validation.main([*common, "--out", str(tmp_path / "jobs"), "--job", "collect"])
    for job in ("whole_image", "collect"):
        cross_validation.main([*common, "--out", str(tmp_path / "jobs"), "--job", job])
    single = quick_fold[2]
    jobs = json.loads((tmp_path / "jobs" / "summary.json").read_text())
    for name in single["models"]:
        assert jobs["models"][name]["macro_f1"] == single["models"][name]["macro_f1"]


def test_train_without_a_pack_keeps_its_films_in_the_test_fold_only(tmp_path):
    from patchflannel.evaluation.protocol import film_id, fold_roles

    rows = [{"pack": f"/x/{pack}.h5", "index": i, "patient_id": f"{pack}-{i}", "label": "normal"}
            for pack in ("cxr4", "adult") for i in range(3)]
    folds = {film_id(r): r["index"] for r in rows}  # patient i sits in fold i
    role = fold_roles(0, 3, rows, folds, train_without=["adult"])
    assert role == {"cxr4-0": "test", "cxr4-1": "val", "cxr4-2": "train",
                    "adult-0": "test", "adult-1": "unused", "adult-2": "unused"}
    assert fold_roles(0, 3, rows, folds)["adult-2"] == "train"


def test_cohen_auc_is_pooled_over_the_folds_test_predictions(cross_validation, tmp_path):
    import numpy as np

    covid, normal = 0, 3
    folds = {  # per fold: (label, source, p(covid)); each fold alone has one Cohen non-COVID film
        0: [(covid, "cohen", 0.9), (normal, "cohen", 0.2), (normal, "nih", 0.9)],
        1: [(covid, "cohen", 0.3), (normal, "cohen", 0.6)],
    }
    for fold, films in folds.items():
        probs = np.asarray([[p, 0, 0, 1 - p] for _, _, p in films])
        (tmp_path / f"fold{fold}").mkdir()
        np.savez(tmp_path / f"fold{fold}" / "test_predictions.npz", films=np.arange(len(films)),
                 labels=np.asarray([lab for lab, _, _ in films]), sources=np.asarray([s for _, s, _ in films]),
                 FLANNEL_ensemble=probs)
    report = cross_validation.pooled_cohen(tmp_path, [0, 1], ["FLANNEL ensemble"])
    assert (report["n_covid"], report["n_noncovid"]) == (2, 2)  # the NIH film is not Cohen's
    ensemble = report["models"]["FLANNEL ensemble"]
    assert ensemble["covid_auc"] == 0.75  # pairs (0.9 > 0.2), (0.9 > 0.6), (0.3 > 0.2), (0.3 < 0.6)
    assert ensemble["noncovid_called_covid"] == 0.5  # 0.6 is called covid, 0.2 is not


def test_converged_fold_trains_on_cached_trunks_and_scores_every_baseline(cross_validation, packs, tmp_path):
    out = tmp_path / "cv"
    argv = ["--packs", *map(str, packs), "--image-roots", *(str(p.with_suffix("")) for p in packs), "--n-folds", "3",
            "--folds", "0", "--budget", "converged", "--learners", "efficientnet_lite0", "efficientnet_lite0@192",
            "--eval-k", "4", "--quick", "--no-progress", "--out", str(out)]
    summary = cross_validation.main(argv)
    names = ["efficientnet_lite0", "efficientnet_lite0@192", "mean of learners", "FLANNEL ensemble",
             "whole-image baseline", "whole masked film"]
    assert list(summary["models"]) == names
    result = json.loads((out / "fold0" / "result.json").read_text())
    assert result["k"] == 4
    for folder in ("efficientnet_lite0", "efficientnet_lite0-192px", "whole_image", "whole_masked"):
        assert (out / "fold0" / folder / "learning_curve.png").stat().st_size > 0
        assert (out / "fold0" / folder / "predictions.npz").is_file()
    study = summary["k_study"]
    assert study["k"] == [1, 2, 4] and set(study["folds"]["0"]) == {*names[:4]}
    assert all(0 <= f1 <= 1 for curve in study["folds"]["0"].values() for f1 in curve)
    assert [c["member"] for c in summary["candidates"]["0"]] and len(summary["candidates"]["0"]) == 2
    config = json.loads((out / "fold0" / "efficientnet_lite0-192px" / "bundle" / "config.json").read_text())
    assert config["working_size"] == 192 and config["training"]["frozen_blocks"] == 6

    # The evaluation bank holds the engine's own patches: the saved bundle through the engine,
    # from the films, gives what the trainer predicted from its bank (float16 activations: ~1e-3).
    import numpy as np
    import torch

    from patchflannel.learners.bundle import load_learner
    from patchflannel.learners.data import load_masked_set, read_rows
    from patchflannel.learners.engine import PatchEngine

    model, _ = load_learner(out / "fold0" / "efficientnet_lite0-192px" / "bundle")
    saved = np.load(out / "fold0" / "efficientnet_lite0-192px" / "predictions.npz")
    films = load_masked_set(read_rows(packs)[:10], progress=False)
    engine = PatchEngine({"m": model}, k=4, device="cpu", scales=[192])
    direct = engine.predict(films.images, films.masks).probs[:, 0]
    banked = torch.from_numpy(saved["probs"][:10].astype(np.float32)).mean(1)
    assert saved["usable"][:10].all() and float((direct - banked).abs().max()) < 0.02
    # One bank per learner, scale and kind, shared by every fold.
    assert sorted(p.name for p in (out / "banks").iterdir()) == sorted(
        f"efficientnet_lite0-{kind}" for kind in (
            "patches-frozen6-train", "patches-frozen6-eval", "patches-192px-frozen6-train",
            "patches-192px-frozen6-eval", "whole_image-frozen6-train", "whole_image-frozen6-eval",
            "whole_masked-frozen6-train", "whole_masked-frozen6-eval"))
