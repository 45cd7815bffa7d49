"""The batch jobs' shell, shared by ``segment``, ``predict`` and the demo: listing inputs from
a folder, a manifest or a file (names that cannot escape the output folder), checking the
output folder before any model loads, the pixel budget, temporary-file clean-up after a kill,
and the exit codes. What a job writes per input lives in `patchflannel.jobs.records`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EXIT_NOTHING_DONE, EXIT_OK, PatchflannelError
from ..manifest import read_inputs_manifest
from .records import RECORD_FIELDS, printable_name
from .shard import Shard

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS_IN_FLIGHT", "BatchInput",
           "collect_inputs", "exit_status", "job_inputs", "list_folder", "output_path", "prepare_out_dir",
           "remove_stale_temp_files", "unique_file_name"]

log = logging.getLogger(__name__)

#: Suffixes listed from folders; other files are listed only when their first bytes say they
#: are an image (DICOM is often stored without a suffix).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".gif", ".webp",
                  ".jp2", ".j2k", ".j2c", ".jpx", ".jpf", ".ppm", ".pgm", ".pbm", ".pnm",
                  ".dcm", ".dicom", ".dic"}
#: Leading bytes of the formats `patchflannel.io.load_image` reads (WebP: RIFF....WEBP, below).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a",
          b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
#: Default bound on decoded pixels held by a batch job at once (about 0.5 GB as float32): one
#: 100 MP film at a time, or 32 films of 4 MP.
MAX_PIXELS_IN_FLIGHT = 128_000_000



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
    try:
        items = collect_inputs(source, path_column, exclude=out)
    except BaseException:
        if created:
            out.rmdir()
        raise
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
    (readable start + a hash of the whole name, see `unique_file_name`)."""
    leaf = Path(name).name
    if len(os.fsencode(leaf)) > 200:  # 255 bytes per name, less ``.npz`` and the temporary file's marks
        name = (Path(name).parent / unique_file_name(leaf)).as_posix()
    out = (out_dir / f"{name}.npz").resolve()
    if not out.is_relative_to(out_dir.resolve()):
        raise PatchflannelError(f"output name {name!r} would escape the output folder")
    return out


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


