"""The Stage 1 batch job: a folder or manifest of CXRs -> one masked ``.npz`` per image.

Decoding/preprocessing and post-processing/compression run in worker threads while the
main thread runs the network on the previous batch, so I/O hides behind the model.
Outputs are written atomically; a ``summary.jsonl`` record (`patchflannel.jobs.records`)
is appended for every input as it finishes (ok / rejected / error), and a rerun skips every
input that already has one, so a killed job resumes where it stopped. ``summary.csv`` is
rewritten at the end. ``python -m patchflannel.segment`` runs it.
"""
from __future__ import annotations

import glob
import json
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..errors import PatchflannelError
from ..io import declared_pixels, load_image
from ..jobs.records import (
    SUMMARY_FIELDS,
    drop_torn_tail,
    error_record,
    input_record,
    merge_logs,
    printable_name,
    read_done,
    read_records,
    write_csv,
)
from ..jobs.shard import Shard
from ..jobs.shell import (
    MAX_PIXELS_IN_FLIGHT,
    BatchInput,
    collect_inputs,
    output_path,
    prepare_out_dir,
    remove_stale_temp_files,
)
from ..store import pack_npz_files, write_masked_npz
from .segmenter import Segmenter

__all__ = ["SUMMARY_CSV", "SUMMARY_JSONL", "merge_shards", "read_summary", "run_batch", "write_pack"]

log = logging.getLogger(__name__)

SUMMARY_JSONL = "summary.jsonl"
SUMMARY_CSV = "summary.csv"


def read_summary(out_dir: Path) -> dict[str, dict]:
    """Last record per input name from ``summary.jsonl`` (a torn last line is ignored)."""
    return read_records(out_dir / SUMMARY_JSONL)


def remove_stale_pack(h5_path) -> None:
    """Delete the temporary files of a killed pack write beside ``h5_path``."""
    h5_path = Path(h5_path)
    for stale in h5_path.parent.glob(f".{glob.escape(h5_path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted pack write", stale)


def _finished(rec: dict | None, out_dir: Path, retry_failed: bool) -> bool:
    if rec is None:
        return False
    if rec["status"] == "ok":
        return (out_dir / rec["output"]).is_file()
    return not retry_failed


