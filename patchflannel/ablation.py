"""Ablation of published training recipes under the patient-grouped five-fold protocol.

    python -m patchflannel.ablation --packs runs/masked/cxr4.h5 runs/masked/adult.h5 --out runs/recipes

Every recipe is the plain baseline (EfficientNet-Lite0 from ImageNet, input-side 30 % frozen,
AdamW on a one-cycle schedule, standard augmentation, class-balanced sampling: the ``lite``
recipe) with one option of `patchflannel.learners.train.LearnerTrainConfig` changed
(`ABLATION`). Each trains on the training folds of each of the five test folds of
``cross_validation.py`` (same ``folds.csv`` drawing, fold ``f+1`` validates) and is scored on
the test fold's patients. Two control rows use the same budget and folds: training without
the adult normals (cxr4 only) and the whole-image baseline (the unmasked film letterboxed
to the patch size, no patches). Five input rows take the method's input apart: patches of
the unmasked film (what the mask does), the whole masked film and the lung box (what the
patches do), patches of the film at half size (patch scale) and per-film histogram
equalisation of the lung (grey-level style). Reported per recipe: macro-F1 mean and std over folds, the paired
per-fold difference to the baseline, the fraction of adult non-COVID test films (NIH normals
and Cohen's bacterial/viral/normal films) called covid, the same for the test patients'
adult ``other_pneumonia`` films (a label no model trains on), the covid-vs-rest ROC-AUC and the
non-COVID films called covid among every Cohen film of the test folds (pooled over folds:
adults of one collection, where image style cannot tell the classes apart), and the training
wall time (median over folds, and its ratio to the baseline's).

The budget is reduced so that all recipes x five folds fit in about an hour on two CPU cores:
``--limit`` training images per fold (seeded subsample; validation a quarter of that),
``--epochs`` epochs, ``--test-limit`` test films per fold at ``--k`` patches. Schedules that
decay on a fixed epoch count are scaled to the budget (step decay every epoch, plateau
patience 0); the table says so.

Jobs (recipe x fold) are resumable (``RECIPE/foldN/result.json``) and split over processes
with ``--shard i/n``; ``--collect`` writes ``summary.json`` and ``summary.md`` (of ``--folds``
only, when given: every recipe on the same folds).
"""
from __future__ import annotations

import sys
import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from .devices import resolve_device
from .evaluation.metrics import COHEN, covid_auc, score
from .evaluation.protocol import fold_assignment, fold_roles, subsample
from .evaluation.splits import write_split
from .jobs.shard import Shard
from .labels import CLASSES
from .learners.bundle import load_learner
from .learners.data import FILE_INPUTS, load_learner_inputs, read_rows
from .learners.registry import Normalization
from .learners.train import find_lr, predict_inputs, recipe_config, train
from .errors import run_command

__all__ = ["ABLATION", "BASELINE", "cohen_scores", "collect", "main", "markdown", "predict_films", "run_job",
           "slug"]

log = logging.getLogger(__name__)

