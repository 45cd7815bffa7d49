"""Manifests (CSV: path columns relative to the manifest's folder) and the data location."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import DataNotFoundError

#: Environment variable naming the folder that holds ``lungseg/``, ``cxr4/`` and ``adult/``.
DATA_ENV = "PATCHFLANNEL_DATA"


def data_root(default: str | os.PathLike | None = None) -> Path:
    """The data folder: ``$PATCHFLANNEL_DATA`` if set, else ``default``.

    Raises:
        DataNotFoundError: neither names an existing folder.
    """
    value = os.environ.get(DATA_ENV) or default
    if not value or not Path(value).is_dir():
        raise DataNotFoundError(
            f"data folder not found ({value or 'unset'}): set {DATA_ENV} to the folder holding lungseg/, cxr4/, adult/"
        )
    return Path(value)


def read_manifest(path: str | os.PathLike, path_columns: tuple[str, ...] = ("image", "mask")) -> list[dict]:
    """Rows of a manifest CSV as dicts; the named path columns become absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"manifest not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for col in path_columns:
            if row.get(col):
                row[col] = str((path.parent / row[col]).resolve())
    return rows
