"""Patient-grouped five-fold cross-validation: patch learners, FLANNEL ensemble, whole-image baseline.

    python -m patchflannel.cv --packs runs/masked/cxr4.h5 runs/masked/adult.h5 \
        --image-roots ../shared/data/cxr4 ../shared/data/adult --out runs/cv

Folds are drawn once over every film of the packs by scikit-learn's ``StratifiedGroupKFold``
(grouped by ``patient_id``, stratified by label, seeded) and written to ``folds.csv``;
re-runs read it back and check that no patient crosses folds. For test fold ``f``:

* fold ``f+1`` (mod n) is the validation fold, the other folds train;
* every learner of ``--learners`` (default: the ``lite`` preset, each with its recipe from
  `patchflannel.learners.train.RECIPES`) trains on the training folds, with early
  stopping on the validation fold;
* the learners predict the validation and test films (K seeded lung patches each);
* the FLANNEL weight module is fitted on the validation fold's predictions (out-of-fold for
  every learner: stacking never sees predictions for films a learner trained on) and
  applied to the test fold;
* a whole-image baseline (the first learner's backbone on the unmasked film, no patches)
  trains on the same folds.

Films outside the four classes (adult ``other_pneumonia``) are never trained on; those of
the test fold's patients are predicted to measure how often an abnormal adult film from
another hospital is called covid.

Everything is resumable: learners resume from their checkpoints, a finished fold
(``foldN/result.json``) is skipped. ``--folds 0 1`` runs some folds (e.g. one per machine);
the summary covers the folds finished so far.

For a scheduler (a SLURM array, Ray, several machines sharing ``--out``), every fold x member
is an independent job and a collector finishes the folds:

    python -m patchflannel.cv ARGS --print-jobs      # lists the commands:
    python -m patchflannel.cv ARGS --folds 3 --job resnet18     # one per fold x member
    python -m patchflannel.cv ARGS --job collect                # predict, stack, score, summary

Output under ``--out``: ``summary.json``,
``summary.md`` (the layout of the method's published table plus per-source and shortcut
tables) and ``confusion.png`` / ``pr_curves.png``. ``--quick`` is a smoke run (few images,
one epoch, K=4).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .devices import resolve_device
from .ensemble.fit import WeightModuleConfig, crossfit_temperature, fit_weight_module
from .ensemble.module import save_weight_module
from .evaluation.calibration import apply_temperature, expected_calibration_error
from .evaluation.metrics import COHEN, covid_auc, score
from .evaluation.protocol import film_id, fold_assignment, fold_films, fold_roles, validation_fold
from .evaluation.splits import write_split
from .labels import CLASSES, FLANNEL_ENSEMBLE, MEAN_OF_LEARNERS
from .learners.bundle import load_learner
from .learners.data import load_whole_image_set, read_rows
from .learners.engine import PatchEngine, predict_probs
from .learners.registry import PRESETS, Normalization
from .learners.train import LearnerTrainConfig, predict_whole_images, recipe_config, train
from .patches import DEFAULT_K
from .errors import run_command

__all__ = ["BASELINES", "CONVERGED", "CONVERGED_CANDIDATES", "K_STUDY", "QUICK", "REDUCED_EPOCHS", "REDUCED_VAL_K",
           "WHOLE_IMAGE", "WHOLE_IMAGE_DIR", "WHOLE_MASKED", "WHOLE_MASKED_DIR", "banked_probs", "finish_fold",
           "k_study", "main", "markdown", "member_dir", "member_spec", "members", "plots", "pooled_cohen",
           "pooled_predictions", "rank_candidates", "run_fold", "summarise", "train_member", "write_fold_split"]

log = logging.getLogger(__name__)
WHOLE_IMAGE = "whole-image baseline"
WHOLE_IMAGE_DIR = "whole_image"
QUICK = {"train_limit": 48, "eval_limit": 24, "epochs": 1, "k": 4, "weight_steps": 50}
# ``--budget reduced``: about half the recipe epochs (a third for the random-init members) and
# a lighter validation, so five folds fit in about six hours on two CPU cores instead of
# about seventeen. Every model of a fold, the baseline included, gets the same cut.
REDUCED_EPOCHS = {"efficientnet_lite0": 3, "efficientnet_lite1": 3, "efficientnet_lite2": 3, "resnet18": 5,
                  "mobilenet_v3_small": 6}
REDUCED_VAL_K = 4
#: ``--budget converged``: every member trains to a validation plateau on a frozen, cached
#: ImageNet trunk (`patchflannel.learners.cached`): ReduceLROnPlateau (x0.2 after 2 epochs
#: without a better validation likelihood, exp(-log loss): macro-F1 on ~365 films is too noisy
#: to find a plateau in), early stop after 5, at most 60 epochs; validation on 8 patches per film.
CONVERGED = {"weights": "imagenet", "frozen_blocks": 6, "schedule": "plateau", "plateau_patience": 2, "gamma": 0.2,
             "epochs": 60, "patience": 5, "lr": 1e-3, "batch_size": 64, "patches_per_image": 4, "bank_patches": 16,
             "val_k": 8, "amp": False, "selection": "likelihood"}
#: The candidates of the converged CV (learner@film size; no size: the packs' grid).
CONVERGED_CANDIDATES = ("efficientnet_lite0", "efficientnet_lite0@512", "efficientnet_lite1", "efficientnet_lite1@512",
                        "efficientnet_lite2", "efficientnet_lite2@512")
WHOLE_MASKED = "whole masked film"
WHOLE_MASKED_DIR = "whole_masked"
BASELINES = {WHOLE_IMAGE_DIR: WHOLE_IMAGE, WHOLE_MASKED_DIR: WHOLE_MASKED}


def member_spec(member: str) -> tuple[str, int | None]:
    """``"efficientnet_lite0@512"`` -> (learner, film size); no ``@``: (name, None)."""
    name, _, size = member.partition("@")
    return name, int(size) if size else None


def member_dir(member: str) -> str:
    """A member's folder name (``efficientnet_lite0@512`` -> ``efficientnet_lite0-512px``): the
    learner set names learners by folder."""
    name, size = member_spec(member)
    return f"{name}-{size}px" if size else name


def write_fold_split(fold: int, rows: list[dict], folds: dict[str, int], args) -> dict[str, str]:
    """The roles of test fold ``fold`` (`fold_roles`),
    written to ``foldN/split.csv`` for the learners' trainers."""
    fold_dir = args.out / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    role = fold_roles(fold, args.n_folds, rows, folds, train_without=args.train_without or ())
    write_split(role, fold_dir / "split.csv")
    return role


