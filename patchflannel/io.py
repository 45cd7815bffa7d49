"""Decoding chest X-ray files into float32 grey images in [0, 1], with clear refusals.

Handled: PNG, JPEG, TIFF, BMP, GIF, WebP, JPEG 2000 and PPM/PGM (through Pillow: lazy
header reads let us refuse decompression bombs before decoding; EXIF orientation
applied) and DICOM (through pydicom: modality rescale and VOI LUT/windowing applied,
MONOCHROME1 inverted). 8-bit images map 0..255 to 0..1; deeper integer and float images
are rescaled from their own min..max, since their stored range rarely fills the type's
range.

The type is decided by content, never by the file name: DICOM by its ``DICM`` marker
(a DICOM file without the 128-byte preamble is tried only when named ``.dcm``,
``.dicom`` or ``.dic`` and no image format claims it), images by Pillow's own content
sniffing, restricted to the formats above.

Hostile files are refused before they can cost more than the one image they hold:

* only regular files are opened (never a FIFO, a socket, a device such as ``/dev/zero``
  or a directory, whether named directly or through a symbolic link), without blocking,
  and the file is decoded from that one open descriptor;
* files larger than `ImageLimits.max_bytes` are refused before any byte is read;
* a chest X-ray is one frame: multi-frame DICOM, multi-page TIFF and animated
  GIF/WebP/PNG are refused from their headers (the extra pictures of a JPEG's MPF
  extension, such as previews or gain maps, are ignored: only the primary picture is
  decoded);
* `ImageLimits.max_pixels` counts frames x rows x columns x samples per pixel as
  declared in the header, checked before a single pixel is decoded; for DICOM the
  whole header (and the declared length, frame structure and codestream header of the
  pixel data) is checked before the pixel data is decoded;
* decoders read through a view of the descriptor that never reads past the checked size
  and allows a bounded number of reads, so a file made of millions of tiny chunks,
  markers or data elements is refused within seconds instead of keeping a parser busy
  (a deflated DICOM is parsed in memory by pydicom, bounded by what it may inflate to);
* everything that cannot be used raises `InvalidImageError`
  naming the file and the reason; `load_image` raises nothing else (an unexpected
  error of a decoder, even ``MemoryError``, is reported with its type).

Examples:
    >>> from patchflannel.io import load_image
    >>> image = load_image("chest.png")          # doctest: +SKIP
    >>> image.dtype, float(image.min()) >= 0.0   # doctest: +SKIP
    (dtype('float32'), True)
"""
from __future__ import annotations

import errno
import math
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InvalidImageError

__all__ = ["MAX_BYTES", "MAX_PIXELS", "MIN_SIDE", "ImageLimits", "as_grey_float", "check_size",
           "declared_pixels", "load_image", "load_mask", "to_grey_float"]

#: Default largest accepted image (a 10000 x 10000 grey film), counted as frames x rows x
#: columns x samples per pixel from the file's header; larger is refused before decoding,
#: so a small file declaring a huge image cannot exhaust memory.
MAX_PIXELS = 100_000_000
#: Default smallest accepted side, in pixels.
MIN_SIDE = 64
#: Default largest accepted file, in bytes (512 MiB: a 10000 x 10000 16-bit DICOM is
#: 200 MB); also the most a deflated DICOM may inflate to, and the most the decoded
#: pixel data of a DICOM may take.
MAX_BYTES = 512 * 1024 * 1024

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
#: Pillow formats tried on content (no EPS/PSD/ICO/...: fewer parsers, no Ghostscript).
_PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "JPEG2000", "PPM")
#: Frames (pages, IFDs, fragments) are counted up to this many; more is reported as "more than".
_COUNT_CAP = 10_000
#: Encapsulated DICOM pixel data items walked at most.
_MAX_FRAGMENTS = 1 << 20
#: Reads of the file allowed to one decode (a legitimate file within the byte limit needs far
#: fewer; a flood of tiny chunks/markers/elements needs one or more per item).
_MAX_READS = 400_000
#: Reads allowed to each parse of a DICOM data set (a chest film's has a few thousand elements).
_MAX_DICOM_READS = 150_000
_ONE_FRAME = "a chest X-ray is one frame: extract the frame you want"


@dataclass(frozen=True)
class ImageLimits:
    """Acceptance limits applied to every file and decoded image.

    Attributes:
        max_pixels: largest image, as frames x rows x columns x samples per pixel (header
            values, checked before decoding; for a grey single-frame image, its pixels).
        min_side: smallest accepted side, in pixels.
        max_bytes: largest accepted file, in bytes, checked before reading it; also bounds
            what a deflated DICOM may inflate to and a DICOM's decoded pixel data.
    """

    max_pixels: int = MAX_PIXELS
    min_side: int = MIN_SIDE
    max_bytes: int = MAX_BYTES


def _is_dicom(path: Path, head: bytes) -> bool:
    """``True`` for the DICOM marker; a preamble-less file is only tried as DICOM by name
    once no image format has claimed it (see `load_image`)."""
    return head[128:132] == b"DICM"


