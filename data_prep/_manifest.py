"""What the three converters share: finding images, reading their size, writing the manifest."""
from __future__ import annotations

import argparse
import csv
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from patchflannel.files import atomic_write

#: The manifest's columns, in order (as in ``cxr4/manifest.csv``).
COLUMNS = ("image", "label", "patient_id", "source", "view", "orig_width", "orig_height")
#: The classes a row may carry; anything else is dropped before it reaches the manifest.
LABELS = ("covid", "viral", "bacterial", "normal")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: JPEG and PNG files end with these markers; a file cut short (a broken download) lacks them.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096
_EXIF_ORIENTATION = 0x0112


class SkipImage(Exception):
    """An image file that cannot go into the manifest; ``str(exc)`` is the reason counted."""


def find_images(root: str | os.PathLike, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by path.

    Hidden files and folders and ``__MACOSX/`` are left out: zip archives made on a Mac carry
    ``._<name>`` resource forks with image suffixes that are not images.
    """
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__MACOSX"]
        found += [Path(folder) / f for f in files if not f.startswith(".") and f.lower().endswith(suffixes)]
    return sorted(found)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as the library will load it, from its header only.

    Nothing is decoded. Width and height are swapped for EXIF orientations 5-8, because the
    library's loader applies the EXIF orientation. A JPEG or PNG without its end marker is
    refused as truncated: that costs one read of the file's last few KiB, not a decode.

    Raises:
        SkipImage: the file is missing, not an image, cut short or has a corrupt header.
    """
    path = Path(path)
    if not path.is_file():
        raise SkipImage("missing image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
            with Image.open(path) as im:
                width, height = im.size
                fmt = im.format
                # A PNG's EXIF may sit after the pixels; only read what the header already holds.
                orientation = im.getexif().get(_EXIF_ORIENTATION) if "exif" in im.info else None
        marker = _END_MARKERS.get(fmt)
        if marker is not None:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
                if marker not in f.read():
                    raise SkipImage("truncated image file")
    except SkipImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SkipImage("unreadable image file") from exc
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        width, height = height, width
    return width, height


class Manifest:
    """Rows for one manifest CSV, and the count of everything dropped on the way, by reason.

    Image paths are stored relative to the manifest's folder, as
    :func:`patchflannel.manifest.read_manifest` expects.
    """

    def __init__(self, out: str | os.PathLike, source: str):
        self.out = Path(out)
        self.source = source
        self.rows: list[dict] = []
        self.dropped: Counter[str] = Counter()
        self._seen: set[str] = set()

    def drop(self, reason: str) -> None:
        """Count one input that does not become a row."""
        self.dropped[reason] += 1

    def add(self, path: str | os.PathLike, label: str, patient_id: str, view: str) -> bool:
        """Append a row for the image at ``path``; ``False`` (and counted) if it is unusable."""
        if label not in LABELS:
            raise ValueError(f"label {label!r} is not one of {LABELS}")
        path = os.path.abspath(path)
        if path in self._seen:  # one film, one row, however often a source lists it
            self.drop("image listed twice")
            return False
        try:
            width, height = image_size(path)
        except SkipImage as exc:
            self.drop(str(exc))
            return False
        self._seen.add(path)
        self.rows.append({
            "image": Path(os.path.relpath(path, os.path.abspath(self.out.parent))).as_posix(),
            "label": label, "patient_id": patient_id, "source": self.source, "view": view,
            "orig_width": width, "orig_height": height,
        })
        return True

    def summary(self) -> dict:
        """Rows written, rows dropped by reason, rows per label."""
        labels = Counter(row["label"] for row in self.rows)
        return {
            "manifest": str(self.out), "source": self.source, "rows": len(self.rows),
            "dropped": dict(sorted(self.dropped.items())), "labels": {k: labels[k] for k in LABELS},
        }

    def write(self) -> dict:
        """Write the CSV atomically (readers never see a partial file) and return :meth:`summary`.

        Raises:
            ValueError: no row survived, which almost always means a wrong ``ROOT``; nothing is written.
        """
        if not self.rows:
            raise ValueError(f"no {self.source} images found or all dropped ({dict(self.dropped)}): "
                             "is ROOT the right folder?")
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.out, write)
        return self.summary()


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every converter shares: ``ROOT --out MANIFEST.csv``."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", type=Path, help="the dataset folder, in its published layout")
    p.add_argument("--out", metavar="MANIFEST.csv", type=Path, required=True,
                   help="manifest to write; image paths in it are relative to its folder")
    return p


def run(build: Callable[..., dict], *args, **kwargs) -> dict:
    """Call ``build`` and print its summary as JSON; a missing or wrong ROOT exits with a message."""
    try:
        summary = build(*args, **kwargs)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(summary, indent=2))
    return summary
