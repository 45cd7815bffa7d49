"""Patient-grouped splits and folds, the one split maker: no patient ever has images on both sides."""
from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from pathlib import Path

__all__ = ["assign_folds", "check_no_patient_crosses_folds", "read_folds", "read_split", "split_patients",
           "write_folds", "write_split"]


def split_patients(
    rows: list[dict],
    fractions: dict[str, float],
    *,
    seed: int = 0,
    stratify_by: str | tuple[str, ...] | None = "source",
) -> dict[str, str]:
    """Assign every ``patient_id`` in ``rows`` to one split name.

    Patients are grouped by the ``stratify_by`` value of their first row (a tuple of columns:
    their values joined by ``:``, e.g. ``("source", "label")``), shuffled with
    ``seed`` within each group, and cut by ``fractions`` (e.g. ``{"train": .7, "val": .15,
    "test": .15}``), so each group is represented in every split in proportion.
    Returns ``{patient_id: split}``.
    """
    total = sum(fractions.values())
    groups: dict[str, list[str]] = defaultdict(list)
    seen = set()
    for row in rows:
        pid = row["patient_id"]
        if pid not in seen:
            seen.add(pid)
            keys = (stratify_by,) if isinstance(stratify_by, str) else stratify_by or ()
            groups[":".join(row.get(k, "") for k in keys)].append(pid)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for key in sorted(groups):
        patients = sorted(groups[key])
        rng.shuffle(patients)
        start = 0.0
        for i, (name, frac) in enumerate(fractions.items()):
            lo = round(start * len(patients))
            start += frac / total
            hi = len(patients) if i == len(fractions) - 1 else round(start * len(patients))
            for pid in patients[lo:hi]:
                assignment[pid] = name
    return assignment


def write_split(assignment: dict[str, str], path: str | os.PathLike) -> None:
    """Write ``patient_id,split`` rows, sorted by patient."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "split"])
        for pid in sorted(assignment):
            writer.writerow([pid, assignment[pid]])


def read_split(path: str | os.PathLike) -> dict[str, str]:
    with open(Path(path), newline="") as f:
        return {row["patient_id"]: row["split"] for row in csv.DictReader(f)}


def assign_folds(rows: list[dict], n_folds: int = 5, *, seed: int = 0, label_key: str = "label") -> dict[str, int]:
    """``{patient_id: fold}``: ``n_folds`` folds grouped by patient and stratified by label
    (scikit-learn's ``StratifiedGroupKFold``, shuffled with ``seed``), so all images of a
    patient share a fold and each fold holds about the same class mix."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = [r[label_key] for r in rows]
    groups = [r["patient_id"] for r in rows]
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    for fold, (_, test_idx) in enumerate(splitter.split(labels, labels, groups)):
        for i in test_idx:
            folds[groups[i]] = fold
    return folds


def write_folds(rows: list[dict], folds: dict[str, int], path: str | os.PathLike,
                columns: tuple[str, ...] = ("image", "patient_id", "label", "source")) -> None:
    """One row per image with its fold (``columns`` + ``fold``), for reproducing and auditing a run."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "fold"])
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns] + [folds[row["patient_id"]]])


def read_folds(path: str | os.PathLike) -> list[dict]:
    """Rows of a fold file (``fold`` as int), checked with `check_no_patient_crosses_folds`."""
    with open(Path(path), newline="") as f:
        rows = [{**row, "fold": int(row["fold"])} for row in csv.DictReader(f)]
    check_no_patient_crosses_folds(rows)
    return rows


def check_no_patient_crosses_folds(rows: list[dict], key: str = "fold") -> None:
    """Raise ``ValueError`` naming the patients whose images sit in more than one fold/split."""
    seen: dict[str, set] = defaultdict(set)
    for row in rows:
        seen[row["patient_id"]].add(row[key])
    crossing = sorted(pid for pid, values in seen.items() if len(values) > 1)
    if crossing:
        raise ValueError(f"{len(crossing)} patients have images in more than one {key}: {crossing[:5]}")
