"""Kermany et al.'s pediatric pneumonia set (``chest_xray/``) -> manifest CSV.

    python -m data_prep.kermany ROOT --out MANIFEST.csv

``ROOT`` is ``chest_xray/`` with ``train/``, ``test/`` and ``val/``, each holding ``NORMAL/`` and
``PNEUMONIA/`` (searched recursively; ``.jpeg``, ``.jpg``, ``.png``). The published
train/test/val split is not recorded: split by ``patient_id``. The label comes from the file name
and must agree with the folder the file is in:

* ``person<N>_bacteria_<M>`` -> bacterial, ``person<N>_virus_<M>`` -> viral (in ``PNEUMONIA/``);
* ``IM-<NNNN>-<MMMM>``, ``NORMAL2-IM-<NNNN>-<MMMM>`` -> normal (in ``NORMAL/``).

Byte-identical files are kept once, the first in sorted path order. ``view`` is ``AP`` for every
film (the set has no per-image view; Kermany et al. describe anterior-posterior films).
Prints a JSON summary.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from . import _manifest

SOURCE = "kermany"
VIEW = "AP"
_PNEUMONIA = re.compile(r"(person\d+)_(bacteria|virus)_\d+")
_NORMAL = re.compile(r"(?:NORMAL2-)?(IM-\d+)-\d+")
_FOLDER_LABELS = {"NORMAL": {"normal"}, "PNEUMONIA": {"bacterial", "viral"}}


def kermany_label(stem: str) -> tuple[str, str] | None:
    """``(label, patient_id)`` from a file name without suffix, or ``None`` if it matches no class.

    ``person12_virus_44`` -> ``("viral", "kermany-person12")``. Normal films use their
    ``IM-NNNN`` prefix, also for ``NORMAL2-IM-NNNN-MMMM``, as the data README does.
    """
    if m := _PNEUMONIA.fullmatch(stem):
        return ("bacterial" if m[2] == "bacteria" else "viral"), f"{SOURCE}-{m[1]}"
    if m := _NORMAL.fullmatch(stem):
        return "normal", f"{SOURCE}-{m[1]}"
    return None


def build_manifest(root: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the manifest of the Kermany set at ``root`` to ``out``; returns the summary."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: ROOT must be chest_xray/")
    manifest = _manifest.Manifest(out, SOURCE)
    kept_digests: set[str] = set()
    for path in _manifest.find_images(root):
        parsed = kermany_label(path.stem)
        expected = _FOLDER_LABELS.get(path.parent.name.upper())
        if parsed is None:
            manifest.drop("file name matches no class")
        elif expected is None:
            manifest.drop("not in a NORMAL/ or PNEUMONIA/ folder")
        elif parsed[0] not in expected:
            manifest.drop("label disagrees with folder")
        else:
            try:
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
            except OSError:
                manifest.drop("unreadable image file")
                continue
            # Only kept files count as "first": a copy of a dropped file may still be kept.
            if digest in kept_digests:
                manifest.drop("duplicate file (same SHA-1)")
            elif manifest.add(path, parsed[0], parsed[1], VIEW):
                kept_digests.add(digest)
    return manifest.write()


def main(argv: list[str] | None = None) -> None:
    args = _manifest.parser("data_prep.kermany", __doc__).parse_args(argv)
    _manifest.run(build_manifest, args.root, args.out)


if __name__ == "__main__":
    main()
