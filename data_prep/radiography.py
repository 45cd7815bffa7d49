"""The Kaggle COVID-19 Radiography Database -> manifest CSV.

    python -m data_prep.radiography ROOT --out MANIFEST.csv

Both published layouts work (the class is the nearest folder with a class name):

* newer: ``COVID-19_Radiography_Dataset/{COVID,Normal,Viral Pneumonia,Lung_Opacity}/images/*.png``
  (the sibling ``masks/`` folders are ignored, the ``*.metadata.xlsx`` files are not read);
* older: ``COVID-19 Radiography Database/{COVID-19,NORMAL,Viral Pneumonia}/*.png``.

COVID / COVID-19 -> covid, Normal -> normal, Viral Pneumonia -> viral; Lung_Opacity is dropped
(not one of the four classes). ``view`` is empty (unknown).

**No patient ids.** The database publishes none, so ``patient_id`` is
``radiography-<file stem>``, one id per image: folds grouped by these ids cannot prevent one
patient's films from landing on both sides of a split. The database also collects images from
other public sets (Cohen's collection, Kermany's pediatric set among them): do not combine its
manifest with those of ``data_prep.cohen`` or ``data_prep.kermany`` without de-duplicating.
Prints a JSON summary, with this warning.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import _manifest

SOURCE = "radiography"
VIEW = ""
#: Class folder names of both layouts, compared case-insensitively; ``None``: dropped.
CLASS_FOLDERS = {"covid": "covid", "covid-19": "covid", "normal": "normal", "viral pneumonia": "viral",
                 "lung_opacity": None}
WARNING = ("no patient ids in this database: patient_id is one per image (radiography-<file stem>), "
           "so folds grouped by these ids cannot prevent patient leakage")


def folder_label(path: Path, root: Path) -> tuple[bool, str | None]:
    """``(found, label)`` from the nearest class folder between ``root`` and ``path``.

    ``found`` is ``False`` when no folder has a class name; ``label`` is ``None`` for
    Lung_Opacity.
    """
    for part in reversed(path.relative_to(root).parts[:-1]):
        if part.casefold() in CLASS_FOLDERS:
            return True, CLASS_FOLDERS[part.casefold()]
    return False, None


def build_manifest(root: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the manifest of the database at ``root`` to ``out``; returns the summary with a warning."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: ROOT must be the database folder")
    manifest = _manifest.Manifest(out, SOURCE)
    for path in _manifest.find_images(root):
        if "masks" in (p.casefold() for p in path.relative_to(root).parts[:-1]):
            continue  # lung masks of the newer layout, not radiographs
        found, label = folder_label(path, root)
        if not found:
            manifest.drop("not in a class folder")
        elif label is None:
            manifest.drop("Lung_Opacity (not one of the four classes)")
        else:
            manifest.add(path, label, f"{SOURCE}-{path.stem}", VIEW)
    return {**manifest.write(), "warning": WARNING}


def main(argv: list[str] | None = None) -> None:
    args = _manifest.parser("data_prep.radiography", __doc__).parse_args(argv)
    _manifest.run(build_manifest, args.root, args.out)


if __name__ == "__main__":
    main()