def members(args) -> list[str]:
    """What a fold trains: every learner, then the whole-image baseline (and, converged, the
    whole masked film)."""
    if args.budget == "converged":
        return [*args.learners, WHOLE_IMAGE_DIR, WHOLE_MASKED_DIR]
    return [*args.learners, WHOLE_IMAGE_DIR]


def train_member(fold: int, member: str, rows: list[dict], folds: dict[str, int], args, quick: dict | None) -> None:
    """Train (or resume) one learner, or the whole-image baseline, of one fold: one job."""
    write_fold_split(fold, rows, folds, args)
    fold_dir = args.out / f"fold{fold}"
    overrides = {"seed": args.seed, "split_file": str(fold_dir / "split.csv")}
    if args.budget == "converged":
        name, size = member_spec(args.learners[0] if member in BASELINES else member)
        inputs = {WHOLE_IMAGE_DIR: "whole_image", WHOLE_MASKED_DIR: "whole_masked"}
        cfg = LearnerTrainConfig(**{"learner": name, "film_size": None if member in BASELINES else size,
                                    "input": inputs.get(member, "patches"), **CONVERGED, **overrides})
        if quick:
            cfg = replace(cfg, epochs=quick["epochs"], val_k=2, bank_patches=2)
        log.info("fold %d: training %s", fold, member)
        train(args.packs, fold_dir / member_dir(member), cfg, device=args.device, progress=args.progress,
              image_roots=args.image_roots, bank_dir=args.out / "banks", eval_k=args.eval_k)
        return
    if quick:
        overrides.update(epochs=quick["epochs"], val_k=2)
    name = args.learners[0] if member == WHOLE_IMAGE_DIR else member
    if args.budget == "reduced" and not quick:
        overrides.update(epochs=REDUCED_EPOCHS.get(name, 3), val_k=REDUCED_VAL_K)
    extra = {"image_roots": args.image_roots} if member == WHOLE_IMAGE_DIR else {}
    if member == WHOLE_IMAGE_DIR:
        overrides["input"] = "whole_image"
    log.info("fold %d: training %s", fold, member)
    train(args.packs, fold_dir / member, recipe_config(name, **overrides), device=args.device,
          progress=args.progress, limit=quick["train_limit"] if quick else None, **extra)


