"""The input gate on non-chest-X-ray images and on every real film of the data. Prints JSON.

    python benchmarks/rejection.py --data ../shared/data --out benchmarks/results/rejection.json

(a) Non-CXR images, all available offline: the sample photographs and scientific images that
ship with scikit-image and matplotlib (a brain MRI slice, a CT phantom, a retina, faces,
text pages...) and generated ones (noise, blank, gradients, stripes, text, shapes, and two
dark ellipses on a bright field: a crude pair of "lungs"). (b) Every film of the data's
manifests (``lungseg``, ``cxr4``, ``adult``). Each input goes through the shipped segmenter
exactly as in :class:`patchflannel.Pipeline` (decode limits included) and the gate
(:class:`patchflannel.segment.LungCheck`) accepts or rejects it.

Targets: >= 95 % of (a) rejected, <= 2 % of (b) rejected. ``--features CSV`` also writes
every input's gate measures (:func:`patchflannel.segment.lung_features`), to study or tune
the limits.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit

from patchflannel.manifest import data_root, read_manifest
from patchflannel.errors import InvalidImageError
from patchflannel.io import as_grey_float, load_image
from patchflannel.evaluation.non_cxr import non_cxr_images
from patchflannel.segment import LungCheck, Segmenter, lung_features

MANIFESTS = ("lungseg", "cxr4", "adult")


def real_films(root: Path) -> list[tuple[str, str, Path]]:
    """``(part, source, path)`` of every film in the data's manifests."""
    films = []
    for part in MANIFESTS:
        manifest = root / part / "manifest.csv"
        if manifest.is_file():
            films += [(part, row.get("source", part), Path(row["image"])) for row in read_manifest(manifest)]
    return films


def gate(segmenter: Segmenter, items: list, load) -> list[tuple[str | None, dict | None]]:
    """``(rejection, features)`` per item, through decoding, the segmenter and its gate."""
    out = []
    for start in range(0, len(items), segmenter.batch_size):
        chunk, images = items[start:start + segmenter.batch_size], []
        for item in chunk:
            try:
                images.append(load(item))
            except InvalidImageError as exc:
                images.append(exc)
        ok = [im for im in images if not isinstance(im, Exception)]
        probs = iter(segmenter.probabilities([segmenter.network_input(im) for im in ok]) if ok else [])
        for im in images:
            if isinstance(im, Exception):
                out.append((f"unreadable: {im.reason}", None))
                continue
            features = lung_features(next(probs), segmenter.threshold)
            out.append((segmenter.lung_check.judge(features), features))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $PATCHFLANNEL_DATA or ../shared/data)")
    p.add_argument("--weights", type=Path, default=None, help="segmenter bundle (default: the shipped one)")
    p.add_argument("--limit", type=int, default=None, help="first N real films of each part (smoke runs)")
    p.add_argument("--features", type=Path, default=None, help="also write every input's gate measures here")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    segmenter = Segmenter.from_bundle(args.weights)
    check: LungCheck = segmenter.lung_check

    photos = non_cxr_images()
    photo_results = gate(segmenter, list(photos.values()), as_grey_float)
    films = real_films(data_root(args.data))
    if args.limit:
        films = [f for part in MANIFESTS for f in [x for x in films if x[0] == part][:args.limit]]
    film_results = []
    for start in tqdm(range(0, len(films), 64), desc="real films", leave=False):
        film_results += gate(segmenter, [f[2] for f in films[start:start + 64]], load_image)

    def group(results):
        reasons = Counter((r or "accepted").split(" (")[0].split(":")[0] for r, _ in results)
        rejected = sum(r is not None for r, _ in results)
        return {"n": len(results), "rejected": rejected, "rejected_fraction": round(rejected / max(len(results), 1), 4),
                "reasons": dict(reasons)}

    by_source: dict[str, list] = {}
    for (part, source, _), res in zip(films, film_results):
        by_source.setdefault(f"{part}/{source}", []).append(res)
    non_cxr, real = group(photo_results), group(film_results)
    report = {
        "gate": check.to_dict(), "segmenter": segmenter.id,
        "non_cxr": {**non_cxr, "accepted": [n for n, (r, _) in zip(photos, photo_results) if r is None]},
        "real_cxr": {**real, "rejected_films": [f"{f[0]}/{f[2].name}: {r}" for f, (r, _) in zip(films, film_results)
                                                if r is not None][:40]},
        "real_cxr_by_source": {s: group(rs) for s, rs in sorted(by_source.items())},
        "targets": {"non_cxr_rejected_min": 0.95, "real_cxr_rejected_max": 0.02,
                    "met": non_cxr["rejected_fraction"] >= 0.95 and real["rejected_fraction"] <= 0.02},
    }
    if args.features:
        rows = [{"group": "non_cxr", "name": n, "rejection": r or "", **(f or {})}
                for n, (r, f) in zip(photos, photo_results)]
        rows += [{"group": f"{f[0]}/{f[1]}", "name": f[2].name, "rejection": r or "", **(feat or {})}
                 for f, (r, feat) in zip(films, film_results)]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with open(args.features, "w", newline="") as fh:
            w = csv.DictWriter(fh, keys)
            w.writeheader()
            w.writerows(rows)
    return emit(report, args.out)


if __name__ == "__main__":
    main()
