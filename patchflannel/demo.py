"""``make demo``: the whole pipeline on a sample of cxr4, with a report a person can read.

    python -m patchflannel.demo --data ../shared/data --out demo_out

Runs the Stage 1 batch job on the sample (``demo_out/masked/``: one masked ``.npz`` per film,
summary.csv, an HDF5 pack), then Stage 2 of the shipped pipeline bundle (patch learners, FLANNEL
weight module) on those segmentations (each film is segmented once), in the predict job's record format
(``demo_out/predictions/predictions.csv``), and writes ``demo_out/report.html`` (per film: the image with its lung outline
and patch centres, the true label, source and the patient's split in the learners' training,
the predicted probabilities, the uncertainty, each learner's vote and the Grad-CAM heatmap
over the lung patches) with ``demo_out/contact_sheet.png``.
"""
from __future__ import annotations

import sys
import argparse
import csv
import html
import json
import random
from pathlib import Path

import cv2
import numpy as np

from .runtime import BACKEND_HELP, BACKENDS
from .evaluation.splits import read_split
from .manifest import read_manifest
from .errors import PatchflannelError, run_command
from .io import load_image
from .labels import CLASSES
from .preprocess import Letterbox
from .files import atomic_write
from .viz import contact_sheet, explanation_figure, mask_overlay

__all__ = ["film_tile", "main", "sample_rows", "write_report"]


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