def run_fold(fold: int, rows: list[dict], folds: dict[str, int], args, quick: dict | None) -> dict:
    """Train, predict and score one test fold; results cached in ``foldN/result.json``."""
    if (args.out / f"fold{fold}" / "result.json").exists():
        return json.loads((args.out / f"fold{fold}" / "result.json").read_text())
    for member in members(args):
        train_member(fold, member, rows, folds, args, quick)
    return finish_fold(fold, rows, folds, args, quick)


def finish_fold(fold: int, rows: list[dict], folds: dict[str, int], args, quick: dict | None) -> dict:
    """Predict with a fold's trained members, fit FLANNEL on the validation fold, score the test
    fold (the collector of the per-member jobs); cached in ``foldN/result.json``."""
    fold_dir = args.out / f"fold{fold}"
    result_path = fold_dir / "result.json"
    k = quick["k"] if quick else args.k
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        if cached.get("k") != k:
            raise SystemExit(f"{result_path} was predicted at K = {cached.get('k')}, this run asks for K = {k}: "
                             "pass --k to match it, or delete the file to redo the fold")
        return cached
    missing = [m for m in members(args) if not (fold_dir / member_dir(m) / "bundle" / "config.json").is_file()]
    if missing:
        raise SystemExit(f"fold {fold}: {missing} not trained yet (run their --job commands first)")
    role = write_fold_split(fold, rows, folds, args)
    val_fold = validation_fold(fold, args.n_folds)
    t0 = time.perf_counter()
    train_time = {BASELINES.get(m, m): json.loads((fold_dir / member_dir(m) / "history.json").read_text())[-1]["elapsed_s"]
                  for m in members(args)}

    # Films to predict: labelled validation films (the stacking set), labelled test films, and
    # the test patients' films outside the four classes (never trained on).
    val, test, external = fold_films(rows, role, limit=quick["eval_limit"] if quick else None, seed=fold)
    log.info("fold %d: predicting %d val, %d test, %d external films", fold, len(val), len(test), len(external))
    learners = list(args.learners)
    if args.budget == "converged":  # the members' evaluation banks hold the engine's patches
        probs = np.stack([banked_probs(fold_dir / member_dir(m), val + test + external, k) for m in learners], 1)
    else:
        models, configs = {}, {}
        for name in learners:
            models[name], configs[name] = load_learner(fold_dir / name / "bundle")
        engine = PatchEngine(models, k=k, normalization=Normalization(**configs[learners[0]]["normalization"]),
                             device=args.device, seed=args.seed)
        probs = predict_probs(engine, val + test + external, progress=args.progress).numpy()
    val_probs, test_probs, ext_probs = np.split(probs, [len(val), len(val) + len(test)])
    val_labels = np.asarray([CLASSES.index(r["label"]) for r in val])

    weight_cfg = WeightModuleConfig(seed=args.seed, steps=quick["weight_steps"] if quick else WeightModuleConfig.steps)
    module = fit_weight_module(val_probs, val_labels, weight_cfg)
    temperature, _ = crossfit_temperature(val_probs, val_labels, [r["patient_id"] for r in val], weight_cfg)
    save_weight_module(fold_dir / "ensemble", module, learners=list(learners), classes=list(CLASSES), fit_k=k,
                       config=weight_cfg,
                       temperature=temperature, extra={"fitted_on_films": [film_id(r) for r in val]})
    flannel_test, flannel_ext = module.predict_proba(test_probs).numpy(), module.predict_proba(ext_probs).numpy()
    test_labels = [CLASSES.index(r["label"]) for r in test]
    calibration = {"temperature": temperature, "ece": expected_calibration_error(flannel_test, test_labels),
                   "ece_calibrated": expected_calibration_error(apply_temperature(flannel_test, temperature),
                                                                test_labels)}

    models = {name: (test_probs[:, j], ext_probs[:, j]) for j, name in enumerate(learners)}
    models[MEAN_OF_LEARNERS] = (test_probs.mean(1), ext_probs.mean(1))
    models[FLANNEL_ENSEMBLE] = (flannel_test, flannel_ext)
    if args.budget == "converged":
        for folder, name in BASELINES.items():
            models[name] = (banked_probs(fold_dir / folder, test, 1), banked_probs(fold_dir / folder, external, 1))
    else:
        whole_model, whole_cfg = load_learner(fold_dir / WHOLE_IMAGE_DIR / "bundle")
        device = resolve_device(args.device)
        roots = {str(p): r for p, r in zip(args.packs, args.image_roots)}
        norm = Normalization(**whole_cfg["normalization"])

        def whole(rs):
            if not rs:
                return np.zeros((0, len(CLASSES)), np.float32)
            images = load_whole_image_set(rs, roots, whole_cfg["patch_size"], progress=False).images
            return predict_whole_images(whole_model.to(device), images, norm, device).numpy()

        models[WHOLE_IMAGE] = (whole(test), whole(external))
    result = {
        "fold": fold, "val_fold": val_fold, "k": k, "quick": bool(quick),
        "n": {"train_patients": sum(v == "train" for v in role.values()), "val": len(val), "test": len(test),
              "external": len(external)},
        "train_seconds": train_time, "finish_seconds": round(time.perf_counter() - t0, 1),
        "models": {name: score(test, p, e if len(external) else None) for name, (p, e) in models.items()},
        "learner_weights_mean": module.learner_weights(torch.as_tensor(test_probs)).mean(0).tolist(),
        "calibration": calibration,
    }
    np.savez(fold_dir / "test_predictions.npz", films=np.asarray([film_id(r) for r in test]),
             labels=np.asarray([CLASSES.index(r["label"]) for r in test]),
             sources=np.asarray([r["source"] for r in test]),
             **{name.replace(" ", "_"): p for name, (p, _) in models.items()})
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def banked_probs(run_dir: Path, rows: list[dict], k: int) -> np.ndarray:
    """``(len(rows), C)`` mean softmax over the first ``k`` evaluation-bank items of each film, from
    a cached-trunk run's ``predictions.npz`` (NaN for films the engine would reject)."""
    if not rows:
        return np.zeros((0, len(CLASSES)), np.float32)
    saved = np.load(run_dir / "predictions.npz")
    if saved["probs"].shape[1] < k:
        raise SystemExit(f"{run_dir}/predictions.npz holds {saved['probs'].shape[1]} patches per film, "
                         f"fewer than K = {k}")
    index = {f: i for i, f in enumerate(saved["films"].tolist())}
    picked = [index[film_id(r)] for r in rows]
    return saved["probs"][picked, :k].astype(np.float32).mean(1)


