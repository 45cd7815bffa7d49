"""``make demo``: segment a sample of cxr4 with the shipped segmenter, classify it with the
shipped patch learners, and draw a contact sheet.

    python -m patchflannel.demo --data ../shared/data --out demo_out

Writes ``demo_out/masked/`` (one masked ``.npz`` per image, summary.csv, an HDF5 pack),
``demo_out/predictions.csv`` (per film: label, source, the patient's split in the shipped
learners' training, and the mean of the learners' patch probabilities) and
``demo_out/contact_sheet.png`` (each film with its lung outline, label, source and prediction).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import cv2
import numpy as np

from .cv import read_split
from .data import read_manifest
from .errors import PatchflannelError, WeightsError
from .learners import CLASSES, Normalization, PatchEngine
from .learners.bundle import DEFAULT_LEARNERS, load_learner_set
from .segment.batch import run_batch
from .segment.segmenter import Segmenter
from .store import read_masked_npz
from .training import atomic_write
from .viz import contact_sheet, mask_overlay


def sample_rows(rows: list[dict], per_group: int, seed: int) -> list[dict]:
    """``per_group`` rows of each (label, source) pair, drawn with ``seed``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["source"]), []).append(row)
    rng = random.Random(seed)
    picked = []
    for key in sorted(groups):
        picked += rng.sample(groups[key], min(per_group, len(groups[key])))
    return picked


def classify(rows: list[dict], films: dict[str, dict], args) -> dict[str, dict]:
    """Mean of the shipped learners' patch probabilities for every segmented film in ``films``
    (``{}`` and a note when no learner bundles are found), in one batched engine call; also
    writes ``predictions.csv``."""
    try:
        learners, shared = load_learner_set(args.learners)
    except WeightsError as exc:
        print(f"note: no patch learners, films are segmented only ({exc})")
        return {}
    folder = Path(args.learners or DEFAULT_LEARNERS)
    split = read_split(folder / "split.csv") if (folder / "split.csv").is_file() else {}
    engine = PatchEngine(learners, k=args.k, patch_size=shared["patch_size"],
                         normalization=Normalization(**shared["normalization"]), seed=args.seed)
    rows = [row for row in rows if row["image"] in films]
    if not rows:
        return {}
    result = engine.predict([films[r["image"]]["masked_image"] for r in rows], [films[r["image"]]["mask"] for r in rows])
    out = {}
    for row, probs, rejected in zip(rows, result.probs, result.rejected):
        if rejected:
            continue
        mean = probs.mean(0)
        out[row["image"]] = {"image": row["image"], "label": row["label"], "source": row["source"],
                             "split": split.get(row["patient_id"], "unseen"),
                             "predicted": CLASSES[int(mean.argmax())], "probability": float(mean.max()),
                             **{f"p_{c}": round(float(v), 4) for c, v in zip(CLASSES, mean)}}
    if out:
        with open(args.out / "predictions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(next(iter(out.values()))))
            w.writeheader()
            w.writerows(out.values())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchflannel.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--per-group", type=int, default=4, help="images per (label, source) pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=None, help="segmenter bundle (default: shipped)")
    p.add_argument("--learners", type=Path, default=None, help="folder of learner bundles (default: shipped)")
    p.add_argument("--k", type=int, default=16, help="patches per film")
    args = p.parse_args(argv)

    try:
        rows = sample_rows(read_manifest(args.data / "cxr4" / "manifest.csv"), args.per_group, args.seed)
        segmenter = Segmenter.from_bundle(args.weights)
    except PatchflannelError as exc:
        raise SystemExit(f"error: {exc} (the demo reads <data>/cxr4; pass --data or set PATCHFLANNEL_DATA)")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "sample.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    masked = args.out / "masked"
    counts = run_batch(manifest, masked, segmenter, keep_unmasked=True, h5_path=masked / "sample.h5")
    records = {r["path"]: r for r in csv.DictReader(open(masked / "summary.csv"))}
    films = {path: read_masked_npz(masked / rec["output"]) for path, rec in records.items() if rec["status"] == "ok"}
    predictions = classify(rows, films, args)
    tiles = []
    for row in rows:
        rec = records.get(row["image"])
        caption = f"{row['label']} / {row['source']}"
        if row["image"] in predictions:
            pred = predictions[row["image"]]
            caption += f" -> {pred['predicted']} {pred['probability']:.2f} ({pred['split']})"
        if row["image"] in films:
            z = films[row["image"]]
            tiles.append(mask_overlay(z["image"], z["mask"], label=caption))
        else:
            blank = np.zeros((512, 512), dtype=np.uint8)
            tiles.append(mask_overlay(blank, blank > 0, label=f"{caption}: {rec['status'] if rec else 'missing'}"))
    sheet = contact_sheet(tiles)
    ok, png = cv2.imencode(".png", sheet)
    atomic_write(args.out / "contact_sheet.png", lambda tmp: Path(tmp).write_bytes(png.tobytes()))
    print(json.dumps({**counts, "classified": len(predictions), "contact_sheet": str(args.out / "contact_sheet.png"),
                      "outputs": str(masked)}))


if __name__ == "__main__":
    main()