def film_tile(pred, size: int = 384) -> np.ndarray:
    """The film letterboxed like the learners saw it, lung outline, patch centres and caption."""
    grey = load_image(pred.source) if pred.mask is not None else np.zeros((size, size), np.float32)
    mask = pred.mask if pred.mask is not None else np.zeros((size, size), bool)
    image = Letterbox(grey.shape, mask.shape[0]).apply(np.round(grey * 255).astype(np.uint8))
    caption = (f"{pred.label} {pred.probabilities[pred.label]:.2f}" if pred.ok else "rejected")
    tile = mask_overlay(image, mask, label=caption)
    if pred.centres is not None:
        for y, x in pred.centres:
            cv2.circle(tile, (int(x), int(y)), max(2, mask.shape[0] // 200), (80, 80, 255), -1)
    return cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)


def write_report(out: Path, rows: list[dict], preds: list, split: dict[str, str]) -> None:
    """``report.html`` with one PNG per film under ``report/``."""
    (out / "report").mkdir(parents=True, exist_ok=True)
    cells = []
    for i, (row, pred) in enumerate(zip(rows, preds)):
        png = f"report/{i:03d}.png"
        _, data = cv2.imencode(".png", explanation_figure(pred) if pred.heatmap is not None else film_tile(pred))
        (out / png).write_bytes(data.tobytes())
        if pred.ok:
            bars = "".join(f"<tr><td>{c}</td><td><div class=bar style='width:{100 * pred.probabilities[c]:.0f}px'>"
                           f"</div></td><td>{pred.probabilities[c]:.2f}</td></tr>" for c in CLASSES)
            votes = ", ".join(f"{html.escape(n)}: {v['label']}" for n, v in pred.learners.items())
            verdict = "right" if pred.label == row["label"] else "wrong"
            body = f"<b class={verdict}>{pred.label}</b><table>{bars}</table><small>{votes}</small>"
        else:
            body = f"<b class=wrong>rejected</b><br><small>{html.escape(pred.rejection or '')}</small>"
        cells.append(f"<div class=film><img src='{png}'><div>truth <b>{row['label']}</b> · {row['source']} · "
                     f"{split.get(row['patient_id'], 'unseen')}</div>{body}</div>")
    combiner = next((p.combiner for p in preds if p.ok), "-")
    page = f"""<!doctype html><meta charset=utf-8><title>patchflannel demo</title>
<style>body{{font-family:sans-serif;margin:1em}} .film{{display:inline-block;width:670px;vertical-align:top;
margin:6px;font-size:13px}} .film img{{width:662px}} .bar{{background:#4a7;height:10px}} .right{{color:#282}} .wrong{{color:#c22}}
table{{border-collapse:collapse}} td{{padding:0 4px}}</style>
<h2>patchflannel: {len(rows)} cxr4 films</h2>
<p>Combined by: {html.escape(combiner)}. Left: the film as the learners saw it, lung outline, red dots at
the lung patch centres. Middle: where the learners looked for the predicted class (Grad-CAM over the
patches, averaged where they overlap, weighted by the ensemble). Right: probabilities (temperature-calibrated),
uncertainty and each learner's label. "train/val/test" is the patient's
split in the learners' training ("test" films were never seen). cxr4's covid films are all adults and its
other classes mostly children: read covid vs rest as partly adult vs child.</p>
{''.join(cells)}"""
    atomic_write(out / "report.html", lambda tmp: Path(tmp).write_text(page))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchflannel.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--per-group", type=int, default=4, help="films per (label, source) pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline", type=Path, default=None, help="pipeline bundle (default: weights/pipeline-lite)")
    p.add_argument("--k", type=int, default=32, help="patches per film (32 keeps the demo short; the pipeline's own default is its bundle's)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, ...")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    args = p.parse_args(argv)

    from .hub import default_bundle
    from .pipeline import Pipeline, Prediction
    from .jobs.records import prediction_record, write_prediction_csv
    from .jobs.shell import collect_inputs
    from .segment.job import read_summary, run_batch

    try:
        rows = sample_rows(read_manifest(args.data / "cxr4" / "manifest.csv"), args.per_group, args.seed)
        pipeline = Pipeline.from_pretrained(args.pipeline, k=args.k, device=args.device, backend=args.backend)
    except PatchflannelError as exc:
        raise SystemExit(f"error: {exc} (the demo reads <data>/cxr4; pass --data or set PATCHFLANNEL_DATA)")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "sample.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    masked = args.out / "masked"
    # Outputs named relative to the data's cxr4 folder: masked/images/<label>/<film>.npz
    cxr4 = args.data / "cxr4"
    # Stage 1 once: the segment job writes the masked store, and its segmentations go on to Stage 2.
    segmented: dict[str, tuple] = {}
    stage1 = run_batch(manifest, masked, pipeline.segmenter, h5_path=masked / "sample.h5", root=cxr4,
                       on_segmented=lambda item, image, seg: segmented.__setitem__(item.name, (image, seg)))
    items = collect_inputs(manifest, root=cxr4)
    summary = read_summary(masked)
    done = [it for it in items if it.name in segmented]
    by_name = dict(zip((it.name for it in done),
                       pipeline.predict_segmented([segmented[it.name][0] for it in done],
                                                  [segmented[it.name][1] for it in done],
                                                  names=[str(it.path) for it in done], explain=True)))
    # Films a previous run already segmented (the job resumed past them): Stage 1 and 2 here.
    earlier = [it for it in items if it.name not in segmented and summary.get(it.name, {}).get("status") == "ok"]
    by_name.update(zip((it.name for it in earlier), pipeline.predict([it.path for it in earlier], explain=True)))
    preds = [by_name.get(it.name) or Prediction(source=str(it.path),
                                                rejection=summary.get(it.name, {}).get("rejection") or "not segmented")
             for it in items]  # kept for the report
    (args.out / "predictions").mkdir(exist_ok=True)
    write_prediction_csv(args.out / "predictions" / "predictions.csv",
                         [prediction_record(pr, it.name, it.path, it.columns) for it, pr in zip(items, preds)])
    split_file = default_bundle("learners") / "split.csv"
    split = read_split(split_file) if split_file.is_file() else {}
    write_report(args.out, rows, preds, split)
    sheet = contact_sheet([film_tile(pr, 256) for pr in preds])
    _, png = cv2.imencode(".png", sheet)
    atomic_write(args.out / "contact_sheet.png", lambda tmp: Path(tmp).write_bytes(png.tobytes()))
    right = sum(pr.ok and pr.label == r["label"] for pr, r in zip(preds, rows))
    print(json.dumps({"stage1": stage1, "classified": sum(pr.ok for pr in preds), "correct": right, "films": len(rows),
                      "report": str(args.out / "report.html"), "contact_sheet": str(args.out / "contact_sheet.png")}))


if __name__ == "__main__":
    sys.exit(run_command(main))