#: Patch counts of the K study (each a prefix of the evaluation banks' patches).
K_STUDY = (1, 2, 4, 8, 16, 24, 32, 48, 64, 100)


def k_study(args, rows: list[dict], folds: dict[str, int], fold_list: list[int]) -> dict:
    """Test macro-F1 of every learner, their plain mean and FLANNEL (refitted on the validation
    fold at each K) against K, per finished converged fold: the first K patches of the
    evaluation banks are the patches the engine draws at K."""
    from .evaluation.metrics import classification_report

    out = {"k": [k for k in K_STUDY if k <= args.eval_k], "folds": {}}
    for fold in fold_list:
        fold_dir = args.out / f"fold{fold}"
        if not all((fold_dir / member_dir(m) / "predictions.npz").is_file() for m in args.learners):
            continue
        role = fold_roles(fold, args.n_folds, rows, folds, train_without=args.train_without or ())
        val, test, _ = fold_films(rows, role, seed=fold)
        val_y = np.asarray([CLASSES.index(r["label"]) for r in val])
        test_y = np.asarray([CLASSES.index(r["label"]) for r in test])
        entry = {name: [] for name in [*args.learners, MEAN_OF_LEARNERS, FLANNEL_ENSEMBLE]}
        for k in out["k"]:
            val_p = np.stack([banked_probs(fold_dir / member_dir(m), val, k) for m in args.learners], 1)
            test_p = np.stack([banked_probs(fold_dir / member_dir(m), test, k) for m in args.learners], 1)
            module = fit_weight_module(val_p, val_y, WeightModuleConfig(seed=args.seed))
            combined = {**{m: test_p[:, j] for j, m in enumerate(args.learners)}, MEAN_OF_LEARNERS: test_p.mean(1),
                        FLANNEL_ENSEMBLE: module.predict_proba(test_p).numpy()}
            for name, p in combined.items():
                entry[name].append(classification_report(test_y, p.argmax(-1))["macro_f1"])
        out["folds"][str(fold)] = entry
    return out


