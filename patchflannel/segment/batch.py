"""The Stage 1 batch job: a folder or manifest of CXRs -> one masked ``.npz`` per image.

Decoding/preprocessing and post-processing/compression run in worker threads while the
main thread runs the network on the previous batch, so I/O hides behind the model.
Outputs are written atomically; a ``summary.jsonl`` line is appended for every input
as it finishes (ok / rejected / error), and a rerun skips every input that already has
a record, so a killed job resumes where it stopped. ``summary.csv`` is rewritten at the end.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..errors import PatchflannelError
from ..io import load_image
from ..shard import Shard, shard_logs
from ..store import pack_npz_files, write_masked_npz
from ..training import atomic_write
from .segmenter import Segmenter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
SUMMARY_JSONL = "summary.jsonl"
SUMMARY_CSV = "summary.csv"


@dataclass
class BatchInput:
    """One input of the job: where it is, what it is called in the outputs, its manifest row."""

    path: Path
    name: str
    columns: dict = field(default_factory=dict)


def _relative_name(path: Path, root: Path) -> str:
    """A name for ``path`` that cannot escape the output folder."""
    try:
        rel = path.resolve().relative_to(root.resolve())
        return rel.as_posix()
    except ValueError:  # outside the root: a flat, unique name
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        return f"_external/{path.name}-{digest}"


def collect_inputs(source: str | os.PathLike, path_column: str = "image") -> list[BatchInput]:
    """Images under a folder (recursive, sorted), the rows of a manifest CSV, or one image file."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() != ".csv":
        return [BatchInput(source, source.name)]
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [BatchInput(p, _relative_name(p, source)) for p in paths]
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and path_column not in rows[0]:
            raise PatchflannelError(f"{source}: manifest has no {path_column!r} column (columns: {list(rows[0])})")
        inputs = []
        for row in rows:
            p = Path(row[path_column])
            p = p if p.is_absolute() else source.parent / p
            inputs.append(BatchInput(p, _relative_name(p, source.parent), {k: v for k, v in row.items() if k != path_column}))
        return inputs
    raise PatchflannelError(f"{source}: expected a folder of images, a manifest .csv or an image file")


def output_path(out_dir: Path, name: str) -> Path:
    """``<out_dir>/<name>.npz``, refusing names that would land outside ``out_dir``."""
    out = (out_dir / f"{name}.npz").resolve()
    if not out.is_relative_to(out_dir.resolve()):
        raise PatchflannelError(f"output name {name!r} would escape the output folder")
    return out


def read_summary(out_dir: Path) -> dict[str, dict]:
    """Last record per input name from ``summary.jsonl`` (a torn last line is ignored)."""
    return read_records(out_dir / SUMMARY_JSONL)


def read_records(path: Path) -> dict[str, dict]:
    """Last record per ``input`` of a JSON-lines log (a torn last line is ignored)."""
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
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


def _temp_target(tmp: Path, out_dir: Path) -> str:
    """The output name (relative, ``.npz`` dropped) an ``atomic_write`` temp file was for."""
    target = tmp.name[1:].rsplit(".", 2)[0]  # ".<name>.<random>.tmp" -> "<name>"
    rel = (tmp.parent / target).relative_to(out_dir).as_posix()
    return rel.removesuffix(".npz")


def remove_stale_temp_files(out_dir: Path, shard: Shard | None = None) -> int:
    """Delete temporary files a killed run left behind: all of them, or only those of
    ``shard``'s inputs when shards share the folder (the others may be live)."""
    stale = [p for p in out_dir.rglob(".*.tmp")
             if p.is_file() and (shard is None or shard.owns(_temp_target(p, out_dir)))]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    return len(stale)


def _finished(rec: dict | None, out_dir: Path, retry_failed: bool) -> bool:
    if rec is None:
        return False
    if rec["status"] == "ok":
        return (out_dir / rec["output"]).is_file()
    return not retry_failed


