"""Lung segmentation quality on held-out patients, overall and per source. Prints JSON.

    python benchmarks/segment_quality.py --weights weights/segmenter-fcdensenet-lite \
        --data ../shared/data/lungseg

The test patients are read from the bundle's ``split.csv``. Each test image goes through
the full inference path (decode, preprocess, network, upsampling to the original size,
post-processing) and is scored against its mask at the file's resolution: mean per-image
Jaccard and Dice. ``overall`` covers the sources of the convention the model learned;
``gbseg`` masks exclude the heart shadow and are reported as a cross-convention check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _report import emit  # benchmarks/ is first on sys.path when a script runs

from patchflannel.evaluation.splits import read_split
from patchflannel.manifest import read_manifest
from patchflannel.io import load_image, load_mask
from patchflannel.segment import Segmenter
from patchflannel.evaluation.metrics import jaccard_dice


def summarise(scores: list[tuple[float, float]]) -> dict:
    j, d = np.array(scores).T
    return {"n": len(scores), "jaccard_mean": round(float(j.mean()), 4), "jaccard_median": round(float(np.median(j)), 4),
            "jaccard_min": round(float(j.min()), 4), "dice_mean": round(float(d.mean()), 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="lungseg folder")
    p.add_argument("--split", default="test", help="which split of split.csv to score")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    segmenter = Segmenter.from_bundle(args.weights, device="cpu", batch_size=args.batch_size)
    split = read_split(args.weights / "split.csv")
    rows = [r for r in read_manifest(args.data / "manifest.csv") if split.get(r["patient_id"]) == args.split]
    train_sources = set(segmenter.config.get("training", {}).get("train_sources", ["v7darwin", "v7darwin-kermany"]))
    by_source: dict[str, list] = {}
    t0 = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i : i + args.batch_size]
        results = segmenter.segment_batch([load_image(r["image"]) for r in chunk], working=False)
        for row, res in zip(chunk, results):
            by_source.setdefault(row["source"], []).append(jaccard_dice(res.mask, load_mask(row["mask"])))
    seconds = time.perf_counter() - t0
    report = {
        "weights": str(args.weights),
        "segmenter_id": segmenter.id,
        "split": args.split,
        "patients": len({r["patient_id"] for r in rows}),
        "overall": summarise([s for src, v in by_source.items() if src in train_sources for s in v]),
        "overall_sources": sorted(train_sources),
        "per_source": {src: summarise(v) for src, v in sorted(by_source.items())},
        "seconds": round(seconds, 1),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