BASELINE = "baseline (lite recipe)"
#: Recipe name -> overrides of the baseline configuration ("pretrain"/"find_lr": extra steps).
ABLATION: dict[str, dict] = {
    BASELINE: {},
    "step decay (x0.1 every epoch)": {"schedule": "step", "step_size": 1, "gamma": 0.1},
    "reduce on plateau (x0.1, patience 0)": {"schedule": "plateau", "gamma": 0.1, "plateau_patience": 0},
    "discriminative rates, one-cycle": {"layer_decay": 0.25, "freeze_fraction": 0.0},
    "discriminative rates, cyclic LR + momentum": {"schedule": "cyclic", "layer_decay": 0.25,
                                                   "freeze_fraction": 0.0},
    "LR finder rate (minimum / 10)": {"find_lr": True},
    "bf16 autocast": {"amp": True},
    "no augmentation": {"augment": "none"},
    "strong augmentation (zoom 1.3, lighting 1.4, warp 0.4)": {"augment": "strong"},
    "+ elastic + blur": {"augment": "standard+elastic+blur"},
    "+ horizontal flips": {"augment": "standard+flip"},
    "class-weighted loss (no sampler)": {"balance": "loss"},
    "focal loss (no sampler)": {"balance": "focal"},
    "style-balanced sampler (class, then source)": {"balance": "source"},
    "random init (no ImageNet)": {"weights": None, "freeze_fraction": 0.0, "lr": 3e-3},
    "CXR rotation pretraining, then fine-tune": {"pretrain": True},
    # Not recipes but the shortcut's two controls, on the same budget and folds:
    "without the adult normals in training (cxr4 only)": {"drop_pack": "adult"},
    "whole-image baseline (unmasked film, no patches)": {"input": "whole_image"},
    # What each part of the method's input does, against the baseline's masked 224 px patches
    # of the 1024 px film:
    "unmasked patches (lung centres, no mask)": {"input": "patches_unmasked"},
    "whole masked film (mask, no patches)": {"input": "whole_masked"},
    "lung box (masked film cropped to the lungs)": {"input": "lung_box"},
    "patch scale x2 (film at 512 px)": {"film_size": 512},
    "lung histogram equalisation": {"equalize": True},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def predict_films(model, cfg, films: list[dict], args) -> np.ndarray:
    """``(N, C)`` softmax of one trained recipe for ``films`` (rows), on the input it was trained on."""
    data = load_learner_inputs(films, cfg.input, cfg.patch_size, film_size=cfg.film_size, equalize=cfg.equalize,
                               progress=False, image_roots=dict(zip(map(str, args.packs), args.image_roots or [])))
    return predict_inputs(model, data, cfg, resolve_device(args.device), args.k, chunk=32).numpy()


def cohen_scores(model, cfg, rows: list[dict], roles: dict, args) -> dict:
    """Labels and softmax of every Cohen test-fold film (adults of one collection), pooled over
    folds by `collect` into the covid-vs-rest AUC that image style cannot answer."""
    films = [r for r in rows if roles[r["patient_id"]] == "test" and r["source"] == COHEN and r["label"] in CLASSES]
    probs = predict_films(model, cfg, films, args)
    return {"labels": [CLASSES.index(r["label"]) for r in films], "probs": np.round(probs, 5).tolist()}


def run_job(recipe: str, fold: int, rows: list[dict], folds: dict, args) -> dict:
    """Train one recipe on one fold's training patients and score it on its test patients."""
    out = args.out / slug(recipe) / f"fold{fold}"
    done = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None
    if done is not None and "cohen" in done:
        return done
    roles = fold_roles(fold, args.n_folds, rows, folds)
    (args.out / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    write_split(roles, args.out / f"fold{fold}" / "split.csv")
    if done is not None:  # a result from before the pooled Cohen check: predict those films only
        model, config = load_learner(out / "run" / "bundle")
        cfg = recipe_config(config["learner"], normalization=Normalization(**config["normalization"]), seed=args.seed,
                            **{k: v for k, v in config["training"].items()
                               if k in ("input", "film_size", "equalize", "patch_size")})
        done["cohen"] = cohen_scores(model, cfg, rows, roles, args)
        (out / "result.json").write_text(json.dumps(done, indent=1, default=str))
        return done
    split = str(args.out / f"fold{fold}" / "split.csv")
    overrides = dict(ABLATION[recipe])
    pretrain, search_lr = overrides.pop("pretrain", False), overrides.pop("find_lr", False)
    drop_pack = overrides.pop("drop_pack", None)
    if drop_pack:  # that pack's training and validation patients sit out; the test fold is unchanged
        out.mkdir(parents=True, exist_ok=True)
        split = str(out / "split.csv")
        write_split(fold_roles(fold, args.n_folds, rows, folds, train_without=[drop_pack]), split)
    base = dict(epochs=args.epochs, val_k=args.val_k, seed=args.seed, split_file=split, patch_size=args.patch_size,
                **overrides)
    t0 = time.perf_counter()
    extra_s = 0.0
    if search_lr:
        found = find_lr(args.packs, out / "lr_find", recipe_config(args.learner, **base), device=args.device,
                        progress=False, limit=args.limit, start_lr=1e-6, end_lr=1.0, steps=args.lr_steps)
        base["lr"] = found["minimum"] / 10
        extra_s = time.perf_counter() - t0
    if pretrain:  # label-free: every film of the training patients, unlabelled ones included
        pre = recipe_config(args.learner, **{**base, "task": "rotation", "freeze_fraction": 0.0,
                                             "epochs": args.pretrain_epochs})
        train(args.packs, out / "pretrain", pre, device=args.device, progress=False, limit=args.limit)
        base["weights"] = str(out / "pretrain" / "bundle" / "model.safetensors")
        extra_s = time.perf_counter() - t0
    cfg = recipe_config(args.learner, **base)
    if cfg.input in FILE_INPUTS and not args.image_roots:
        raise SystemExit(f"the {cfg.input} row needs --image-roots (each pack's image folder)")
    roots = {"image_roots": args.image_roots} if cfg.input in FILE_INPUTS else {}
    result = train(args.packs, out / "run", cfg, device=args.device, progress=False, limit=args.limit, **roots)
    train_s = extra_s + result["history"][-1]["elapsed_s"]

    test = subsample([r for r in rows if roles[r["patient_id"]] == "test" and r["label"] in CLASSES],
                     args.test_limit, fold)
    # the test patients' adult other_pneumonia films: no model trains on that label
    external = subsample([r for r in rows if roles[r["patient_id"]] == "test" and r["label"] not in CLASSES],
                         args.test_limit // 4, fold)
    model, _ = load_learner(out / "run" / "bundle")
    probs = predict_films(model, cfg, test + external, args)
    probs, external_probs = probs[:len(test)], probs[len(test):]
    entry = score(test, probs, external_probs)
    adult_other = [i for i, r in enumerate(test) if r["label"] != "covid" and r["source"] in ("nih", "cohen")]
    report = {"recipe": recipe, "fold": fold, "config": {k: v for k, v in vars(cfg).items() if k != "normalization"},
              "macro_f1": entry["macro_f1"], "accuracy": entry["accuracy"],
              "f1": {c: v["f1"] for c, v in entry["per_class"].items()},
              "adult_noncovid_called_covid": (float(np.mean(probs[adult_other].argmax(-1) == CLASSES.index("covid")))
                                              if adult_other else None),
              "n_adult_noncovid": len(adult_other),
              "other_pneumonia_called_covid": (entry["external_other_pneumonia_called"] or {}).get("covid"),
              "n_other_pneumonia": len(external), "n_test": len(test), "train_s": round(train_s, 1),
              "best_epoch": result["best_epoch"], "wall_s": round(time.perf_counter() - t0, 1),
              "cohen": cohen_scores(model, cfg, rows, roles, args)}
    (out / "result.json").write_text(json.dumps(report, indent=1, default=str))
    log.info("%s fold %d: macro-F1 %.3f, %.0f s", recipe, fold, report["macro_f1"], train_s)
    return report


def collect(args) -> dict:
    """Per-recipe means over the folds finished so far, paired differences to the baseline."""
    table = {}
    for recipe in ABLATION:
        done = {}
        for path in sorted((args.out / slug(recipe)).glob("fold*/result.json")):
            r = json.loads(path.read_text())
            if args.folds is None or r["fold"] in args.folds:  # --folds: compare on the same folds
                done[r["fold"]] = r
        table[recipe] = done
    base = table[BASELINE]
    protocol = {k: v for k, v in vars(args).items() if k not in ("collect", "shard")}
    summary = {"protocol": json.loads(json.dumps(protocol, default=str)), "recipes": {}}
    for recipe, done in table.items():
        if not done:
            continue
        f1 = [r["macro_f1"] for r in done.values()]
        paired = [done[f]["macro_f1"] - base[f]["macro_f1"] for f in done if f in base]
        called = [r["adult_noncovid_called_covid"] for r in done.values() if r["adult_noncovid_called_covid"] is not None]
        other = [r["other_pneumonia_called_covid"] for r in done.values()
                 if r.get("other_pneumonia_called_covid") is not None]
        times = [r["train_s"] for r in done.values()]
        cohen_labels = np.concatenate([r["cohen"]["labels"] for r in done.values() if "cohen" in r] or [[]])
        cohen_probs = np.concatenate([r["cohen"]["probs"] for r in done.values() if "cohen" in r] or [np.empty((0, 4))])
        cohen_noncovid = cohen_labels != CLASSES.index("covid")
        base_times = [base[f]["train_s"] for f in done if f in base]
        summary["recipes"][recipe] = {
            "folds": sorted(done), "macro_f1_mean": float(np.mean(f1)), "macro_f1_std": float(np.std(f1)),
            "delta_vs_baseline_mean": float(np.mean(paired)) if paired else None,
            "delta_vs_baseline_std": float(np.std(paired)) if paired else None,
            "f1_mean": {c: float(np.mean([r["f1"][c] for r in done.values()])) for c in CLASSES},
            "adult_noncovid_called_covid": float(np.mean(called)) if called else None,
            "other_pneumonia_called_covid": float(np.mean(other)) if other else None,
            "cohen_folds": sorted(f for f, r in done.items() if "cohen" in r),
            "cohen_n_covid": int((~cohen_noncovid).sum()), "cohen_n_noncovid": int(cohen_noncovid.sum()),
            "cohen_covid_auc": covid_auc(cohen_labels.astype(int), cohen_probs) if len(cohen_labels) else None,
            "cohen_noncovid_called_covid": (float((cohen_probs[cohen_noncovid].argmax(-1) == CLASSES.index("covid"))
                                                  .mean()) if cohen_noncovid.any() else None),
            "train_s_median": statistics.median(times),
            "time_ratio_vs_baseline": (statistics.median(times) / statistics.median(base_times)) if base_times else None,
        }
    (args.out / "summary.md").write_text(markdown(summary))
    text = json.dumps(summary, indent=2)
    (args.out / "summary.json").write_text(text + "\n")
    print(text)
    return summary


def markdown(summary: dict) -> str:
    lines = [("| recipe | folds | macro-F1 (mean ± std) | Δ vs baseline (paired, mean ± std) | adult non-COVID called covid "
              "| adult other pneumonia called covid | Cohen covid-vs-rest AUC (pooled) | Cohen non-COVID called covid "
              "(pooled) | train time (median s) | time ratio |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, r in summary["recipes"].items():
        delta = "—" if recipe == BASELINE or r["delta_vs_baseline_mean"] is None else \
            f"{r['delta_vs_baseline_mean']:+.3f} ± {r['delta_vs_baseline_std']:.3f}"
        called = "—" if r["adult_noncovid_called_covid"] is None else f"{r['adult_noncovid_called_covid']:.2f}"
        other = "—" if r["other_pneumonia_called_covid"] is None else f"{r['other_pneumonia_called_covid']:.2f}"
        ratio = "—" if r["time_ratio_vs_baseline"] is None else f"{r['time_ratio_vs_baseline']:.2f}"
        auc = "—" if r["cohen_covid_auc"] is None else f"{r['cohen_covid_auc']:.2f}"
        cohen = "—" if r["cohen_noncovid_called_covid"] is None else f"{r['cohen_noncovid_called_covid']:.2f}"
        lines.append(f"| {recipe} | {len(r['folds'])} | {r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f} | {delta} "
                     f"| {called} | {other} | {auc} | {cohen} | {r['train_s_median']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packs", nargs="+", required=True, type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-roots", nargs="+", type=Path, default=None,
                   help="each pack's image folder (for the whole-image and unmasked-patch rows)")
    p.add_argument("--learner", default="efficientnet_lite0")
    p.add_argument("--recipes", nargs="+", default=None, help="a subset of the recipe names (default: all)")
    p.add_argument("--folds", type=int, nargs="+", default=None)
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--limit", type=int, default=240, help="training images per fold (validation: a quarter)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=224)
    p.add_argument("--val-k", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=200, help="test films per fold")
    p.add_argument("--k", type=int, default=4, help="patches per test film")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--lr-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--shard", default=None, help="i/n: run this process's share of the recipe x fold jobs")
    p.add_argument("--collect", action="store_true", help="only summarise the finished jobs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        rows = read_rows(args.packs)
        folds = fold_assignment(rows, args.out, args.n_folds, args.seed)
        shard = Shard.parse(args.shard)
        recipes = args.recipes or list(ABLATION)
        unknown = set(recipes) - set(ABLATION)
        if unknown:
            raise SystemExit(f"unknown recipes {sorted(unknown)}; choose from {list(ABLATION)}")
        for fold in args.folds if args.folds is not None else range(args.n_folds):
            for recipe in recipes:
                if shard is None or shard.owns(f"{slug(recipe)}/fold{fold}"):
                    run_job(recipe, fold, rows, folds, args)
    collect(args)


if __name__ == "__main__":
    sys.exit(run_command(main))
