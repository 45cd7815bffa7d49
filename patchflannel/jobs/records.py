"""The one record schema of the batch jobs, and its files.

Every input of a job gets one record: ``input`` (its name in the outputs), ``path``, its
manifest columns, ``status`` (``ok`` / ``rejected`` / ``error``), ``rejection`` (why, when not
ok) and the job's own fields (``output`` for the segment job; ``predicted``, ``probabilities``...
for predict). Records are appended to a JSON-lines log as inputs finish (a killed job resumes
from it) and written out as CSV at the end, by `write_csv`, the one CSV writer.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write
from ..labels import CLASSES
from .shard import shard_logs

__all__ = ["PREDICTION_FIELDS", "RECORD_FIELDS", "SUMMARY_FIELDS", "UNCERTAINTY", "drop_torn_tail", "error_record",
           "input_record", "merge_logs", "prediction_record", "printable_name", "read_done", "read_records",
           "write_csv", "write_prediction_csv", "write_predictions"]

#: Fields of the jobs' records (both jobs'): a manifest column of one of these names is carried
#: as ``manifest_<name>``.
RECORD_FIELDS = frozenset({"input", "path", "status", "reason", "rejection", "output", "lung_fraction", "orig_shape",
                           "predicted", "probabilities", "combiner", "learners", "learner_weights", "uncertainty",
                           "overlay"})

#: The uncertainty measures a prediction record carries (see `patchflannel.evaluation.calibration.uncertainty`).
UNCERTAINTY = ("entropy", "vote_entropy", "learner_disagreement", "margin")
#: ``summary.csv`` of the segment job.
SUMMARY_FIELDS = ("input", "status", "rejection", "output", "lung_fraction", "orig_shape", "path")
#: The fields of a prediction record that are not manifest columns.
PREDICTION_FIELDS = frozenset({"input", "path", "status", "predicted", "probabilities", "combiner", "learners",
                               "learner_weights", "rejection", "lung_fraction", "uncertainty", "overlay"})


def printable_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (kept by Python as
    surrogates) become ``\\xNN`` escapes, so CSV files and packs can hold every name."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def input_record(name: str, path, columns: dict | None = None) -> dict:
    """The fields every record starts with: the input's name, path and manifest columns."""
    return {"input": name, "path": str(path), **(columns or {})}


def error_record(name: str, path, exc: BaseException, columns: dict | None = None) -> dict:
    """The record of an input that failed for a reason other than its content (``status: error``)."""
    return {**input_record(name, path, columns), "status": "error", "rejection": f"{type(exc).__name__}: {exc}"}


def prediction_record(pred, name: str | None = None, path=None, columns: dict | None = None) -> dict:
    """A `Prediction` as a record: the input (``name``/``path`` default to
    the prediction's ``source``), its manifest columns (a ``label`` column stays the truth), and
    the prediction (``predicted``, probabilities, per-learner results) or the rejection."""
    result = pred.to_dict()
    result["predicted"] = result.pop("label")
    source = result.pop("source")
    return {**input_record(source if name is None else name, source if path is None else path, columns),
            "status": "ok" if pred.ok else "rejected", **result}


def read_records(path: Path) -> dict[str, dict]:
    """Last record per ``input`` of a JSON-lines log (a torn last line is ignored)."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "reason" in rec:  # the segment job's summaries before one schema
                rec["rejection"] = rec.pop("reason")
            records[rec["input"]] = rec
    return records


def read_done(out_dir: Path, base: str, log_path: Path) -> dict[str, dict]:
    """What a (sharded) job has already recorded: the folder's ``base`` log, then its own."""
    done = read_records(out_dir / base)
    if log_path != out_dir / base:
        done.update(read_records(log_path))
    return done


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write) so appended records start on a new line."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)


def merge_logs(out_dir: Path, base: str, names: list[str]) -> list[dict]:
    """Fold the shard logs of ``base`` (e.g. ``summary.jsonl``) into ``out_dir/base``: the last
    record of each of ``names``, in that order, written atomically; the shard logs are then
    removed (a later unsharded rerun appends to ``base``). Returns the records."""
    records = read_records(out_dir / base)
    logs = shard_logs(out_dir, base)
    for log_file in logs:
        records.update(read_records(log_file))
    ordered = [records[n] for n in names if n in records]
    atomic_write(out_dir / base, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in ordered)))
    for log_file in logs:
        log_file.unlink()
    return ordered


def write_csv(path: str | os.PathLike, records: Sequence[dict], fields: Sequence[str]) -> None:
    """One row per record with ``fields`` as columns (other keys dropped; text made printable,
    see `printable_name`), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({k: printable_name(v) if isinstance(v, str) else v for k, v in r.items()})
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:  # any file name
            f.write(buffer.getvalue())

    atomic_write(path, write)


def write_prediction_csv(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """``predictions.csv``: input, path, the manifest's columns, status, predicted class, the
    four probabilities, the uncertainty measures, combiner, lung fraction, rejection (and the
    overlay, when written)."""
    columns = sorted({k for r in records for k in r} - PREDICTION_FIELDS)  # the manifest's
    overlay = ["overlay"] if any("overlay" in r for r in records) else []
    fields = ["input", "path", *columns, "status", "predicted", *[f"p_{c}" for c in CLASSES], *UNCERTAINTY,
              "combiner", "lung_fraction", "rejection", *overlay]
    rows = [{**r, **{f"p_{c}": (r.get("probabilities") or {}).get(c, "") for c in CLASSES},
             **(r.get("uncertainty") or {})} for r in records]
    write_csv(path, rows, fields)


def write_predictions(predictions: Sequence, path: str | os.PathLike) -> None:
    """Write `Prediction` objects to ``.csv`` (one row each, as the predict
    job writes them) or ``.json`` (a list of their records), atomically."""
    path = Path(path)
    records = [prediction_record(p) for p in predictions]
    if path.suffix.lower() == ".csv":
        write_prediction_csv(path, records)
    elif path.suffix.lower() == ".json":
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))
    else:
        raise ValueError(f"{path}: write predictions to a .csv or .json file")