def _check_shape(name, shape: tuple[int, ...], limits: ImageLimits) -> None:
    h, w = shape[:2]
    if h * w > limits.max_pixels:
        raise InvalidImageError(name, f"image of {w}x{h} pixels exceeds the limit of {limits.max_pixels} pixels")
    if min(h, w) < limits.min_side:
        raise InvalidImageError(name, f"image of {w}x{h} pixels is smaller than {limits.min_side} px on a side")


def _refuse_frames(name, frames: int, what: str = "frames", counted: bool = False) -> None:
    """Refuse more than one frame; ``counted``: ``frames`` was counted (up to the cap), not declared."""
    if frames > 1:
        count = f"more than {_COUNT_CAP}" if counted and frames > _COUNT_CAP else str(frames)
        raise InvalidImageError(name, f"holds {count} {what}; {_ONE_FRAME}")


def _check_header(name, frames: int, rows: int, cols: int, samples: int, limits: ImageLimits,
                  what: str = "frames", counted: bool = False) -> None:
    """The checks made from header values alone, before any pixel is decoded."""
    _refuse_frames(name, frames, what, counted)
    frames, samples = max(frames, 1), max(samples, 1)
    if frames * samples == 1:
        _check_shape(name, (rows, cols), limits)
        return
    values = frames * rows * cols * samples
    if values > limits.max_pixels:
        raise InvalidImageError(
            name, f"image of {cols}x{rows} pixels x {samples} samples x {frames} frame(s) = {values} values "
                  f"exceeds the limit of {limits.max_pixels} pixels (frames x rows x columns x samples)")
    _check_shape(name, (rows, cols), limits)


