"""Patient-grouped splits: no patient ever has images on both sides of a split."""
from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from pathlib import Path


def split_patients(
    rows: list[dict],
    fractions: dict[str, float],
    *,
    seed: int = 0,
    stratify_by: str | None = "source",
) -> dict[str, str]:
    """Assign every ``patient_id`` in ``rows`` to one split name.

    Patients are grouped by the ``stratify_by`` value of their first row, shuffled with
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
            groups[row.get(stratify_by, "") if stratify_by else ""].append(pid)
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
