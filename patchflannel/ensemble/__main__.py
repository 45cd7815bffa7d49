"""Fit the FLANNEL weight module for a learner set on the set's validation patients (whose films
no learner trained on):

    python -m patchflannel.ensemble --learners weights/learners-lite --split weights/learners-lite/split.csv \
        --packs runs/masked/cxr4.h5 runs/masked/adult.h5 --out weights/ensemble-lite
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from ..evaluation.calibration import apply_temperature, expected_calibration_error
from ..evaluation.metrics import classification_report
from ..evaluation.splits import read_split
from ..labels import CLASSES
from ..learners.bundle import load_learner_set
from ..learners.data import read_rows
from ..learners.engine import PatchEngine, predict_probs
from ..learners.registry import Normalization
from ..options import add_config_arguments, config_from_args
from ..patches import DEFAULT_K
from .fit import WeightModuleConfig, crossfit_temperature, fit_weight_module
from .module import save_weight_module
from ..errors import run_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchflannel.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learners", type=Path, required=True, help="folder of learner bundles")
    p.add_argument("--packs", nargs="+", required=True, help="Stage 1 HDF5 packs")
    p.add_argument("--split", type=Path, required=True, help="patient_id,split CSV the learners were trained with")
    p.add_argument("--fit-on", default="val", help="split whose films the module is fitted on (never 'train')")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="patches per film (the K the pipeline will run at)")
    add_config_arguments(p, WeightModuleConfig, help={"gamma": "focal-loss focusing parameter",
                                                      "hidden": "a hidden layer of this width (not the paper's)"})
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.fit_on == "train":
        p.error("the module must be fitted on films the learners did not train on")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    learners, shared = load_learner_set(args.learners)
    engine = PatchEngine(learners, k=args.k, patch_size=shared["patch_size"],
                         normalization=Normalization(**shared["normalization"]), scales=shared["working_sizes"],
                         device=args.device, seed=args.seed)
    split = read_split(args.split)
    rows = [r for r in read_rows(args.packs) if split.get(r["patient_id"]) == args.fit_on and r["label"] in CLASSES]
    probs = predict_probs(engine, rows)
    labels = np.asarray([CLASSES.index(r["label"]) for r in rows])
    config = config_from_args(WeightModuleConfig, args)
    module = fit_weight_module(probs, labels, config)
    fitted = classification_report(labels, module.predict_proba(probs).argmax(-1).numpy())
    temperature, oof = crossfit_temperature(probs, labels, [r["patient_id"] for r in rows], config)
    calibration = {"temperature": temperature, "ece_out_of_fold": expected_calibration_error(oof, labels),
                   "ece_out_of_fold_calibrated": expected_calibration_error(apply_temperature(oof, temperature), labels)}
    save_weight_module(args.out, module, learners=list(learners), classes=list(CLASSES), fit_k=args.k, config=config,
                       temperature=temperature,
                       extra={"fitted_on": {"split_file": args.split.name, "split": args.fit_on, "films": len(rows),
                                            "k": args.k, "packs": [Path(x).name for x in args.packs],
                                            "macro_f1_on_fitting_films": fitted["macro_f1"]},
                              "calibration": calibration})
    print(json.dumps({"films": len(rows), "macro_f1_on_fitting_films": fitted["macro_f1"], **calibration,
                      "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
