"""Batch prediction: ``python -m patchflannel.predict INPUT --out FOLDER``.

INPUT is a folder of images (searched recursively), a manifest CSV with an ``image`` column
(paths relative to the CSV), or one image file. Every input gets one line in
``FOLDER/predictions.jsonl`` as its batch finishes (predicted class, probabilities, per-learner
probabilities and patch votes, or the reason it was rejected), so a killed job loses at most
one batch and a rerun skips what is done. ``FOLDER/predictions.csv`` (one row per input, the
manifest's other columns kept) is rewritten atomically at the end. Exit codes (shared with
``patchflannel.segment``): 0 something was done, 1 nothing could be done, 2 a usage error;
``--retry-failed`` redoes inputs recorded as rejected or error. ``--explain`` also writes ``FOLDER/overlays/<input>.png``
for every classified input: the film with its lung outline, the Grad-CAM heatmap over the
lung patches, the probabilities and the uncertainty (`patchflannel.viz.explanation_figure`).
``--shard i/n`` runs one of n shards into the same folder (``--shard auto`` under torchrun or
a SLURM array); ``--merge`` then writes ``predictions.jsonl``/``.csv`` as one job would.

    python -m patchflannel.predict ../shared/data/cxr4/manifest.csv --out runs/predict --k 100
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .runtime import BACKEND_HELP, BACKENDS
from .errors import EXIT_NOTHING_DONE, EXIT_USAGE, PatchflannelError, run_command
from .files import atomic_write
from .jobs.records import (
    drop_torn_tail,
    error_record,
    merge_logs,
    prediction_record,
    read_done,
    write_prediction_csv,
)
from .jobs.shard import Shard
from .jobs.shell import (
    BatchInput,
    collect_inputs,
    exit_status,
    job_inputs,
    prepare_out_dir,
    remove_stale_temp_files,
    unique_file_name,
)
from .pipeline import Pipeline

__all__ = ["main", "merge_predictions", "overlay_name", "run_predict", "write_overlay"]

log = logging.getLogger(__name__)
JSONL, CSV = "predictions.jsonl", "predictions.csv"


def overlay_name(input_name: str) -> str:
    """A flat, safe file name for an input's overlay, unique per input (a short hash of its
    name): never a path that leaves ``overlays/``."""
    return unique_file_name(input_name, ".png")


def write_overlay(out_dir: Path, record: dict, pred) -> None:
    """Draw ``pred``'s explanation into ``out_dir/overlays`` (atomic) and note it in ``record``."""
    import cv2

    from .viz import explanation_figure

    name = Path("overlays") / overlay_name(record["input"])
    _, png = cv2.imencode(".png", explanation_figure(pred))
    (out_dir / "overlays").mkdir(exist_ok=True)
    atomic_write(out_dir / name, lambda tmp: Path(tmp).write_bytes(png.tobytes()))
    record["overlay"] = str(name)


def run_predict(source, out_dir, pipeline, *, batch_size: int = 8, explain: bool = False,
                progress: bool = True, shard: Shard | None = None, retry_failed: bool = False,
                items: list[BatchInput] | None = None) -> dict:
    """Predict every input of ``source`` not yet in ``out_dir``; returns counts by status.
    ``explain`` writes an overlay PNG per classified input. With ``shard``, only that shard's
    inputs, logged apart; `merge_predictions` combines the shards. ``retry_failed`` redoes
    inputs recorded as rejected or error (a full disk, a file fixed since). ``items``: the
    inputs, if already listed with `collect_inputs`.

    Returns ``{"inputs", "ok", "rejected", "error", "skipped", "total"}``: the statuses of the
    inputs done by this run, as the segment job counts them; ``skipped`` were done by an
    earlier run (their records are in ``predictions.jsonl``).
    """
    out_dir = prepare_out_dir(out_dir)
    if items is None:
        items = collect_inputs(source, exclude=out_dir)
    if shard is not None:
        items = [it for it in items if shard.owns(it.name)]
    log_path = out_dir / (shard.log_name(JSONL) if shard else JSONL)
    remove_stale_temp_files(out_dir, shard)  # overlays and CSVs of a killed run
    done = read_done(out_dir, JSONL, log_path)
    drop_torn_tail(log_path)
    finished = lambda rec: rec is not None and (rec["status"] == "ok" or not retry_failed)  # noqa: E731
    todo = [it for it in items if not finished(done.get(it.name))]
    log.info("%d inputs, %d already done", len(items), len(items) - len(todo))

    def record(item: BatchInput, pred) -> dict:
        rec = prediction_record(pred, item.name, item.path, item.columns)
        if explain and pred.ok:
            try:
                write_overlay(out_dir, rec, pred)
            except OSError as exc:  # a full disk: recorded, redone with --retry-failed
                rec = error_record(item.name, item.path, exc, item.columns)
        return rec

    with open(log_path, "a") as sink:
        for start in tqdm(range(0, len(todo), batch_size), desc="predicting", disable=not progress):
            batch = todo[start:start + batch_size]
            try:
                records = [record(it, p) for it, p in zip(batch, pipeline.predict([it.path for it in batch],
                                                                                  explain=explain))]
            except Exception:  # one bad input must not take its batch down: retry one by one
                records = []
                for it in batch:
                    try:
                        records.append(record(it, pipeline.predict(it.path, explain=explain)))
                    except Exception as exc:  # noqa: BLE001
                        log.exception("failed on %s", it.path)
                        records.append(error_record(it.name, it.path, exc, it.columns))
            sink.write("".join(json.dumps(r) + "\n" for r in records))
            sink.flush()
            done.update({r["input"]: r for r in records})
    if shard is None:
        write_prediction_csv(out_dir / CSV, [done[it.name] for it in items if it.name in done])
    now = [done[it.name]["status"] for it in todo if it.name in done]
    counts = {s: now.count(s) for s in ("ok", "rejected", "error")}
    return {"inputs": len(items), **counts, "skipped": len(items) - len(todo), "total": len(items)}