def rank_candidates(args, fold: int) -> list[dict]:
    """The learners of a fold by the validation score their epoch was selected on (likelihood
    for the converged CV; the five are chosen on the validation fold, never on the test fold)."""
    ranked = []
    for member in args.learners:
        history_file = args.out / f"fold{fold}" / member_dir(member) / "history.json"
        if history_file.is_file():
            history = json.loads(history_file.read_text())
            key = "val_likelihood" if "val_likelihood" in history[0] else "val_macro_f1"
            best = max(history, key=lambda h: h[key])
            ranked.append({"member": member, "val_macro_f1": best["val_macro_f1"],
                           "val_likelihood": best.get("val_likelihood"), "best_epoch": best["epoch"],
                           "epochs": len(history), "train_seconds": history[-1]["elapsed_s"]})
    return sorted(ranked, key=lambda r: -(r["val_likelihood"] or r["val_macro_f1"]))


def summarise(results: list[dict]) -> dict:
    """Mean and standard deviation over folds of each model's per-class F1, macro-F1, accuracy,
    COVID sensitivity/specificity, ROC-/PR-AUC; per-source macro-F1; summed confusion matrices."""
    names = list(results[0]["models"])
    summary = {"folds": [r["fold"] for r in results], "models": {}}

    def stat(values):
        values = np.asarray(values, dtype=float)
        return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)), "per_fold": values.tolist()}

    for name in names:
        entries = [r["models"][name] for r in results]
        sources = sorted({s for e in entries for s in e["by_source"]})
        summary["models"][name] = {
            "f1": {c: stat([e["per_class"][c]["f1"] for e in entries]) for c in CLASSES},
            "macro_f1": stat([e["macro_f1"] for e in entries]),
            "accuracy": stat([e["accuracy"] for e in entries]),
            "covid_sensitivity": stat([e["covid_sensitivity"] for e in entries]),
            "covid_specificity": stat([e["covid_specificity"] for e in entries]),
            "roc_auc": {c: stat([e["ranking"][c]["roc_auc"] for e in entries]) for c in CLASSES},
            "pr_auc": {c: stat([e["ranking"][c]["pr_auc"] for e in entries]) for c in CLASSES},
            "macro_f1_by_source": {s: stat([e["by_source"][s]["macro_f1_present"] for e in entries
                                            if s in e["by_source"]]) for s in sources},
            "adult_normal_called_covid": stat([e["adult_normal_called"]["covid"] for e in entries
                                               if e["adult_normal_called"]]),
            "other_pneumonia_called_covid": stat([e["external_other_pneumonia_called"]["covid"] for e in entries
                                                  if e["external_other_pneumonia_called"]]),
            "cohen_noncovid_called_covid": stat([e["cohen_noncovid_called"]["covid"] for e in entries
                                                 if e.get("cohen_noncovid_called")]),
            "cohen_covid_auc": stat([e["cohen_covid_auc"] for e in entries if e.get("cohen_covid_auc") is not None]),
            "ece": stat([e["ece"] for e in entries if "ece" in e]),
            "confusion_matrix": np.sum([e["confusion_matrix"] for e in entries], 0).tolist(),
        }
    calibrations = [r["calibration"] for r in results if "calibration" in r]
    if calibrations:
        summary["ensemble_calibration"] = {k: stat([c[k] for c in calibrations]) for k in calibrations[0]}
    return summary


