"""The ``patchflannel`` command: one entry point, a subcommand per job.

    patchflannel segment INPUT --out DIR          # Stage 1: masked .npz per film (+ HDF5 pack)
    patchflannel predict INPUT --out DIR          # the whole pipeline over a folder or manifest
    patchflannel demo --data ../shared/data       # sample films, predictions, an HTML report
    patchflannel train --packs ... --out DIR      # one patch learner
    patchflannel train-segmenter --data DIR ...   # the lung segmenter
    patchflannel ensemble --learners DIR ...      # fit the FLANNEL weight module
    patchflannel evaluate --learners DIR ...      # a learner set on held-out patients
    patchflannel cv --packs ... --out DIR         # five-fold cross-validation
    patchflannel ablation --packs ... --out DIR   # the training-recipe ablation
    patchflannel tune --packs ... --out DIR       # hyper-parameter search (Ray Tune)
    patchflannel bundle verify|rehash [FOLDER]    # check or re-record bundle hashes

``patchflannel SUBCOMMAND --help`` shows each one's options; ``python -m patchflannel.<module>``
runs the same code. Exit codes everywhere: 0 done, 1 nothing could be done, 2 a usage error.
"""
from __future__ import annotations

import importlib
import sys

from .errors import run_command

__all__ = ["COMMANDS", "main"]

#: Subcommand -> (module whose ``main(argv)`` runs it, one line of help).
COMMANDS = {
    "segment": ("patchflannel.segment.__main__", "Stage 1 batch job: lung masks and masked films"),
    "predict": ("patchflannel.predict", "the pipeline over a folder, manifest or file"),
    "demo": ("patchflannel.demo", "sample films, predictions and an HTML report"),
    "train": ("patchflannel.learners.train", "train one patch learner"),
    "train-segmenter": ("patchflannel.segment.train", "train the lung segmenter"),
    "ensemble": ("patchflannel.ensemble.__main__", "fit the FLANNEL weight module"),
    "evaluate": ("patchflannel.evaluate", "evaluate a learner set on held-out patients"),
    "cv": ("patchflannel.cv", "patient-grouped five-fold cross-validation"),
    "ablation": ("patchflannel.ablation", "the training-recipe ablation on the CV folds"),
    "tune": ("patchflannel.tune", "hyper-parameter search with Ray Tune"),
    "bundle": ("patchflannel.bundle", "verify bundles or re-record their hashes"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: patchflannel SUBCOMMAND [options]\n\nsubcommands:\n" + "\n".join(lines) + (
        "\n\n'patchflannel SUBCOMMAND --help' for a subcommand's options.")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"patchflannel: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
