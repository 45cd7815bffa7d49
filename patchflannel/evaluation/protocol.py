"""The cross-validation protocol, in one place: which films fall in which fold, what each fold
plays for a given test fold, and which films the stacking and the scoring use.

For test fold ``f`` of ``n``: fold ``(f + 1) % n`` validates (early stopping, and the
FLANNEL module is fitted on its predictions: out-of-fold for every learner, since none trained
on it), the other folds train. Folds are grouped by patient and stratified by label
(`assign_folds`), drawn once and written to
``folds.csv`` so a run can be reproduced and audited. The weight module's temperature is fitted
per fold on the validation fold by `patchflannel.ensemble.fit.crossfit_temperature`.

Examples:
    >>> rows = [{"pack": "x.h5", "index": i, "patient_id": f"p{i}", "label": "covid"} for i in range(3)]
    >>> fold_roles(0, 3, rows, {film_id(r): i for i, r in enumerate(rows)})
    {'p0': 'test', 'p1': 'val', 'p2': 'train'}
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from ..labels import CLASSES
from .splits import assign_folds, read_folds, write_folds

__all__ = ["FOLDS_FILE", "film_id", "fold_assignment", "fold_films", "fold_roles", "subsample", "validation_fold"]

FOLDS_FILE = "folds.csv"


def film_id(row: dict) -> str:
    """A film's identity across packs: ``<pack file name>:<row index in the pack>``."""
    return f"{Path(row['pack']).name}:{row['index']}"


def fold_assignment(rows: list[dict], out: str | Path, n_folds: int, seed: int) -> dict[str, int]:
    """``{film_id: fold}``, drawn once and written to ``out/folds.csv``, then read back from it.

    Raises:
        ValueError: ``folds.csv`` lacks films of ``rows`` (another data set in the same folder).
    """
    path = Path(out) / FOLDS_FILE
    if not path.exists():
        folds = assign_folds(rows, n_folds, seed=seed)
        table = [{**r, "film": film_id(r)} for r in rows]
        write_folds(table, folds, path, columns=("film", "input", "patient_id", "label", "source"))
    by_film = {r["film"]: r["fold"] for r in read_folds(path)}
    missing = [film_id(r) for r in rows if film_id(r) not in by_film]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} films of the packs (e.g. {missing[:3]}); "
                         "use a new output folder for a different data set")
    return by_film


def validation_fold(fold: int, n_folds: int) -> int:
    """The fold that validates (and stacks) when ``fold`` is tested."""
    return (fold + 1) % n_folds


def fold_roles(fold: int, n_folds: int, rows: list[dict], folds: dict[str, int], *,
               train_without: Collection[str] = ()) -> dict[str, str]:
    """``{patient_id: train|val|test|unused}`` for test fold ``fold``. Patients of the packs
    named in ``train_without`` (by stem) neither train nor stack (``unused``); the test fold
    keeps them."""
    val_fold = validation_fold(fold, n_folds)
    role = {r["patient_id"]: "test" if folds[film_id(r)] == fold else "val" if folds[film_id(r)] == val_fold
            else "train" for r in rows}
    if train_without:
        left_out = {r["patient_id"] for r in rows if Path(r["pack"]).stem in train_without}
        role = {p: "unused" if p in left_out and r != "test" else r for p, r in role.items()}
    return role


def subsample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` of ``rows`` (seeded, in their order), or all of them."""
    if n is None or len(rows) <= n:
        return rows
    keep = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    return [rows[i] for i in sorted(keep)]


def fold_films(rows: list[dict], role: dict[str, str], *, limit: int | None = None,
               seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """The films a fold predicts: the labelled validation films (the stacking set), the
    labelled test films, and the test patients' films outside the four classes (never trained
    on: how often an abnormal film of another kind is called covid). ``limit`` subsamples each."""
    def pick(wanted: str, labelled: bool) -> list[dict]:
        chosen = [r for r in rows if role[r["patient_id"]] == wanted and (r["label"] in CLASSES) == labelled]
        return subsample(chosen, limit, seed)

    return pick("val", True), pick("test", True), pick("test", False)