def to_grey_float(array: np.ndarray, name: str | os.PathLike | None = None) -> np.ndarray:
    """Any 2-D grey, (H, W, 3) RGB or (H, W, 4) RGBA array -> float32 (H, W) in [0, 1].

    ``uint8`` is divided by 255; other integer and float arrays are rescaled from
    their min..max. NaN/inf, empty and wrongly shaped arrays are refused.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[..., :3].astype(np.float64)
        array_f = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma, as OpenCV/Pillow
    elif array.ndim == 3 and array.shape[2] == 1:
        array_f = array[..., 0]
    elif array.ndim == 2:
        array_f = array
    else:
        raise InvalidImageError(name, f"expected a 2-D grey or (H, W, 3/4) colour image, got shape {array.shape}")
    if array_f.size == 0:
        raise InvalidImageError(name, "image has no pixels")
    if array.dtype == np.bool_:
        raise InvalidImageError(name, "boolean array is a mask, not an image")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidImageError(name, f"unsupported pixel type {array.dtype}")
    if array.dtype == np.uint8:
        return (np.asarray(array_f, dtype=np.float32) / 255.0).astype(np.float32)
    array_f = np.asarray(array_f, dtype=np.float64)
    if not np.isfinite(array_f).all():
        raise InvalidImageError(name, "image contains NaN or infinite values")
    lo, hi = float(array_f.min()), float(array_f.max())
    if hi <= lo:
        return np.zeros(array_f.shape, dtype=np.float32)
    return ((array_f - lo) / (hi - lo)).astype(np.float32)


def check_size(image: np.ndarray, name: str | os.PathLike | None = None, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """``image`` itself, if its size is within ``limits`` (what `load_image` applies to
    files); else `InvalidImageError`."""
    _check_shape(name, np.shape(image), limits)
    return image


def as_grey_float(array: np.ndarray, name: str | os.PathLike | None = None) -> np.ndarray:
    """``array`` itself when it is already a float32 2-D grey image in [0, 1] (what
    `load_image` returns), else `to_grey_float` of it."""
    if (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 2 and array.size
            and bool(np.isfinite(array).all()) and float(array.min()) >= 0.0 and float(array.max()) <= 1.0):
        return array
    return to_grey_float(array, name)


# --------------------------------------------------------------------------------------
# Opening: regular files only, from one descriptor

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def _not_regular(path: Path, mode: int) -> InvalidImageError | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((k for test, k in _KINDS if test(mode)), "special file")
    via = ""
    if os.path.islink(path):
        via = f" (reached through a symbolic link to {os.path.realpath(path)})"
    if kind == "directory":
        return InvalidImageError(path, f"is a directory{via}, not an image file")
    return InvalidImageError(path, f"is a {kind}{via}, not a regular file")


def _open_error(path: Path, exc: OSError) -> InvalidImageError:
    if exc.errno == errno.ELOOP:
        return InvalidImageError(path, "too many levels of symbolic links (a symbolic link loop)")
    if isinstance(exc, FileNotFoundError):
        for link in (path, *path.parents):
            if os.path.islink(link) and not os.path.exists(link):
                try:
                    target = os.readlink(link)
                except OSError:
                    target = "?"
                where = "" if link == path else f" ({link} in its path)"
                return InvalidImageError(path, f"broken symbolic link{where}: points to {target}, which does not exist")
        return InvalidImageError(path, "file does not exist")
    if isinstance(exc, IsADirectoryError):
        return InvalidImageError(path, "is a directory, not an image file")
    if isinstance(exc, NotADirectoryError):
        return InvalidImageError(path, "a component of the path is not a directory")
    if isinstance(exc, PermissionError):
        return InvalidImageError(path, "cannot be read (permission denied)")
    return InvalidImageError(path, f"cannot be read ({exc.strerror or exc})")


def _open_regular(path: Path, limits: ImageLimits) -> tuple[int, int]:
    """``(descriptor, size)`` of ``path`` opened read-only, once it is known to be a regular,
    non-empty file within ``limits.max_bytes``; else `InvalidImageError`.

    ``stat`` first, so a device or FIFO is never even opened; ``O_NONBLOCK``, so a file
    swapped for a FIFO in between cannot block the open; then ``fstat`` of the descriptor
    itself, which is what is decoded.
    """
    try:
        refusal = _not_regular(path, os.stat(path).st_mode)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    except ValueError as exc:  # an embedded NUL byte
        raise InvalidImageError(path, f"invalid file name ({exc})") from exc
    if refusal is not None:
        raise refusal
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, exc) from exc
    try:
        st = os.fstat(fd)
        refusal = _not_regular(path, st.st_mode)
        if refusal is not None:
            raise refusal
        if st.st_size == 0:
            raise InvalidImageError(path, "file is empty (0 bytes)")
        if st.st_size > limits.max_bytes:
            raise InvalidImageError(
                path, f"file of {st.st_size} bytes exceeds the limit of {limits.max_bytes} bytes (ImageLimits.max_bytes)")
        try:
            os.set_blocking(fd, True)  # a regular file: reads never block anyway
        except (AttributeError, OSError):
            pass
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


class _TooManyReads(BaseException):
    """Raised by `_Reader` past its read budget. A BaseException, so that no decoder's
    ``except Exception`` (nor Pillow's trying of the next format) can swallow it."""


class _Reader:
    """The file object handed to the decoders: a view of the one open descriptor that never
    reads past ``size`` (the size checked against the limits, so a length field claiming
    gigabytes cannot make a reader allocate them) and counts its reads: a file made of
    millions of tiny chunks, markers or data elements is refused after ``max_reads``
    instead of keeping a parser busy for minutes."""

    def __init__(self, f, size: int, max_reads: int = _MAX_READS):
        self._f, self._size, self._read = f, size, f.read
        self.reads, self._max_reads = 0, max_reads

    def budget(self, reads: int) -> None:
        """Allow ``reads`` more reads from now on."""
        self.reads, self._max_reads = 0, reads

    def read(self, n: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > self._max_reads:
            raise _TooManyReads()
        if n is not None and 0 <= n <= 65536:  # small reads cannot over-allocate
            return self._read(n)
        left = max(0, self._size - self._f.tell())
        return self._read(left if n is None or n < 0 or n > left else n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:  # libtiff decodes from the same descriptor
        return self._f.fileno()

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed


# --------------------------------------------------------------------------------------
# Frame counting from headers (Pillow formats)

_TIFF_TYPES = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18}


def _tiff_pages(f, size: int) -> int | None:
    """Number of pages of a TIFF, walking only its chain of IFDs (at most ``_COUNT_CAP + 1``;
    a loop ends it). A page is an IFD that fits in the file and has well-formed entries;
    reduced-resolution IFDs after the first page (previews) are not counted."""
    f.seek(0)
    h = f.read(16)
    if h[:4] in (b"II*\0", b"MM\0*", b"MM*\0", b"II\0*"):
        big = False
    elif h[:4] in (b"II+\0", b"MM\0+"):
        big = True
    else:
        return None
    e = "<" if h[:2] == b"II" else ">"
    cnt_fmt, ent, nxt_fmt = (e + "Q", 20, e + "Q") if big else (e + "H", 12, e + "L")
    cnt_size, nxt_size = struct.calcsize(cnt_fmt), struct.calcsize(nxt_fmt)
    off = struct.unpack(nxt_fmt, h[8:16] if big else h[4:8])[0]
    seen: set[int] = set()
    pages = 0
    while off and off not in seen and len(seen) <= _COUNT_CAP and off + cnt_size <= size:
        seen.add(off)
        f.seek(off)
        count = struct.unpack(cnt_fmt, f.read(cnt_size))[0]
        if not 0 < count <= 4096 or off + cnt_size + count * ent + nxt_size > size:
            break  # not an IFD: Pillow never gets past it either
        entries = f.read(count * ent)
        reduced, valid = False, True
        for i in range(0, len(entries), ent):
            tag, typ = struct.unpack(e + "HH", entries[i:i + 4])
            if typ not in _TIFF_TYPES:
                valid = False
                break
            if tag in (254, 255):  # NewSubfileType (bit 0: reduced resolution), SubfileType (2: reduced)
                raw = entries[i + 4 + (8 if big else 4):i + ent]
                value = struct.unpack(e + ("L" if typ == 4 else "H"), raw[:4 if typ == 4 else 2])[0]
                reduced = reduced or (tag == 254 and value & 1 == 1) or (tag == 255 and value == 2)
        if not valid:
            break
        if not (reduced and pages):
            pages += 1
        off = struct.unpack(nxt_fmt, f.read(nxt_size))[0]
    return pages


def _gif_frames(f, size: int) -> int | None:
    """Number of image descriptors of a GIF, walking its blocks in 1 MiB windows (one read
    per window, not per 255-byte data sub-block)."""
    f.seek(0)
    h = f.read(13)
    if len(h) < 13 or h[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    window, base = b"", 0

    def byte(pos: int) -> int:
        nonlocal window, base
        if not base <= pos < base + len(window):
            if pos >= size:
                raise EOFError
            f.seek(pos)
            window, base = f.read(1 << 20), pos
            if not window:
                raise EOFError
        return window[pos - base]

    def skip_blocks(pos: int) -> int:
        while True:
            n = byte(pos)
            pos += 1 + n
            if n == 0:
                return pos

    pos = 13 + (3 << ((h[10] & 7) + 1) if h[10] & 0x80 else 0)
    frames = 0
    try:
        while frames <= _COUNT_CAP:
            b = byte(pos)
            if b == 0x21:  # extension: label, then data sub-blocks
                pos = skip_blocks(pos + 2)
            elif b == 0x2C:  # image descriptor, local colour table, LZW code size, data sub-blocks
                frames += 1
                flags = byte(pos + 9)
                pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
                pos = skip_blocks(pos + 1)
            else:  # trailer or garbage
                break
    except EOFError:
        pass
    return frames


def _webp_header(f, size: int) -> tuple[int, int, int, int] | None:
    """``(frames, width, height, samples)`` from a WebP's chunks, read before Pillow (whose
    decoder allocates the canvas when the file is opened)."""
    f.seek(0)
    h = f.read(12)
    if len(h) < 12 or h[:4] != b"RIFF" or h[8:12] != b"WEBP":
        return None
    first = f.read(8)
    if len(first) < 8:
        return None
    kind, length = first[:4], struct.unpack("<L", first[4:])[0]
    data = f.read(min(length, 16))
    if kind == b"VP8X" and len(data) >= 10:
        flags = data[0]
        w = 1 + int.from_bytes(data[4:7], "little")
        hh = 1 + int.from_bytes(data[7:10], "little")
        samples = 4 if flags & 0x10 else 3
        frames = 1
        if flags & 0x02:  # animation: count the ANMF chunks
            frames, pos = 0, 12
            while pos + 8 <= size and frames <= _COUNT_CAP:
                f.seek(pos)
                c = f.read(8)
                if len(c) < 8:
                    break
                n = struct.unpack("<L", c[4:])[0]
                frames += c[:4] == b"ANMF"
                pos += 8 + n + (n & 1)
        return frames, w, hh, samples
    if kind == b"VP8 " and len(data) >= 10 and data[3:6] == b"\x9d\x01\x2a":
        w, hh = struct.unpack("<HH", data[6:10])
        return 1, w & 0x3FFF, hh & 0x3FFF, 3
    if kind == b"VP8L" and len(data) >= 5 and data[0] == 0x2F:
        bits = struct.unpack("<L", data[1:5])[0]
        return 1, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4 if bits >> 28 & 1 else 3
    return None


class _NotAnImage(Exception):
    """No Pillow format claims the content."""


def _load_pillow(f, path: Path, limits: ImageLimits, size: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            # Multi-page TIFF, animated GIF and WebP: counted from their headers before Pillow opens them.
            frames, what = _tiff_pages(f, size), "frames (TIFF pages)"
            if frames is None:
                frames, what = _gif_frames(f, size), "frames"
            webp = _webp_header(f, size) if frames is None else None
            if webp is not None:
                _check_header(path, webp[0], webp[2], webp[1], webp[3], limits, counted=True)
            if frames is not None:
                _refuse_frames(path, frames, what, counted=True)
            f.seek(0)
            with Image.open(f, formats=_PILLOW_FORMATS) as im:
                w, h = im.size
                if im.format in ("TIFF", "GIF", "WEBP", "MPO"):
                    n = 1  # counted above; MPO: only the primary picture is ever decoded
                else:  # APNG: acTL, read with the header
                    n = int(getattr(im, "n_frames", 1) or 1) if getattr(im, "is_animated", False) else 1
                _check_header(path, n, h, w, len(im.getbands()), limits)  # before decoding a single pixel
                im.load()
                im = ImageOps.exif_transpose(im)
                mode = im.mode
                if mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif mode == "CMYK":
                    im = im.convert("RGB")
                elif mode in ("LA", "La", "PA") or mode == "1":
                    im = im.convert("L")
                array = np.asarray(im)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(path, f"image exceeds the pixel limit, refused as a possible decompression bomb ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise _NotAnImage() from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:  # truncated or corrupt data
        raise InvalidImageError(path, f"corrupt or truncated image data ({exc})") from exc
    _check_shape(path, array.shape, limits)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N") or array.dtype == np.uint16:
        array = array.astype(np.uint16, copy=False)
    return to_grey_float(array, path)


# --------------------------------------------------------------------------------------
# DICOM

_PIXEL_TAGS = {0x7FE00010: "Pixel Data", 0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
_DEFLATED = "1.2.840.10008.1.2.1.99"
_RLE = "1.2.840.10008.1.2.5"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0) or (
        hasattr(value, "__len__") and not isinstance(value, (str, bytes)) and len(value) == 0)


def _dicom_get(ds, keyword: str, path: Path):
    try:
        return ds.get(keyword)
    except Exception as exc:  # pydicom converts values lazily: a bad one raises here
        raise InvalidImageError(path, f"DICOM {keyword} has an invalid value ({type(exc).__name__}: {exc})") from exc


def _single(value, keyword: str, path: Path, *, first: bool = False):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return value
    if len(value) != 1 and not first:
        raise InvalidImageError(path, f"DICOM {keyword} has {len(value)} values, expected one")
    return value[0]


def _number(value) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.strip()
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _dicom_int(ds, keyword: str, path: Path, *, default: int | None = None, low: int = 1,
               high: int | None = None) -> int:
    value = _dicom_get(ds, keyword, path)
    if _empty(value):
        if default is not None:
            return default
        raise InvalidImageError(path, f"DICOM {keyword} is empty" if keyword in ds else f"DICOM header lacks {keyword}")
    value = _single(value, keyword, path)
    number = _number(value)
    if number is None or (isinstance(number, float) and not (math.isfinite(number) and number.is_integer())):
        raise InvalidImageError(path, f"DICOM {keyword} {value!r} is not a whole number")
    number = int(number)
    if number < low or (high is not None and number > high):
        bound = f"at least {low}" if high is None else f"{low}..{high}"
        raise InvalidImageError(path, f"DICOM {keyword} {number} is invalid (must be {bound})")
    return number


def _dicom_float(ds, keyword: str, path: Path, *, first: bool = False) -> float:
    value = _dicom_get(ds, keyword, path)
    if _empty(value):
        raise InvalidImageError(path, f"DICOM {keyword} is empty")
    value = _single(value, keyword, path, first=first)
    number = _number(value)
    try:
        number = None if number is None else float(number)
    except OverflowError:
        number = None
    if number is None or not math.isfinite(number):
        raise InvalidImageError(path, f"DICOM {keyword} {value!r} is not a finite number")
    return number


@dataclass(frozen=True)
class _Geometry:
    frames: int
    rows: int
    cols: int
    samples: int
    bits: int
    photometric: str

    def decoded_bytes(self) -> int:
        values = self.frames * self.rows * self.cols * self.samples
        return (values * self.bits + 7) // 8

    def native_bytes(self) -> int:
        if self.photometric == "YBR_FULL_422" and self.samples == 3:
            return (self.frames * self.rows * self.cols * 2 * self.bits + 7) // 8
        return self.decoded_bytes()


def _dicom_geometry(ds, path: Path, limits: ImageLimits) -> _Geometry:
    """The pixel module's header values, sanity-checked, and the limits applied to them."""
    rows = _dicom_int(ds, "Rows", path)
    cols = _dicom_int(ds, "Columns", path)
    bits = _dicom_int(ds, "BitsAllocated", path, high=64)
    if bits != 1 and bits % 8:
        raise InvalidImageError(path, f"DICOM BitsAllocated {bits} is invalid (must be 1 or a multiple of 8)")
    stored = _dicom_int(ds, "BitsStored", path, high=bits)
    if "HighBit" in ds:
        _dicom_int(ds, "HighBit", path, default=stored - 1, low=0, high=bits - 1)
    if "PixelRepresentation" in ds:
        _dicom_int(ds, "PixelRepresentation", path, default=0, low=0, high=1)
    samples = _dicom_int(ds, "SamplesPerPixel", path, high=4)
    frames = _dicom_int(ds, "NumberOfFrames", path, default=1) if "NumberOfFrames" in ds else 1
    photometric = _dicom_get(ds, "PhotometricInterpretation", path)
    photometric = str(_single(photometric, "PhotometricInterpretation", path, first=True) or "MONOCHROME2").strip()
    _check_header(path, frames, rows, cols, samples, limits)
    geometry = _Geometry(frames, rows, cols, samples, bits, photometric)
    if geometry.decoded_bytes() > limits.max_bytes:
        raise InvalidImageError(path, f"DICOM pixel data would take {geometry.decoded_bytes()} bytes once decoded, "
                                      f"over the limit of {limits.max_bytes} bytes (ImageLimits.max_bytes)")
    return geometry


def _check_lut_descriptor(item, what: str, path: Path, depths) -> None:
    descriptor = _dicom_get(item, "LUTDescriptor", path)
    if _empty(descriptor) or isinstance(descriptor, (str, bytes)) or not hasattr(descriptor, "__len__") \
            or len(descriptor) != 3:
        raise InvalidImageError(path, f"DICOM {what} LUT Descriptor {descriptor!r} is invalid (expected 3 values)")
    numbers = [_number(v) for v in descriptor]
    if any(n is None or (isinstance(n, float) and not (math.isfinite(n) and n.is_integer())) for n in numbers):
        raise InvalidImageError(path, f"DICOM {what} LUT Descriptor {list(descriptor)!r} is not whole numbers")
    entries, _, depth = (int(n) for n in numbers)
    if not 0 <= entries <= 65535 or int(depth) not in depths:
        raise InvalidImageError(path, f"DICOM {what} LUT Descriptor {list(descriptor)!r} is invalid")
    if _empty(_dicom_get(item, "LUTData", path)):
        raise InvalidImageError(path, f"DICOM {what} LUT has no LUT Data")


def _first_item(ds, keyword: str, path: Path):
    seq = _dicom_get(ds, keyword, path)
    if _empty(seq):
        return None
    try:
        return seq[0]
    except Exception as exc:
        raise InvalidImageError(path, f"DICOM {keyword} is invalid ({type(exc).__name__}: {exc})") from exc


def _check_luts(ds, path: Path) -> None:
    """The values pydicom's modality LUT and VOI LUT/windowing will use, checked as they
    will be used (so invalid ones are refused with their name, not a numpy error)."""
    modality = _first_item(ds, "ModalityLUTSequence", path)
    if modality is not None:
        _check_lut_descriptor(modality, "Modality", path, (8, 16))
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        _dicom_float(ds, "RescaleSlope", path)
        _dicom_float(ds, "RescaleIntercept", path)
    voi = _first_item(ds, "VOILUTSequence", path)
    if voi is not None and not _empty(_dicom_get(voi, "LUTDescriptor", path)) \
            and not _empty(_dicom_get(voi, "LUTData", path)):
        _check_lut_descriptor(voi, "VOI", path, (8, *range(10, 17)))
        return
    if _empty(_dicom_get(ds, "WindowCenter", path)) or _empty(_dicom_get(ds, "WindowWidth", path)):
        return
    function = str(_dicom_get(ds, "VOILUTFunction", path) or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise InvalidImageError(path, f"DICOM VOILUTFunction {function!r} is not supported")
    _dicom_float(ds, "WindowCenter", path, first=True)
    width = _dicom_float(ds, "WindowWidth", path, first=True)
    if function == "LINEAR" and width < 1:
        raise InvalidImageError(path, f"DICOM WindowWidth {width:g} is invalid (a LINEAR window must be at least 1 wide)")
    if width <= 0:
        raise InvalidImageError(path, f"DICOM WindowWidth {width:g} is invalid (must be greater than 0)")
    if modality is None:
        _dicom_int(ds, "PixelRepresentation", path, low=0, high=1)


def _transfer_syntax(f) -> tuple[str | None, int]:
    """The Transfer Syntax UID of the file meta group and where the data set starts,
    without reading the data set (pydicom inflates a deflated one whole)."""
    f.seek(0)
    try:
        from pydicom.filereader import _read_file_meta_info, read_preamble

        read_preamble(f, True)
        meta = _read_file_meta_info(f)
        ts = meta.get("TransferSyntaxUID")
        return (None if ts is None else str(ts).strip()), f.tell()
    except Exception:
        return None, 0


def _check_inflated_size(f, start: int, path: Path, limits: ImageLimits) -> None:
    f.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            while chunk and not inflater.eof:
                total += len(inflater.decompress(chunk, 1 << 22))
                if total > limits.max_bytes:
                    raise InvalidImageError(path, f"deflated DICOM data set inflates to more than {limits.max_bytes} "
                                                  "bytes (ImageLimits.max_bytes)")
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InvalidImageError(path, f"deflated DICOM data set is corrupt ({exc})") from exc


def _read_dicom_header(f, path: Path, preamble: bool):
    """The data set up to its pixel data, and ``(tag, declared length, offset after it)`` of
    the pixel data element (``None`` without one); nothing of the pixel data is read."""
    from pydicom.filereader import read_partial

    found: list = []

    def at_pixels(tag, vr, length) -> bool:
        if int(tag) in _PIXEL_TAGS:
            found.append((int(tag), vr, length))
            return True
        return False

    f.seek(0)
    if isinstance(f, _Reader):
        f.budget(_MAX_DICOM_READS)
    try:
        header = read_partial(f, at_pixels, force=True)
    except Exception as exc:  # pydicom raises many types for corrupt files
        if preamble:
            raise InvalidImageError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        raise InvalidImageError(path, f"not a recognised image format, nor a readable DICOM file "
                                      f"({type(exc).__name__}: {exc})") from exc
    if not found:
        if preamble:
            raise InvalidImageError(path, "DICOM file has no pixel data")
        raise InvalidImageError(path, "not a recognised image format (nor a DICOM file with pixel data)")
    tag, vr, length = found[0]
    if tag != 0x7FE00010:
        raise InvalidImageError(path, f"DICOM file has no pixel data (only {_PIXEL_TAGS[tag]}, which is not supported)")
    return header, length, f.tell()


def _fragments(data: bytes, path: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """Basic Offset Table and ``(start, length)`` of each fragment of encapsulated pixel data."""
    view = memoryview(data)
    pos, n = 0, len(view)
    table: list[int] = []
    items: list[tuple[int, int]] = []
    first = True
    while pos + 8 <= n:
        group, elem, length = struct.unpack_from("<HHL", view, pos)
        tag = group << 16 | elem
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000:
            raise InvalidImageError(path, f"encapsulated DICOM pixel data is malformed (tag ({group:04X},{elem:04X}) "
                                          f"where an item was expected at byte {pos})")
        if length == 0xFFFFFFFF:
            raise InvalidImageError(path, f"encapsulated DICOM pixel data is malformed (item of undefined length "
                                          f"at byte {pos})")
        length = min(length, n - pos - 8)  # a truncated last item: what is there, as pydicom takes it
        if first:
            if length % 4:
                raise InvalidImageError(path, "encapsulated DICOM pixel data is malformed (Basic Offset Table length "
                                              "is not a multiple of 4)")
            table = list(struct.unpack_from(f"<{length // 4}L", view, pos + 8))
            first = False
        else:
            items.append((pos + 8, length))
            if len(items) > _MAX_FRAGMENTS:
                raise InvalidImageError(path, f"encapsulated DICOM pixel data holds more than {_MAX_FRAGMENTS} fragments")
        pos += 8 + length
    if first:
        raise InvalidImageError(path, "encapsulated DICOM pixel data is empty or malformed (no Basic Offset Table)")
    if not items:
        raise InvalidImageError(path, "encapsulated DICOM pixel data holds no fragments")
    return table, items


def _starts_frame(fragment: bytes, rle: bool) -> bool:
    if rle:
        return len(fragment) >= 64 and 1 <= struct.unpack_from("<L", fragment)[0] <= 15 \
            and struct.unpack_from("<L", fragment, 4)[0] == 64
    return fragment[:2] == b"\xff\xd8" or fragment[:4] == b"\xff\x4f\xff\x51" or fragment[:12] == _JP2_SIGNATURE


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG (or JPEG-LS) frame header; height 0 when
    defined later by a DNL marker."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(frame)
    while pos + 4 <= n:
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            return None
        length = struct.unpack_from(">H", frame, pos + 2)[0]
        if marker in _JPEG_SOF and pos + 10 <= n:
            height, width = struct.unpack_from(">HH", frame, pos + 5)
            return width, height, frame[pos + 9]
        pos += 2 + length
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from the SIZ marker of the first JPEG 2000 codestream."""
    at = frame.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 42 > len(frame):
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">4L", frame, at + 8)
    components = struct.unpack_from(">H", frame, at + 40)[0]
    return max(0, xsiz - xo), max(0, ysiz - yo), components


def _rle_segment_length(segment, stop: int) -> int:
    """Decoded length of one PackBits segment, counted without decoding (stops past ``stop``)."""
    pos, out, n = 0, 0, len(segment)
    while pos < n and out <= stop:
        h = segment[pos]
        if h < 128:
            out += h + 1
            pos += h + 2
        elif h > 128:
            out += 257 - h
            pos += 2
        else:
            pos += 1
    return out


def _check_rle(frame: bytes, g: _Geometry, path: Path) -> None:
    if len(frame) < 64:
        raise InvalidImageError(path, "RLE frame is truncated (no 64-byte RLE header)")
    count, *offsets = struct.unpack_from("<16L", frame)
    if g.bits % 8:
        raise InvalidImageError(path, f"RLE cannot hold BitsAllocated {g.bits} (must be a multiple of 8)")
    expected = g.samples * g.bits // 8
    if count != expected:
        raise InvalidImageError(path, f"RLE frame holds {count} segments, expected {expected} "
                                      f"({g.samples} samples of {g.bits} bits)")
    offsets = offsets[:count] + [len(frame)]
    if any(not 64 <= a <= b <= len(frame) for a, b in zip(offsets, offsets[1:])):
        raise InvalidImageError(path, f"RLE header's segment offsets {offsets[:-1]} are invalid")
    plane = g.rows * g.cols
    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
        length = _rle_segment_length(memoryview(frame)[a:b], 2 * plane + 256)
        if length > 2 * plane + 256:
            raise InvalidImageError(path, f"RLE segment {i} decodes to more than twice the {plane} bytes of a "
                                          f"{g.cols}x{g.rows} frame")


def _check_encapsulated(data: bytes, g: _Geometry, ds, ts: str | None, path: Path) -> None:
    """Frame count and codestream header of encapsulated pixel data, before decoding."""
    table, items = _fragments(data, path)
    rle = ts == _RLE
    frames = len(table)
    extended = _dicom_get(ds, "ExtendedOffsetTable", path)
    if not _empty(extended):
        frames = max(frames, len(extended) // 8)
    view = memoryview(data)
    starts = sum(_starts_frame(bytes(view[s:s + 64]), rle) for s, _ in items[:_COUNT_CAP + 1])
    if starts > frames:
        _refuse_frames(path, starts, counted=True)
    _refuse_frames(path, frames)
    frame = b"".join(view[s:s + n] for s, n in items)  # the one frame, as pydicom joins it
    if rle:
        _check_rle(frame, g, path)
        return
    size = _jpeg_size(frame) if frame[:2] == b"\xff\xd8" else _j2k_size(frame)
    if size is not None:
        width, height, components = size
        if width > g.cols or height > g.rows or components > max(g.samples, 1) or width * height * components \
                > g.rows * g.cols * g.samples:
            raise InvalidImageError(path, f"compressed frame declares {width}x{height} pixels x {components} components, "
                                          f"more than the DICOM header's {g.cols}x{g.rows} x {g.samples}")


def _load_dicom(f, path: Path, limits: ImageLimits, size: int, preamble: bool = True) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ts, start = _transfer_syntax(f)
    if ts == _DEFLATED:
        _check_inflated_size(f, start, path, limits)
    header, length, after = _read_dicom_header(f, path, preamble)
    g = _dicom_geometry(header, path, limits)
    if length != 0xFFFFFFFF:  # native pixel data: its declared length is checked before it is read
        if ts != _DEFLATED and length > size - after:
            raise InvalidImageError(path, f"DICOM pixel data is truncated: {length} bytes declared, "
                                          f"{max(0, size - after)} in the file")
        _check_native_length(length, g, path)
    _check_luts(header, path)
    del header
    f.seek(0)
    if isinstance(f, _Reader):
        f.budget(_MAX_DICOM_READS)
    try:
        ds = pydicom.dcmread(f, force=True)
    except Exception as exc:
        raise InvalidImageError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise InvalidImageError(path, "DICOM pixel data cannot be read (truncated or malformed)")
    g = _dicom_geometry(ds, path, limits)  # what is decoded: checked again on the data set read
    _check_luts(ds, path)
    try:
        data = ds.PixelData
    except Exception as exc:
        raise InvalidImageError(path, f"DICOM pixel data cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidImageError(path, f"DICOM pixel data is not bytes ({type(data).__name__})")
    if getattr(ds["PixelData"], "is_undefined_length", False):
        _check_encapsulated(bytes(data), g, ds, ts, path)
    else:
        _check_native_length(len(data), g, path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise InvalidImageError(path, f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim == 3 and g.samples == 1:
        pixels = pixels[0]  # not reached: more than one frame is refused from the header
    photometric = g.photometric
    if photometric.startswith("MONOCHROME"):
        try:
            pixels = apply_modality_lut(pixels, ds)
        except Exception as exc:
            raise InvalidImageError(path, f"DICOM modality LUT/rescale cannot be applied "
                                          f"({type(exc).__name__}: {exc})") from exc
        try:
            pixels = apply_voi_lut(pixels, ds)
        except Exception as exc:
            raise InvalidImageError(path, f"DICOM VOI LUT/window cannot be applied ({type(exc).__name__}: {exc})") from exc
        image = to_grey_float(np.asarray(pixels, dtype=np.float64), path)
        if photometric == "MONOCHROME1":  # high values are dark: invert
            image = 1.0 - image
        return image
    return to_grey_float(pixels, path)


def _check_native_length(length: int, g: _Geometry, path: Path) -> None:
    expected = g.native_bytes()
    if length < expected:
        raise InvalidImageError(path, f"DICOM pixel data is truncated: {length} bytes, but {g.frames} frame(s) of "
                                      f"{g.cols}x{g.rows} x {g.samples} samples of {g.bits} bits need {expected}")
    if expected and length >= 2 * expected:
        raise InvalidImageError(path, f"holds {length // expected} frames of pixel data ({length} bytes, {expected} "
                                      f"per {g.cols}x{g.rows} frame) though its header declares {g.frames}; {_ONE_FRAME}")


# --------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike, *, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Read an image file and return it as a float32 grey ``(H, W)`` array in [0, 1].

    Only a regular file is opened (not a FIFO, socket, device or directory, also through
    a symbolic link), and only when it is within ``limits.max_bytes``; it is decoded from
    that one open descriptor. See the module's description for what is refused and why.

    Raises:
        InvalidImageError: missing, empty, special, truncated, corrupt, non-image, too
            large, too small or multi-frame files, with the file name and the reason. No
            other exception escapes: an unexpected error while decoding (``MemoryError``
            too) becomes an `InvalidImageError` naming its type.
    """
    try:
        path = Path(os.fsdecode(path))
    except TypeError:
        raise InvalidImageError(repr(path), f"not a file path ({type(path).__name__})") from None
    fd, size = _open_regular(path, limits)
    try:
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        reader = _Reader(f, size)
        try:
            try:
                head = reader.read(132)
            except OSError as exc:
                raise InvalidImageError(path, f"cannot be read ({exc.strerror or exc})") from exc
            if not head:
                raise InvalidImageError(path, "file is empty (0 bytes)")
            if _is_dicom(path, head):
                return _load_dicom(reader, path, limits, size)
            try:
                return _load_pillow(reader, path, limits, size)
            except _NotAnImage:
                if path.suffix.lower() in _DICOM_SUFFIXES:
                    return _load_dicom(reader, path, limits, size, preamble=False)
                raise InvalidImageError(path, "not a recognised image format") from None
        except InvalidImageError:
            raise
        except _TooManyReads:
            raise InvalidImageError(path, f"takes more than {reader._max_reads} reads to parse (a flood of tiny "
                                          "chunks, markers or data elements), refused") from None
        except MemoryError as exc:
            raise InvalidImageError(path, f"ran out of memory while decoding (MemoryError: {exc})") from None
        except Exception as exc:
            raise InvalidImageError(path, f"cannot be decoded ({type(exc).__name__}: {exc})") from exc


def declared_pixels(path: str | os.PathLike) -> int:
    """The pixels (rows x columns) ``path``'s header declares, read without decoding: what a batch
    job reserves for it before decoding. 0 when it cannot tell (`load_image` then refuses
    the file, quickly)."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return 0
        with open(path, "rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        with Image.open(path) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # noqa: BLE001 - unreadable headers are the decoder's to report
        return 0


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lung mask image (any non-zero pixel is lung) as a bool ``(H, W)`` array."""
    return load_image(path, limits=ImageLimits(min_side=1)) > 0.5
