"""Evaluate a set of patch learners on held-out patients, per class and per ``source``.

    python -m patchflannel.evaluate --learners weights/learners-lite \
        --packs runs/masked/cxr4.h5 runs/masked/adult.h5 --split weights/learners-lite/split.csv --k 32

All learners see the same K seeded patches of each film (one `PatchEngine` call).
Reported per learner (and for the plain mean of the learners' probabilities, a reference
point, not the FLANNEL ensemble): image-level macro-F1, accuracy, per-class F1, COVID
sensitivity/specificity, the same split by ``source``, and two shortcut checks: the
fraction of held-out adult normal films called covid, and of adult ``other_pneumonia``
films (never trained on; patients with no film in training) called covid.
"""
from __future__ import annotations

import sys
import argparse
import json
import logging
from pathlib import Path

import torch

from .ensemble.module import load_weight_module
from .evaluation.calibration import apply_temperature, expected_calibration_error
from .evaluation.metrics import score
from .evaluation.splits import read_split
from .labels import CLASSES, FLANNEL_ENSEMBLE, MEAN_OF_LEARNERS
from .learners.bundle import load_learner_set
from .learners.data import read_rows
from .learners.engine import PatchEngine, predict_probs
from .learners.registry import Normalization
from .patches import DEFAULT_K
from .errors import run_command

__all__ = ["evaluate_learners", "main", "markdown_table"]

log = logging.getLogger(__name__)

def evaluate_learners(learner_dir, packs, split_file, *, k: int = DEFAULT_K, seed: int = 0, device="auto",
                      batch_size: int = 128, progress: bool = True, ensemble_dir=None) -> dict:
    """Report every learner of ``learner_dir`` (plus the FLANNEL module of ``ensemble_dir``,
    when given, and the plain mean of the learners) on the test patients of ``split_file``."""
    learners, shared = load_learner_set(learner_dir)
    engine = PatchEngine(learners, k=k, patch_size=shared["patch_size"],
                         normalization=Normalization(**shared["normalization"]), scales=shared["working_sizes"],
                         device=device,
                         batch_size=batch_size, seed=seed)
    rows = read_rows(packs)
    split = read_split(split_file)
    test = [r for r in rows if split.get(r["patient_id"]) == "test" and r["label"] in CLASSES]
    # Films outside the four classes were never trained on; keep those of patients who had any
    # film in training out too (e.g. NIH patients with both a normal and a pneumonia film).
    trained = {r["patient_id"] for r in rows if r["label"] in CLASSES and split.get(r["patient_id"]) == "train"}
    external = [r for r in rows if r["label"] not in CLASSES and r["patient_id"] not in trained]
    probs = predict_probs(engine, test + external, progress=progress)
    names = list(learners)
    if ensemble_dir is not None:
        module, ens_config = load_weight_module(ensemble_dir)
        if ens_config["learners"] != names:
            raise ValueError(f"{ensemble_dir} combines {ens_config['learners']}, the learner set has {names}")
        combined = module.predict_proba(probs)
        probs, names = torch.cat([probs, combined[:, None]], 1), names + [FLANNEL_ENSEMBLE]
    probs = torch.cat([probs, probs[:, :len(learners)].mean(1, keepdim=True)], 1)  # + the plain mean of the learners
    names.append(MEAN_OF_LEARNERS)
    sources = sorted({r["source"] for r in test})
    report = {"k": k, "seed": seed, "n_test": len(test), "n_external": len(external),
              "test_counts": {f"{s}:{c}": sum(r["source"] == s and r["label"] == c for r in test)
                              for s in sources for c in CLASSES},
              "learners": {}}
    for j, name in enumerate(names):
        report["learners"][name] = score(test, probs[:len(test), j].numpy(),
                                         probs[len(test):, j].numpy() if external else None)
    if ensemble_dir is not None:  # the calibration fitted with the module, on these unseen films
        temperature = ens_config.get("temperature", 1.0)
        calibrated = apply_temperature(probs[:len(test), names.index(FLANNEL_ENSEMBLE)], temperature).numpy()
        truth = [CLASSES.index(r["label"]) for r in test]
        report["learners"][FLANNEL_ENSEMBLE]["calibrated"] = {
            "temperature": temperature, "ece": expected_calibration_error(calibrated, truth)}
    return report


def markdown_table(report: dict) -> str:
    """Rows = learners, columns = per-class F1, macro-F1, per-source macro-F1 and shortcut checks."""
    sources = sorted(next(iter(report["learners"].values()))["by_source"])
    head = (["learner"] + [f"F1 {c}" for c in CLASSES] + ["macro-F1", "accuracy"]
            + [f"macro-F1 {s}" for s in sources] + ["adult normal -> covid", "other_pneumonia -> covid"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in report["learners"].items():
        cells = [name] + [f"{e['per_class'][c]['f1']:.3f}" for c in CLASSES] + [f"{e['macro_f1']:.3f}", f"{e['accuracy']:.3f}"]
        cells += [f"{e['by_source'][s]['macro_f1_present']:.3f}" for s in sources]
        for key in ("adult_normal_called", "external_other_pneumonia_called"):
            cells.append(f"{e[key]['covid']:.1%}" if e[key] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchflannel.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", type=Path, required=True, help="folder of learner bundles")
    p.add_argument("--packs", nargs="+", required=True)
    p.add_argument("--split", type=Path, required=True, help="patient_id,split CSV the learners were trained with")
    p.add_argument("--ensemble", type=Path, default=None, help="FLANNEL weight-module bundle to report too")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="patches per film")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (and a .md table beside it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = evaluate_learners(args.learners, args.packs, args.split, k=args.k, seed=args.seed, device=args.device,
                               progress=not args.no_progress, ensemble_dir=args.ensemble)
    table = markdown_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(run_command(main))