def markdown(summary: dict) -> str:
    def ms(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    models = summary["models"]
    lines = [f"Folds: {summary['folds']} (mean ± std over folds)", "",
             "| model | covid F1 | viral F1 | bacterial F1 | normal F1 | macro-F1 |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(ms(m["f1"][c]) for c in CLASSES) + f" | {ms(m['macro_f1'])} |")
    lines += ["", "| model | accuracy | COVID sensitivity | COVID specificity | mean ROC-AUC | mean PR-AUC |",
              "|---|---|---|---|---|---|"]
    for name, m in models.items():
        roc = np.mean([m["roc_auc"][c]["mean"] for c in CLASSES])
        pr = np.mean([m["pr_auc"][c]["mean"] for c in CLASSES])
        lines.append(f"| {name} | {ms(m['accuracy'])} | {ms(m['covid_sensitivity'])} | "
                     f"{ms(m['covid_specificity'])} | {roc:.3f} | {pr:.3f} |")
    sources = sorted({s for m in models.values() for s in m["macro_f1_by_source"]})
    lines += ["", "| model | " + " | ".join(f"macro-F1 {s}" for s in sources)
              + " | NIH adult normal -> covid | adult other_pneumonia -> covid |",
              "|---|" + "---|" * (len(sources) + 2)]
    for name, m in models.items():
        lines.append(f"| {name} | " + " | ".join(ms(m["macro_f1_by_source"][s]) for s in sources)
                     + f" | {m['adult_normal_called_covid']['mean']:.1%} | {m['other_pneumonia_called_covid']['mean']:.1%} |")

    def pct(stat):
        return f"{stat['mean']:.1%}" if stat["per_fold"] else "-"

    lines += ["", ("Shortcut checks: Cohen's films are all adults from one collection, so covid against "
                   "Cohen's bacterial/viral/normal films is the comparison age and hospital style cannot answer."), "",
              "| model | Cohen non-covid -> covid | Cohen covid-vs-rest ROC-AUC | ECE |", "|---|---|---|---|"]
    for name, m in models.items():
        auc = m["cohen_covid_auc"]
        lines.append(f"| {name} | {pct(m['cohen_noncovid_called_covid'])} | "
                     f"{ms(auc) if auc['per_fold'] else '-'} | {ms(m['ece']) if m['ece']['per_fold'] else '-'} |")
    if "cohen_pooled" in summary:
        c = summary["cohen_pooled"]
        lines += ["", (f"Pooled over the folds' test predictions: {c['n_covid']} Cohen covid films against "
                       f"{c['n_noncovid']} Cohen non-COVID films."), "",
                  "| model | Cohen covid-vs-rest ROC-AUC (pooled) | Cohen non-covid -> covid (pooled) |", "|---|---|---|"]
        for name, m in c["models"].items():
            auc = "-" if m["covid_auc"] is None else f"{m['covid_auc']:.3f}"
            called = "-" if m["noncovid_called_covid"] is None else f"{m['noncovid_called_covid']:.1%}"
            lines.append(f"| {name} | {auc} | {called} |")
    if "ensemble_calibration" in summary:
        c = summary["ensemble_calibration"]
        lines += ["", (f"FLANNEL calibration (temperature fitted out-of-fold on the validation fold): T = "
                       f"{ms(c['temperature'])}, test ECE {ms(c['ece'])} before, {ms(c['ece_calibrated'])} after.")]
    return "\n".join(lines)


def pooled_predictions(out: Path, folds: list[int]) -> dict[str, np.ndarray]:
    """The test predictions of ``folds`` (``foldN/test_predictions.npz``) concatenated: every
    labelled film once, each predicted by the models of the fold that held it out."""
    parts = [np.load(out / f"fold{f}" / "test_predictions.npz") for f in folds]
    return {key: np.concatenate([z[key] for z in parts]) for key in parts[0].files}


def pooled_cohen(out: Path, folds: list[int], names: list[str]) -> dict:
    """Per model, over the pooled out-of-fold test predictions of Cohen's films (all adults,
    one collection): ROC-AUC of p(covid) for covid against bacterial/viral/normal films, and
    the share of those non-COVID films called covid. Pooling gives the AUC every non-COVID
    film of the collection instead of a handful per fold."""
    pooled = pooled_predictions(out, folds)
    cohen = pooled["sources"] == COHEN
    truth = pooled["labels"][cohen]
    covid = CLASSES.index("covid")
    report = {"n_covid": int((truth == covid).sum()), "n_noncovid": int((truth != covid).sum()), "models": {}}
    for name in names:
        probs = pooled[name.replace(" ", "_")][cohen]
        called = probs[truth != covid].argmax(-1) == covid
        report["models"][name] = {"covid_auc": covid_auc(truth, probs),
                                  "noncovid_called_covid": float(called.mean()) if called.size else None}
    return report


def plots(summary: dict, out: Path) -> list[str]:
    """Confusion matrices (summed over folds) and pooled precision-recall curves, as PNGs."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    names = list(summary["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4))
    for ax, name in zip(np.atleast_1d(axes), names):
        cm = np.asarray(summary["models"][name]["confusion_matrix"])
        ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, fontsize=7)
        ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("true", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)

    pooled = pooled_predictions(out, summary["folds"])
    labels = pooled["labels"]
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(4 * len(CLASSES), 3.6))
    for c, ax in enumerate(axes):
        for name in names:
            precision, recall, _ = precision_recall_curve(labels == c, pooled[name.replace(" ", "_")][:, c])
            ax.plot(recall, precision, label=name, lw=1.5 if name in (FLANNEL_ENSEMBLE, WHOLE_IMAGE) else 0.8)
        ax.set_title(f"{CLASSES[c]} (pooled over folds)", fontsize=9)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
    axes[-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "pr_curves.png", dpi=110)
    plt.close(fig)
    return ["confusion.png", "pr_curves.png"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packs", nargs="+", type=Path, required=True)
    p.add_argument("--image-roots", nargs="+", type=Path, required=True,
                   help="each pack's manifest folder (the whole-image baseline reads the original films)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--learners", nargs="+", default=None,
                   help="learners (NAME or NAME@FILM_SIZE); default: the lite preset, converged: CONVERGED_CANDIDATES")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--folds", nargs="+", type=int, default=None, help="test folds to run (default: all)")
    p.add_argument("--k", type=int, default=None,
                   help=f"patches per film at prediction (default {DEFAULT_K}; converged: --eval-k)")
    p.add_argument("--eval-k", type=int, default=48,
                   help="--budget converged: patches per film in the evaluation banks (the largest K it can score)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", choices=["recipe", "reduced", "converged"], default="recipe",
                   help="training epochs: each learner's recipe, the reduced CPU budget (REDUCED_EPOCHS), or "
                        "converged: every member to a validation plateau on a frozen, cached trunk (CONVERGED)")
    p.add_argument("--train-without", nargs="+", default=[], metavar="PACK",
                   help="packs (by file stem, e.g. adult) whose patients neither train nor fit the ensemble; "
                        "their test-fold films are still scored. With a copy of another run's folds.csv in "
                        "--out, this is that protocol without those films (e.g. cxr4 alone)")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, one epoch, K=4")
    p.add_argument("--job", default=None,
                   help="one job of a scheduler: a learner name or whole_image (trains it for --folds), or "
                        "collect (finishes the folds whose members are trained, writes the summary)")
    p.add_argument("--print-jobs", action="store_true", help="print one command per fold x member, then the collector")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if len(args.image_roots) != len(args.packs):
        p.error("give one --image-roots folder per pack")
    args.packs = [str(x) for x in args.packs]
    if args.learners is None:
        args.learners = list(CONVERGED_CANDIDATES if args.budget == "converged" else PRESETS["lite"])
    if args.k is None:
        args.k = args.eval_k if args.budget == "converged" else DEFAULT_K
    if args.budget == "converged" and args.k > args.eval_k:
        p.error(f"--k {args.k} exceeds --eval-k {args.eval_k}, the patches the evaluation banks hold")
    args.progress = not args.no_progress
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(args.packs)
    folds = fold_assignment(rows, args.out, args.n_folds, args.seed)
    fold_list = args.folds if args.folds is not None else list(range(args.n_folds))
    quick = QUICK if args.quick else None
    if args.print_jobs:
        base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--print-jobs"]
        for f in fold_list:
            for m in members(args):
                print(" ".join(["python", "-m", "patchflannel.cv", *base, "--folds", str(f), "--job", m]))
        print(" ".join(["python", "-m", "patchflannel.cv", *base, "--job", "collect"]))
        return {}
    if args.job and args.job != "collect":
        if args.job not in members(args):
            p.error(f"--job {args.job}: expected one of {members(args)} or collect")
        for f in fold_list:
            train_member(f, args.job, rows, folds, args, quick)
        return {}
    if args.job == "collect":
        results = [finish_fold(f, rows, folds, args, quick) for f in fold_list
                   if all((args.out / f"fold{f}" / member_dir(m) / "bundle").is_dir() for m in members(args))]
    else:
        results = [run_fold(f, rows, folds, args, quick) for f in fold_list]
    done = sorted(args.out.glob("fold*/result.json"))
    if not done and not results:
        raise SystemExit("no fold has finished yet: run the training jobs first (--print-jobs lists them)")
    summary = summarise([json.loads(path.read_text()) for path in done] or results)
    summary.update({"command": " ".join(sys.argv), "learners": args.learners, "n_folds": args.n_folds,
                    "quick": args.quick, "budget": args.budget,
                    "epochs": REDUCED_EPOCHS if args.budget == "reduced" else None})
    summary["cohen_pooled"] = pooled_cohen(args.out, summary["folds"], list(summary["models"]))
    if args.budget == "converged":
        summary["k_study"] = k_study(args, rows, folds, summary["folds"])
        summary["candidates"] = {str(f): rank_candidates(args, f) for f in summary["folds"]}
    summary["plots"] = plots(summary, args.out)
    (args.out / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary))
    text = json.dumps(summary, indent=2)
    (args.out / "summary.json").write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    sys.exit(run_command(main))
