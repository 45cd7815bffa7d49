"""The Stage 1 batch job: a folder or manifest of CXRs -> one masked ``.npz`` per image.

Decoding/preprocessing and post-processing/compression run in worker threads while the
main thread runs the network on the previous batch, so I/O hides behind the model.
Outputs are written atomically; a ``summary.jsonl`` line is appended for every input
as it finishes (ok / rejected / error), and a rerun skips every input that already has
a record, so a killed job resumes where it stopped. ``summary.csv`` is rewritten at the end.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..errors import PatchflannelError
from ..io import declared_pixels, load_image
from ..shard import Shard, shard_logs
from ..store import pack_npz_files, write_masked_npz
from ..files import atomic_write
from .segmenter import Segmenter

log = logging.getLogger(__name__)

#: Suffixes listed from folders; other files are listed only when their first bytes say they
#: are an image (DICOM is often stored without a suffix).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".gif", ".webp",
                  ".dcm", ".dicom", ".dic"}
#: Leading bytes of the formats :func:`patchflannel.io.load_image` reads.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a")
SUMMARY_JSONL = "summary.jsonl"
SUMMARY_CSV = "summary.csv"
#: Default bound on decoded pixels held by a batch job at once (about 0.5 GB as float32): one
#: 100 MP film at a time, or 32 films of 4 MP.
MAX_PIXELS_IN_FLIGHT = 128_000_000

#: Fields of the jobs' records (both jobs'): a manifest column of one of these names is carried
#: as ``manifest_<name>``.
RECORD_FIELDS = frozenset({"input", "path", "status", "reason", "rejection", "output", "lung_fraction", "orig_shape",
                           "predicted", "probabilities", "combiner", "learners", "learner_weights", "uncertainty",
                           "overlay"})

# Exit codes shared by the batch jobs.
EXIT_OK, EXIT_NOTHING_DONE, EXIT_USAGE = 0, 1, 2


@dataclass
class BatchInput:
    """One input of the job: where it is, what it is called in the outputs, its manifest row."""

    path: Path
    name: str
    columns: dict = field(default_factory=dict)


def _relative_name(path: Path, root: Path) -> str:
    """A name for ``path`` that cannot escape the output folder: its path relative to ``root``
    (lexically, so two links to one file keep their own names), or for a path outside ``root`` a
    flat name made unique by a hash of the full path."""
    absolute = Path(os.path.normpath(Path(os.path.abspath(path))))
    base = Path(os.path.normpath(os.path.abspath(root)))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        pass
    try:  # a root reached through a symbolic link
        return Path(os.path.realpath(absolute)).relative_to(os.path.realpath(base)).as_posix()
    except ValueError:  # outside the root: a flat, unique name
        digest = hashlib.sha1(os.fsencode(absolute)).hexdigest()[:10]
        return f"_external/{path.name}-{digest}"


def printable_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (kept by Python as
    surrogates) become ``\\xNN`` escapes, so CSV files and packs can hold every name."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unique_file_name(name: str, suffix: str = "") -> str:
    """A flat file name for the input called ``name``: readable (its characters that are safe in a
    file name, ``/`` as ``__``) and unique (a short hash of the whole name), e.g.
    ``images__a_b.jpg-3f2a9c1e.png``; never a path, never hidden."""
    readable = re.sub(r"[^\w.-]+", "_", printable_name(name).replace("/", "__")).lstrip(".")
    readable = readable.encode("utf-8")[:120].decode("utf-8", "ignore") or "input"  # file names: 255 bytes
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{readable}-{digest}{suffix}"


def _looks_like_image(path: Path) -> bool:
    """A regular file whose first bytes are those of an image format we decode (never opens a
    FIFO or device: those are not regular files)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _is_output(path: Path, out_dir: Path | None) -> bool:
    """``path`` is the job's output folder, or its ``overlays/`` when the output folder is the
    input folder itself (outputs are never inputs)."""
    if out_dir is None:
        return False
    try:
        here, out = path.resolve(), out_dir.resolve()
    except OSError:
        return False
    return here == out or here == out / "overlays"