def run_batch(source, out_dir, segmenter: Segmenter, *, batch_size: int = 16, workers: int = 2,
              path_column: str = "image", keep_unmasked: bool = False, retry_failed: bool = False,
              h5_path=None, progress: bool = True, limit: int | None = None, shard: Shard | None = None) -> dict:
    """Segment every input of ``source`` into ``out_dir``; returns counts by status.

    With ``shard``, only that shard's inputs (see :mod:`patchflannel.shard`), logged to the
    shard's own summary; :func:`merge_shards` then writes the folder's summary and pack.

    Returns ``{"ok", "rejected", "error", "skipped", "total"}`` for this run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = collect_inputs(source, path_column)[:limit]
    if shard is not None:
        inputs = [x for x in inputs if shard.owns(x.name)]
    log_path = out_dir / (shard.log_name(SUMMARY_JSONL) if shard else SUMMARY_JSONL)
    remove_stale_temp_files(out_dir, shard)
    done = read_done(out_dir, SUMMARY_JSONL, log_path)
    todo = [x for x in inputs if not _finished(done.get(x.name), out_dir, retry_failed)]
    counts = {"ok": 0, "rejected": 0, "error": 0, "skipped": len(inputs) - len(todo), "total": len(inputs)}
    cv2.setNumThreads(1)  # the worker threads are the parallelism; avoid oversubscribing the cores
    preprocess = segmenter.preprocess.to_dict()

    def decode(item: BatchInput):
        image = load_image(item.path)
        return image, segmenter.network_input(image)

    def finish(item: BatchInput, image: np.ndarray, probability: np.ndarray) -> dict:
        result = segmenter.finish(image, probability, original_mask=False, working=True)
        rec = {"input": item.name, "path": str(item.path), "orig_shape": list(image.shape),
               "lung_fraction": round(result.lung_fraction, 4)}
        if not result.ok:
            return {**rec, "status": "rejected", "reason": result.rejection, "output": None}
        out = output_path(out_dir, item.name)
        write_masked_npz(out, working_image=result.working_image, working_mask=result.working_mask,
                         orig_shape=image.shape, content_box=result.letterbox.content_box,
                         scale=result.letterbox.scale,
                         segmenter=segmenter.id, preprocess=preprocess, source=str(item.path),
                         keep_unmasked=keep_unmasked)
        return {**rec, "status": "ok", "output": out.relative_to(out_dir.resolve()).as_posix()}

    drop_torn_tail(log_path)
    summary = open(log_path, "a")

    def record(rec: dict) -> None:
        counts[rec["status"]] += 1
        summary.write(json.dumps(rec) + "\n")
        summary.flush()
        bar.update(1)

    def error(item: BatchInput, exc: Exception) -> dict:
        if not isinstance(exc, (PatchflannelError, OSError, ValueError)):
            log.exception("unexpected error on %s", item.path)
        return {"input": item.name, "path": str(item.path), "status": "error",
                "reason": f"{type(exc).__name__}: {exc}", "output": None}

    window = max(2 * batch_size, 4 * workers)
    bar = tqdm(total=len(todo), desc="segmenting", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            queue = iter(todo)
            decoding: deque[tuple[BatchInput, Future]] = deque()
            writing: deque[tuple[BatchInput, Future]] = deque()

            def refill():
                while len(decoding) < window:
                    item = next(queue, None)
                    if item is None:
                        return
                    decoding.append((item, pool.submit(decode, item)))

            def drain(block_until: int):
                while writing and (len(writing) > block_until or writing[0][1].done()):
                    item, fut = writing.popleft()
                    try:
                        record(fut.result())
                    except Exception as exc:  # noqa: BLE001 - one bad file never stops the job
                        record(error(item, exc))

            refill()
            while decoding:
                batch = []
                while decoding and len(batch) < batch_size:
                    item, fut = decoding.popleft()
                    try:
                        image, net_input = fut.result()
                        batch.append((item, image, net_input))
                    except Exception as exc:  # noqa: BLE001
                        record(error(item, exc))
                refill()  # decode the next batch while the network runs
                if batch:
                    try:
                        probs = segmenter.probabilities([b[2] for b in batch])
                    except Exception as exc:  # noqa: BLE001
                        for item, _, _ in batch:
                            record(error(item, exc))
                        continue
                    for (item, image, _), prob in zip(batch, probs):
                        writing.append((item, pool.submit(finish, item, image, prob)))
                drain(block_until=window)
            drain(block_until=0)
    finally:
        bar.close()
        summary.close()
    if shard is None:
        records = read_summary(out_dir)
        write_summary_csv(out_dir, records)
        if h5_path is not None:
            write_pack(inputs, records, out_dir, h5_path)
    return counts


def write_pack(inputs: list[BatchInput], records: dict[str, dict], out_dir: Path, h5_path) -> None:
    """Pack the ``ok`` outputs of ``inputs`` (in input order) with their manifest columns."""
    ok = [(x, records[x.name]) for x in inputs if records.get(x.name, {}).get("status") == "ok"]
    if ok:
        cols = sorted({k for x, _ in ok for k in x.columns})
        columns = {"input": [x.name for x, _ in ok], **{k: [x.columns.get(k, "") for x, _ in ok] for k in cols}}
        pack_npz_files([out_dir / rec["output"] for _, rec in ok], h5_path, columns)


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


def merge_shards(source, out_dir, *, path_column: str = "image", h5_path=None) -> dict:
    """Combine the shard summaries of ``out_dir`` into ``summary.jsonl``/``summary.csv`` (and
    the HDF5 pack), in input order, then remove them; returns counts by status and how many
    inputs no shard has done yet."""
    out_dir = Path(out_dir)
    inputs = collect_inputs(source, path_column)
    ordered = merge_logs(out_dir, SUMMARY_JSONL, [x.name for x in inputs])
    records = {r["input"]: r for r in ordered}
    write_summary_csv(out_dir, records)
    if h5_path is not None:
        write_pack(inputs, records, out_dir, h5_path)
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "rejected", "error")}
    return {**counts, "total": len(inputs), "missing": len(inputs) - len(ordered)}


def write_summary_csv(out_dir: Path, records: dict[str, dict]) -> None:
    """Rewrite ``summary.csv``: one row per input of ``records`` (the last of each in ``summary.jsonl``)."""
    fields = ["input", "status", "reason", "output", "lung_fraction", "orig_shape", "path"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for rec in records.values():
                w.writerow(rec)

    atomic_write(out_dir / SUMMARY_CSV, write)