def merge_predictions(source, out_dir) -> dict:
    """Combine the shard logs of ``out_dir`` into ``predictions.jsonl`` and ``predictions.csv``
    (input order), then remove them; returns counts by status and how many inputs are missing."""
    out_dir = Path(out_dir)
    items = collect_inputs(source, exclude=out_dir)
    remove_stale_temp_files(out_dir)  # every shard has finished
    ordered = merge_logs(out_dir, JSONL, [it.name for it in items])
    write_prediction_csv(out_dir / CSV, ordered)
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "rejected", "error")}
    return {"inputs": len(items), **counts, "missing": len(items) - len(ordered)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchflannel.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder of images, manifest CSV (image column) or one image file")
    p.add_argument("--out", type=Path, required=True, help="output folder (predictions.jsonl, predictions.csv)")
    p.add_argument("--pipeline", default=None, help="pipeline bundle folder (default: weights/pipeline-lite)")
    p.add_argument("--segmenter", default=None, help="use separate bundles instead: a segmenter bundle")
    p.add_argument("--learners", default=None, help="... a folder of learner bundles")
    p.add_argument("--ensemble", default=None, help="... a FLANNEL weight-module bundle (else the learners' mean)")
    p.add_argument("--k", type=int, default=None, help="patches per image (default: the bundle's, 100)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=BACKENDS, default="torch", help=BACKEND_HELP)
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=False,
                   help="classify each film from as few of its K patches as settle its label (K stays the cap)")
    p.add_argument("--explain", action="store_true", help="write a Grad-CAM overlay PNG per classified input")
    p.add_argument("--shard", default=None,
                   help="i/n: only shard i (from 0) of n, logged apart (auto: from torchrun/SLURM variables)")
    p.add_argument("--merge", action="store_true", help="combine the shards' logs into predictions.* and exit")
    p.add_argument("--retry-failed", action="store_true", help="redo inputs recorded as rejected or error")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.merge:
            counts = merge_predictions(args.input, args.out)
            print(json.dumps(counts))
            return 0 if not counts["missing"] else 1
        shard = Shard.parse(args.shard)
        # Inputs and the output folder are checked before any model loads.
        out_dir, items = job_inputs(args.input, args.out)
        if not items:
            print(f"error: {args.input}: no images found", file=sys.stderr)
            return exit_status({"total": 0, "ok": 0})
        settings = {k: v for k, v in (("k", args.k), ("seed", args.seed)) if v is not None}
        settings.update(backend=args.backend, adaptive=args.adaptive)
        if args.segmenter or args.learners or args.ensemble:
            pipeline = Pipeline.from_bundles(args.segmenter, args.learners, args.ensemble, device=args.device,
                                             batch_size=args.batch_size, **settings)
        else:
            pipeline = Pipeline.from_pretrained(args.pipeline, device=args.device, batch_size=args.batch_size,
                                                **settings)
        counts = run_predict(args.input, out_dir, pipeline, batch_size=args.batch_size, explain=args.explain,
                             progress=not args.no_progress, shard=shard, retry_failed=args.retry_failed, items=items)
    except (PatchflannelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk or a folder that turned read-only mid-run
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    print(json.dumps(counts))
    return exit_status(counts)


if __name__ == "__main__":
    sys.exit(run_command(main))