def run_batch(source, out_dir, segmenter: Segmenter, *, batch_size: int = 16, workers: int = 2,
              path_column: str = "image", keep_unmasked: bool = False, retry_failed: bool = False,
              h5_path=None, progress: bool = True, limit: int | None = None, shard: Shard | None = None,
              max_pixels_in_flight: int = MAX_PIXELS_IN_FLIGHT, root=None,
              items: list[BatchInput] | None = None, on_segmented=None) -> dict:
    """Segment every input of ``source`` into ``out_dir``; returns counts by status.

    With ``shard``, only that shard's inputs (see `patchflannel.jobs.shard`), logged to the
    shard's own summary; `merge_shards` then writes the folder's summary and pack.

    ``max_pixels_in_flight`` bounds the decoded pixels held at once (one larger image still
    runs, alone); ``root`` is the folder output names are relative to (see `collect_inputs`);
    ``items``: the inputs, if already listed (`job_inputs`).
    ``on_segmented(item, image, segmentation)``, if given, sees every input segmented and
    recorded by this run (from the worker threads; an accepted one once its ``.npz`` is written): e.g. to classify the films without segmenting them again
    (`patchflannel.Pipeline.predict_segmented`).

    Returns ``{"ok", "rejected", "error", "skipped", "total"}`` for this run.
    """
    out_dir = prepare_out_dir(out_dir)
    if items is None:
        items = collect_inputs(source, path_column, exclude=out_dir, root=root)
    inputs = items[:limit]
    if shard is not None:
        inputs = [x for x in inputs if shard.owns(x.name)]
    log_path = out_dir / (shard.log_name(SUMMARY_JSONL) if shard else SUMMARY_JSONL)
    remove_stale_temp_files(out_dir, shard)
    if h5_path is not None:
        remove_stale_pack(h5_path)
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
        rec = {**input_record(item.name, item.path), "orig_shape": list(image.shape),
               "lung_fraction": round(result.lung_fraction, 4)}
        if not result.ok:
            if on_segmented is not None:
                on_segmented(item, image, result)
            return {**rec, "status": "rejected", "rejection": result.rejection, "output": None}
        out = output_path(out_dir, item.name)
        write_masked_npz(out, working_image=result.working_image, working_mask=result.working_mask,
                         orig_shape=image.shape, content_box=result.letterbox.content_box,
                         scale=result.letterbox.scale,
                         segmenter=segmenter.id, preprocess=preprocess, source=str(item.path),
                         keep_unmasked=keep_unmasked)
        if on_segmented is not None:  # only what was stored
            on_segmented(item, image, result)
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
        return {**error_record(item.name, item.path, exc), "output": None}

    # Decoded pixels are bounded, not just images: each input is reserved at its declared size
    # (read from its header) before decoding, and released when its record is written.
    window = max(2 * batch_size, 4 * workers)
    reserved = {"pixels": 0}
    sizes: dict[int, int] = {}  # id(item) -> reserved pixels

    def release(item: BatchInput) -> None:
        reserved["pixels"] -= sizes.pop(id(item), 0)

    bar = tqdm(total=len(todo), desc="segmenting", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            queue = deque(todo)
            decoding: deque[tuple[BatchInput, Future]] = deque()
            writing: deque[tuple[BatchInput, Future]] = deque()

            def refill():
                while queue and len(decoding) < window:
                    if id(queue[0]) not in sizes:
                        sizes[id(queue[0])] = declared_pixels(queue[0].path)  # read once
                    size = sizes[id(queue[0])]
                    if reserved["pixels"] and reserved["pixels"] + size > max_pixels_in_flight:
                        return  # wait for what is held to be written
                    item = queue.popleft()
                    reserved["pixels"] += size
                    decoding.append((item, pool.submit(decode, item)))

            def drain(block_until: int):
                while writing and (len(writing) > block_until or writing[0][1].done()):
                    item, fut = writing.popleft()
                    try:
                        record(fut.result())
                    except Exception as exc:  # noqa: BLE001 - one bad file never stops the job
                        record(error(item, exc))
                    release(item)

            refill()
            while decoding or queue:
                if not decoding:  # the pixel budget is held by outputs being written
                    drain(block_until=0)
                    refill()
                    continue
                batch = []
                while decoding and len(batch) < batch_size:
                    item, fut = decoding.popleft()
                    try:
                        image, net_input = fut.result()
                        batch.append((item, image, net_input))
                    except Exception as exc:  # noqa: BLE001
                        record(error(item, exc))
                        release(item)
                    refill()
                refill()  # decode the next batch while the network runs
                if batch:
                    try:
                        probs = segmenter.probabilities([b[2] for b in batch])
                    except Exception as exc:  # noqa: BLE001
                        for item, _, _ in batch:
                            record(error(item, exc))
                            release(item)
                        continue
                    for (item, image, _), prob in zip(batch, probs):
                        writing.append((item, pool.submit(finish, item, image, prob)))
                    del batch, image, probs
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
        columns = {"input": [printable_name(x.name) for x, _ in ok],
                   **{k: [x.columns.get(k, "") for x, _ in ok] for k in cols}}
        pack_npz_files([out_dir / rec["output"] for _, rec in ok], h5_path, columns)


def merge_shards(source, out_dir, *, path_column: str = "image", h5_path=None) -> dict:
    """Combine the shard summaries of ``out_dir`` into ``summary.jsonl``/``summary.csv`` (and
    the HDF5 pack), in input order, then remove them; returns counts by status and how many
    inputs no shard has done yet."""
    out_dir = Path(out_dir)
    inputs = collect_inputs(source, path_column, exclude=out_dir)
    ordered = merge_logs(out_dir, SUMMARY_JSONL, [x.name for x in inputs])
    records = {r["input"]: r for r in ordered}
    write_summary_csv(out_dir, records)
    if h5_path is not None:
        remove_stale_pack(h5_path)
        write_pack(inputs, records, out_dir, h5_path)
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "rejected", "error")}
    return {**counts, "total": len(inputs), "missing": len(inputs) - len(ordered)}


def write_summary_csv(out_dir: Path, records: dict[str, dict]) -> None:
    """Rewrite ``summary.csv``: one row per input of ``records`` (the last of each in ``summary.jsonl``)."""
    write_csv(out_dir / SUMMARY_CSV, list(records.values()), SUMMARY_FIELDS)
