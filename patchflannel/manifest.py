"""Strict reading of an input manifest CSV (the batch jobs' ``MANIFEST.csv``).

`read_inputs_manifest` turns a manifest into `ManifestRow` objects or refuses it
with a `ManifestError` whose message names the file, the line and the problem, and
says how to fix it. It never guesses: a manifest that could be read two ways is refused.

Rules
-----
* **Encoding**: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one).
  Anything else (Latin-1/cp1252, UTF-16, ...) is refused, naming the line of the first bad byte.
* **Line endings**: ``\\n``, ``\\r\\n`` and ``\\r`` are all accepted, mixed too.
* **Dialect**: comma separated, ``"`` quoting (a quoted field may hold commas, quotes as
  ``""`` and line breaks). A field with text after its closing quote, or a quote that is
  never closed, is refused.
* **Header**: the first non-blank line. Names are stripped of surrounding whitespace; an
  empty name, a name given twice, a missing path column, or a name the caller reserves
  (``reserved=``) is refused.
* **Rows**: blank lines and rows whose every field is empty (e.g. ``,,,`` left by a
  spreadsheet) are skipped. Every other row must have *exactly* as many fields as the
  header: more (a trailing comma, an unquoted comma inside a value) or fewer (a forgotten
  field) are both refused, because either can silently shift a value (e.g. a label) into
  the wrong column. Write empty fields explicitly (``a.png,,covid``).
* **Path cell**: stripped of surrounding whitespace; it must not be empty or span lines.
  Two rows naming the same path (after normalisation) are refused. Other cells are kept
  verbatim (no stripping, no type conversion).
* **NUL bytes** anywhere are refused (usually a UTF-16 or binary file).
* **Size**: a single field longer than `csv.field_size_limit` (131,072 characters by
  default) is refused.
* A manifest with a header and no data rows is refused unless ``allow_empty=True``.

Examples:
    >>> rows = read_inputs_manifest("cxr4/manifest.csv")      # doctest: +SKIP
    >>> rows[0].line, rows[0].path, rows[0].columns["label"]  # doctest: +SKIP
    (2, 'images/covid/cohen_00870a9c.jpg', 'covid')
"""
from __future__ import annotations

import codecs
import csv
import io
import os
import posixpath
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataNotFoundError, PatchflannelError

__all__ = ["ManifestError", "ManifestRow", "read_inputs_manifest"]


class ManifestError(PatchflannelError, ValueError):
    """A manifest CSV that cannot be used as it is.

    Attributes:
        path: the manifest file.
        line: the 1-based line the problem is on (``None`` for the whole file).
        problem: what is wrong, in words.
        hint: what to do about it.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, hint: str = ""):
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.hint = hint
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}" + (f"; {hint}" if hint else ""))


@dataclass(frozen=True)
class ManifestRow:
    """One data row of a manifest.

    Attributes:
        line: 1-based line of the file on which the row starts.
        path: the (stripped, non-empty) cell of the path column, as written (relative paths
            are relative to the manifest's folder; resolving them is the caller's job).
        columns: every other column, header name -> cell, in header order.
    """

    line: int
    path: str
    columns: dict[str, str] = field(default_factory=dict)


_UTF16_32_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                  (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_SAVE_AS_UTF8 = ("save it as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)'; from Latin-1/Windows-1252: "
                 "iconv -f cp1252 -t utf-8 IN.csv > OUT.csv)")


def _line_of(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column in bytes) of byte ``offset``; ``\\r\\n``, ``\\r`` and ``\\n`` end lines."""
    before = data[:offset].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return before.count(b"\n") + 1, len(before) - (before.rfind(b"\n") + 1) + 1


