"""Cohen et al.'s covid-chestxray-dataset (ieee8023/covid-chestxray-dataset) -> manifest CSV.

    python -m data_prep.cohen ROOT --out MANIFEST.csv [--keep-covid-no-finding]

``ROOT`` holds ``metadata.csv`` and ``images/``; the image of a row is ``ROOT/<folder>/<filename>``
(``images/`` for early versions without a ``folder`` column). Kept: frontal X-rays (PA, AP,
AP Supine, AP semi erect, AP erect) whose ``finding`` maps to a class, flat (``COVID-19, ARDS``,
``SARS``) or hierarchical (``Pneumonia/Viral/COVID-19``) as in the data README:

* COVID-19 -> covid; SARS, MERS, Varicella, Influenza, Herpes, any other ``Pneumonia/Viral/...``
  -> viral; Streptococcus, Klebsiella, Mycoplasma, E.Coli, Legionella, Bacterial,
  Chlamydophila, Staphylococcus, Nocardia, ``Pneumonia/Bacterial/...`` -> bacterial;
  No Finding -> normal.
* Dropped: fungal (Pneumocystis), ARDS alone, Lipoid, unspecified Pneumonia, Unknown, todo.

"No Finding" films of patients with any COVID-19 film (any modality or view) are prior films
of covid patients, not healthy controls: they are dropped unless ``--keep-covid-no-finding``.
``patient_id`` is ``cohen-<patientid>``. Prints a JSON summary.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from . import _manifest

SOURCE = "cohen"
#: Frontal views, compared case-insensitively; lateral (``L``) and CT planes are left out.
FRONTAL_VIEWS = {"pa", "ap", "ap supine", "ap semi erect", "ap erect"}
VIRAL = {"sars", "mers", "mers-cov", "varicella", "influenza", "herpes"}
BACTERIAL = {"streptococcus", "klebsiella", "mycoplasma", "e.coli", "legionella", "bacterial",
             "chlamydophila", "staphylococcus", "nocardia"}
REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "filename")


def _finding_label(finding: str) -> str | None:
    """The class of one finding without commas, e.g. ``Pneumonia/Bacterial/Klebsiella``."""
    parts = [p.strip().casefold() for p in finding.split("/") if p.strip()]
    if not parts:
        return None
    if parts == ["no finding"]:
        return "normal"
    if "covid-19" in parts:
        return "covid"
    if "fungal" in parts:
        return None
    if "viral" in parts:
        return "viral"
    if "bacterial" in parts:
        return "bacterial"
    # Flat names, sometimes with words after the organism ("Mycoplasma Bacterial Pneumonia").
    organism = parts[-1].split()[0]
    if organism in VIRAL:
        return "viral"
    if organism in BACTERIAL:
        return "bacterial"
    return None


def cohen_label(finding: str) -> str | None:
    """The class of a Cohen ``finding`` value, or ``None`` when it maps to no class.

    Comma-separated findings name a diagnosis and its complications (``COVID-19, ARDS``):
    COVID-19 anywhere wins; otherwise the findings that have a class must agree.
    """
    labels = {_finding_label(f) for f in finding.split(",")} - {None}
    if "covid" in labels:
        return "covid"
    return labels.pop() if len(labels) == 1 else None


def read_metadata(root: str | os.PathLike) -> list[dict]:
    """Rows of ``ROOT/metadata.csv``, values stripped.

    Raises:
        FileNotFoundError: no ``metadata.csv`` in ``root``.
        ValueError: a column the conversion needs is missing.
    """
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: ROOT must hold metadata.csv and images/")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}")
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def build_manifest(root: str | os.PathLike, out: str | os.PathLike, *, drop_covid_no_finding: bool = True) -> dict:
    """Write the manifest of the Cohen collection at ``root`` to ``out``; returns the summary.

    Args:
        drop_covid_no_finding: drop "No Finding" films of patients who have a COVID-19 film
            (the data README's rule).
    """
    root = Path(root)
    rows = read_metadata(root)
    # Over every row, CT and lateral included: a covid patient's CT makes their "No Finding"
    # X-ray a prior film too.
    covid_patients = {r["patientid"] for r in rows if cohen_label(r["finding"]) == "covid"}
    manifest = _manifest.Manifest(out, SOURCE)
    for r in rows:
        label = cohen_label(r["finding"])
        if r["modality"].casefold() != "x-ray":
            manifest.drop("not an X-ray")
        elif r["view"].casefold() not in FRONTAL_VIEWS:
            manifest.drop("not a frontal view")
        elif label is None:
            manifest.drop(f"no class for finding {r['finding']!r}")
        elif label == "normal" and drop_covid_no_finding and r["patientid"] in covid_patients:
            manifest.drop("No Finding film of a COVID-19 patient")
        else:
            path = root / (r.get("folder") or "images") / r["filename"]
            manifest.add(path, label, f"{SOURCE}-{r['patientid']}", r["view"])
    return manifest.write()


def main(argv: list[str] | None = None) -> None:
    p = _manifest.parser("data_prep.cohen", __doc__)
    p.add_argument("--keep-covid-no-finding", action="store_true",
                   help='keep "No Finding" films of patients who have COVID-19 films (dropped by default)')
    args = p.parse_args(argv)
    _manifest.run(build_manifest, args.root, args.out, drop_covid_no_finding=not args.keep_covid_no_finding)


if __name__ == "__main__":
    main()