def list_folder(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), and everything else there that is named
    like an image but cannot be one (broken or looping links, FIFOs, devices, links to folders),
    so the job records it instead of dropping it. Links to folders are not followed (no loops);
    ``exclude`` (the job's output folder) and temporary ``.*.tmp`` files are never listed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            sub = here / d
            if sub.is_symlink():
                if sub.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(sub)  # recorded: "is a directory"
            elif not _is_output(sub, exclude):
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            path = here / f
            if f.startswith(".") and f.endswith(".tmp"):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES or _looks_like_image(path):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def collect_inputs(source: str | os.PathLike, path_column: str = "image", *, exclude: str | os.PathLike | None = None,
                   root: str | os.PathLike | None = None) -> list[BatchInput]:
    """Images under a folder (recursive, sorted), the rows of a manifest CSV, or one image file.

    Args:
        exclude: a folder never listed (the job's output folder, when it lies inside the input).
        root: the folder output names are relative to (default: the input folder, or the
            manifest's folder).

    Raises:
        PatchflannelError: the source does not exist or is not a folder, manifest or file; a
            manifest that cannot be read (naming the file and line).
    """
    from ..manifest import read_inputs_manifest

    source = Path(source)
    exclude = None if exclude is None else Path(exclude)
    if source.is_dir():
        base = Path(root) if root is not None else source
        return [BatchInput(p, _relative_name(p, base)) for p in list_folder(source, exclude)]
    if source.suffix.lower() == ".csv" and source.is_file():
        base = Path(root) if root is not None else source.parent
        inputs, lines = [], {}
        for row in read_inputs_manifest(source, path_column):
            p = Path(row.path)
            p = p if p.is_absolute() else source.parent / p
            name = _relative_name(p, base)
            if name in lines:
                raise PatchflannelError(f"{source}: lines {lines[name]} and {row.line} name the same file ({name}); "
                                        "list each file once")
            lines[name] = row.line
            # A manifest column never overwrites a field of the jobs' own records.
            columns = {(f"manifest_{k}" if k in RECORD_FIELDS else k): v for k, v in row.columns.items()}
            inputs.append(BatchInput(p, name, columns))
        return inputs
    if source.exists() or source.is_symlink():
        return [BatchInput(source, source.name)]
    raise PatchflannelError(f"{source}: no such file or folder (expected a folder of images, a manifest .csv "
                            "or an image file)")


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and check that files can be written in it.

    Raises:
        PatchflannelError: it is a file, or cannot be created or written (read-only, no permission).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PatchflannelError(f"--out {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        Path(probe).unlink(missing_ok=True)  # a shard sharing the folder may have cleaned it up
    except OSError as exc:
        raise PatchflannelError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from exc
    return out_dir


def job_inputs(source, out_dir, path_column: str = "image") -> tuple[Path, list[BatchInput]]:
    """What both batch jobs check before any model loads: the output folder (created, writable)
    and the inputs (never the output folder's own files). With no inputs, a folder created just
    now is removed again, so nothing is left behind."""
    created = not Path(out_dir).exists()
    out = prepare_out_dir(out_dir)
    items = collect_inputs(source, path_column, exclude=out)
    if not items and created:
        out.rmdir()
    return out, items


def exit_status(counts: dict) -> int:
    """The jobs' shared exit code: 0 when something was done (or everything was already done), 1
    when inputs were attempted and none succeeded, or there were none."""
    attempted = counts["total"] - counts.get("skipped", 0)
    if counts["total"] == 0 or (attempted and counts["ok"] == 0):
        return EXIT_NOTHING_DONE
    return EXIT_OK


def output_path(out_dir: Path, name: str) -> Path:
    """``<out_dir>/<name>.npz``, refusing names that would land outside ``out_dir``; a file name
    too long for the file system once ``.npz`` and a temporary suffix are added is shortened
    (readable start + a hash of the whole name, see :func:`unique_file_name`)."""
    leaf = Path(name).name
    if len(os.fsencode(leaf)) > 200:  # 255 bytes per name, less ``.npz`` and the temporary file's marks
        name = (Path(name).parent / unique_file_name(leaf)).as_posix()
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
    # A shard cannot tell whose an overlay's temporary file is (its name is flattened): those
    # are removed by unsharded runs and by --merge.
    stale = [p for p in out_dir.rglob(".*.tmp")
             if p.is_file() and (shard is None or (p.parent.name != "overlays"
                                                   and shard.owns(_temp_target(p, out_dir))))]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    return len(stale)


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
              items: list[BatchInput] | None = None) -> dict:
    """Segment every input of ``source`` into ``out_dir``; returns counts by status.

    With ``shard``, only that shard's inputs (see :mod:`patchflannel.shard`), logged to the
    shard's own summary; :func:`merge_shards` then writes the folder's summary and pack.

    ``max_pixels_in_flight`` bounds the decoded pixels held at once (one larger image still
    runs, alone); ``root`` is the folder output names are relative to (see :func:`collect_inputs`);
    ``items``: the inputs, if already listed (:func:`job_inputs`).

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
    fields = ["input", "status", "reason", "output", "lung_fraction", "orig_shape", "path"]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:  # any file name
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for rec in records.values():
                w.writerow({k: printable_name(v) if isinstance(v, str) else v for k, v in rec.items()})

    atomic_write(out_dir / SUMMARY_CSV, write)