def _decode(path: Path, data: bytes) -> str:
    for bom, name in _UTF16_32_BOMS:  # UTF-32-LE's BOM starts with UTF-16-LE's: test it first
        if data.startswith(bom):
            raise ManifestError(path, None, f"the file is {name} encoded, not UTF-8", _SAVE_AS_UTF8)
    nul = data.find(b"\x00")
    if nul >= 0:
        line, _ = _line_of(data, nul)
        utf16 = data[1::2].count(0) > len(data) // 4 or data[0::2].count(0) > len(data) // 4
        raise ManifestError(path, line, "contains a NUL byte" + (" (the file looks UTF-16 encoded)" if utf16 else ""),
                            "a manifest must be a UTF-8 text CSV; " + _SAVE_AS_UTF8 if utf16 else
                            "a manifest must be a UTF-8 text CSV; remove the NUL bytes or re-export the file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_of(data, exc.start)
        bad = data[exc.start:exc.end].hex(" ")
        raise ManifestError(path, line, f"not valid UTF-8 (byte {bad} at column {col}; "
                                        f"the file is probably Latin-1/Windows-1252)", _SAVE_AS_UTF8) from None


def _blank(fields: list[str]) -> bool:
    return all(not f.strip() for f in fields)


def _header_hint(names: list[str], path_column: str) -> str:
    if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
        sep = next(sep for sep in ";\t|" if sep in names[0])
        return f"the header looks {'tab' if sep == chr(9) else repr(sep)}-separated; save the file comma-separated"
    close = [n for n in names if n.casefold() == path_column.casefold()]
    if close:
        return f"column names are case-sensitive: did you mean {close[0]!r}? (pass it as the path column)"
    return "add a column of image paths with that name, or name the path column (e.g. --path-column NAME)"


def read_inputs_manifest(path: str | os.PathLike, path_column: str = "image", *,
                         allow_empty: bool = False, reserved: Collection[str] = ()) -> list[ManifestRow]:
    """The data rows of manifest CSV ``path``, checked (see the module docstring for the rules).

    Args:
        path: the manifest file.
        path_column: the header name of the column holding image paths.
        allow_empty: return ``[]`` for a manifest with a header and no data rows instead
            of refusing it.
        reserved: column names the caller writes itself (e.g. ``("input",)`` for a pack's
            input-name column); a manifest column (other than the path column) with one of
            these names is refused instead of silently clashing.

    Returns:
        One `ManifestRow` per data row, in file order.

    Raises:
        DataNotFoundError: ``path`` does not exist or is not a file.
        ManifestError: the file cannot be read as a manifest; the message names the file,
            the line and the problem, and says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"manifest not found (or not a file): {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(path, None, f"cannot be read ({exc.strerror or exc})", "check the file's permissions") from exc
    text = _decode(path, data)

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    end = 0  # last physical line consumed so far
    while True:
        start = end + 1
        try:
            fields = next(reader, None)
        except csv.Error as exc:
            msg = str(exc)
            if "unexpected end of data" in msg:
                raise ManifestError(path, start, "a quoted field starting on this line is never closed",
                                    'close the quote, or write a quote inside a quoted field as ""') from None
            if "field larger than field limit" in msg:
                raise ManifestError(path, start, f"a field is longer than {csv.field_size_limit():,} characters",
                                    "is this really a manifest CSV? (an unclosed quote can also swallow the file)") from None
            raise ManifestError(path, start, f"malformed CSV ({msg})",
                                'quote fields holding commas or quotes ("a,b"; a quote inside as "")') from None
        if fields is None:
            break
        end = reader.line_num
        if _blank(fields):
            continue
        if header is None:
            header, header_line = [f.strip() for f in fields], start
            where: dict[str, int] = {}
            for i, name in enumerate(header, 1):
                if not name:
                    raise ManifestError(path, start, f"column {i} of the header has no name",
                                        "name every column (a trailing comma in the header makes an empty one)")
                if name in where:
                    raise ManifestError(path, start, f"column name {name!r} appears twice (columns {where[name]} and {i})",
                                        "give every column a distinct name")
                where[name] = i
            clash = [n for n in header if n in reserved and n != path_column]
            if clash:
                raise ManifestError(path, start, f"column name {clash[0]!r} is reserved (the job writes its own "
                                                 f"{clash[0]!r} column)", "rename that column in the manifest")
            if path_column not in where:
                raise ManifestError(path, start, f"no {path_column!r} column (columns: {header})",
                                    _header_hint(header, path_column))
            path_index = where[path_column] - 1
            continue
        if len(fields) != len(header):
            more = len(fields) > len(header)
            raise ManifestError(
                path, start, f"the row has {len(fields)} fields but the header (line {header_line}) has {len(header)}",
                "remove the extra field (a trailing comma?) or quote values that contain commas" if more else
                "add the missing fields (write empty ones explicitly, e.g. a.png,,covid)")
        image = fields[path_index].strip()
        if not image:
            raise ManifestError(path, start, f"the {path_column!r} cell is empty",
                                "give every row an image path, or delete the row")
        if "\n" in image or "\r" in image:
            raise ManifestError(path, start, f"the {path_column!r} cell spans several lines",
                                "check for an unbalanced quote on this line")
        key = posixpath.normpath(image)
        if key in seen:
            raise ManifestError(path, start, f"image {image!r} is already listed on line {seen[key]}",
                                "list every image once")
        seen[key] = start
        rows.append(ManifestRow(start, image, {n: v for i, (n, v) in enumerate(zip(header, fields)) if i != path_index}))
    if header is None:
        raise ManifestError(path, None, "the file is empty",
                            f"a manifest needs a header line naming its columns, one of them {path_column!r}")
    if not rows and not allow_empty:
        raise ManifestError(path, header_line, "the manifest has a header but no data rows",
                            "add one row per image")
    return rows


#: Environment variable naming the folder that holds ``lungseg/``, ``cxr4/`` and ``adult/``.
DATA_ENV = "PATCHFLANNEL_DATA"


def data_root(default: str | os.PathLike | None = None) -> Path:
    """The data folder: ``$PATCHFLANNEL_DATA`` if set, else ``default``.

    Raises:
        DataNotFoundError: neither names an existing folder.
    """
    value = os.environ.get(DATA_ENV) or default
    if not value or not Path(value).is_dir():
        raise DataNotFoundError(
            f"data folder not found ({value or 'unset'}): set {DATA_ENV} to the folder holding lungseg/, cxr4/, adult/"
        )
    return Path(value)


def read_manifest(path: str | os.PathLike, path_columns: tuple[str, ...] = ("image", "mask")) -> list[dict]:
    """Rows of a manifest CSV as dicts; the named path columns become absolute paths."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"manifest not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for col in path_columns:
            if row.get(col):
                row[col] = str((path.parent / row[col]).resolve())
    return rows
