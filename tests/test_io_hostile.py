"""Hostile files for :func:`patchflannel.io.load_image`, built at run time from a real film.

Every case must end quickly in an :class:`InvalidImageError` that names the file and gives a
specific reason, without decoding pixel data the limits forbid. Cases that would hang a wrong
implementation (FIFOs, /dev/zero) run under a deadline, so a regression fails instead of
hanging the suite.
"""
import contextlib
import io
import os
import re
import signal
import socket
import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate

from patchflannel.errors import InvalidImageError
from patchflannel.io import MAX_BYTES, ImageLimits, load_image


class _Hung(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` can swallow it."""


@contextlib.contextmanager
def deadline(seconds: float = 10.0):
    def on_alarm(signum, frame):
        raise _Hung()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hung:
        pytest.fail(f"still running after {seconds} s: this input would hang the decoder")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def refused(path, match: str, limits: ImageLimits | None = None, seconds: float = 10.0) -> InvalidImageError:
    """Assert ``load_image(path)`` raises InvalidImageError naming ``path`` with a reason matching ``match``."""
    with deadline(seconds):
        with pytest.raises(InvalidImageError) as info:
            load_image(path, **({} if limits is None else {"limits": limits}))
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert re.search(match, err.reason), f"reason {err.reason!r} does not match {match!r}"
    return err


@pytest.fixture(scope="module")
def grey(real_png) -> np.ndarray:
    return np.asarray(Image.open(real_png).convert("L"))


def _ds(pixels: np.ndarray | None, ts=uid.ExplicitVRLittleEndian, **attrs) -> FileDataset:
    """A minimal secondary-capture DICOM, built by hand; ``pixels`` None leaves out Pixel Data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = ts
    ds = FileDataset("film", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
        ds.PhotometricInterpretation = "MONOCHROME2" if pixels.ndim == 2 else "RGB"
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        bits = pixels.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _encapsulated(ds: FileDataset, frames: list[bytes], has_bot: bool = True) -> FileDataset:
    ds.PixelData = encapsulate(frames, has_bot=has_bot)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _save(ds: FileDataset, path) -> os.PathLike:
    ds.save_as(path, enforce_file_format=True)
    return path


def _j2k(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="JPEG2000", no_jp2=True)
    return buf.getvalue()


def _patch(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Records any decode of DICOM pixel data; the refusals below must come before one."""
    calls = []
    real = Dataset.pixel_array

    def spy(self):
        calls.append(1)
        return real.fget(self)

    monkeypatch.setattr(Dataset, "pixel_array", property(spy))
    return calls


# ------------------------------------------------------------------------------------
# 3. special files: refused at once, never opened for reading

def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "film.png"
    os.mkfifo(fifo)
    refused(fifo, "FIFO.*not a regular file", seconds=5)
    link = tmp_path / "film.dcm"
    link.symlink_to(fifo)
    refused(link, "FIFO.*symbolic link", seconds=5)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
@pytest.mark.parametrize("name", ["film.dcm", "film.png"])
def test_devices_are_refused_directly_and_through_links(tmp_path, device, name):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    link = tmp_path / name
    link.symlink_to(device)
    refused(link, "character device.*not a regular file", seconds=5)
    refused(device, "character device", seconds=5)


def test_socket_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative name: AF_UNIX paths are limited to ~100 bytes
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind("film.png")
        refused(tmp_path / "film.png", "socket, not a regular file", seconds=5)
    finally:
        server.close()


def test_directories_and_links_to_them(tmp_path):
    (tmp_path / "dir.png").mkdir()
    refused(tmp_path / "dir.png", "is a directory")
    (tmp_path / "link.png").symlink_to(tmp_path / "dir.png")
    refused(tmp_path / "link.png", "is a directory.*symbolic link")


def test_broken_links_and_link_loops(tmp_path):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    err = refused(tmp_path / "dangling.png", "broken symbolic link")
    assert "gone.png" in err.reason
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    refused(tmp_path / "a.png", "too many levels of symbolic links")
    (tmp_path / "self.dcm").symlink_to(tmp_path / "self.dcm")
    refused(tmp_path / "self.dcm", "too many levels of symbolic links")
    refused(tmp_path / "nowhere.png", "does not exist")


def test_odd_path_values(tmp_path, real_png):
    refused(str(tmp_path / "a\0b.png"), "invalid file name")
    assert load_image(os.fsencode(real_png)).shape == load_image(real_png).shape
    with pytest.raises(InvalidImageError, match="not a file path"):
        load_image(12.5)


def test_link_to_a_real_film_still_loads(tmp_path, real_png, grey):
    (tmp_path / "film.png").symlink_to(real_png)
    np.testing.assert_array_equal(load_image(tmp_path / "film.png"), load_image(real_png))


def test_byte_limit_is_checked_before_reading(tmp_path, real_png, monkeypatch):
    assert ImageLimits().max_bytes == MAX_BYTES == 512 * 1024 * 1024
    size = real_png.stat().st_size
    err = refused(real_png, f"file of {size} bytes exceeds the limit of 1000 bytes", ImageLimits(max_bytes=1000))
    assert "max_bytes" in err.reason
    huge = tmp_path / "huge.dcm"  # sparse: 1 TiB declared, nothing on disk
    with open(huge, "wb") as f:
        f.truncate(1 << 40)
    opened = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: opened.append(a) or real_fdopen(*a, **k))
    refused(huge, "exceeds the limit of .* bytes", seconds=5)
    assert not opened, "the file was opened for reading before its size was checked"


def test_the_file_is_opened_once_and_decoded_from_that_descriptor(tmp_path, real_png, grey, monkeypatch):
    import builtins

    tif = tmp_path / "film.tif"
    Image.fromarray(grey).save(tif, compression="tiff_lzw")  # libtiff reads it from the descriptor
    dcm = _save(_ds(grey.astype(np.uint16) * 16), tmp_path / "film.dcm")
    opened = []
    real_os_open, real_open = os.open, builtins.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_os_open(p, *a, **k))

    def no_open_by_name(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fspath(file) in (str(real_png), str(tif), str(dcm)):
            raise AssertionError(f"{file} opened a second time, by name")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_open_by_name)
    for path in (real_png, tif, dcm):
        assert load_image(path).shape == grey.shape
    assert opened == [str(real_png), str(tif), str(dcm)]


# ------------------------------------------------------------------------------------
# 1. multi-frame / multi-page inputs and the pixel limit, from the header

def test_multiframe_jpeg2000_dicom_refused_before_decoding(tmp_path, no_pixel_decoding):
    # ~18 KB declaring 60 frames of 4000x4000: refused from the header, pixel data never decoded.
    ds = _ds(None, uid.JPEG2000Lossless, Rows=4000, Columns=4000, SamplesPerPixel=1,
             PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
             PixelRepresentation=0, NumberOfFrames=60)
    path = _save(_encapsulated(ds, [b"\xff\x4f\xff\x51" + bytes(296)] * 60), tmp_path / "cine.dcm")
    assert path.stat().st_size < 20_000
    tracemalloc.start()
    try:
        refused(path, r"holds 60 frames; a chest X-ray is one frame: extract the frame you want")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak} bytes allocated to refuse an 18 KB file"
    assert not no_pixel_decoding


def test_multiframe_rle_and_native_dicom(tmp_path, grey, no_pixel_decoding):
    ds = _ds(None, uid.RLELossless, Rows=4000, Columns=4000, SamplesPerPixel=1,
             PhotometricInterpretation="MONOCHROME2", BitsAllocated=8, BitsStored=8, HighBit=7,
             PixelRepresentation=0, NumberOfFrames=40)
    rle_frame = struct.pack("<16L", 1, 64, *[0] * 14) + b"\x81\x00" * 8
    refused(_save(_encapsulated(ds, [rle_frame] * 40), tmp_path / "rle.dcm"), "holds 40 frames")
    native = _ds(np.stack([grey] * 3).reshape(-1, grey.shape[1]), NumberOfFrames=3, Rows=grey.shape[0])
    refused(_save(native, tmp_path / "native.dcm"), "holds 3 frames")
    refused(_save(_ds(grey, NumberOfFrames=10**9), tmp_path / "billion.dcm"), "holds 1000000000 frames")
    assert not no_pixel_decoding


def test_frames_hidden_from_the_header_are_counted(tmp_path, grey, no_pixel_decoding):
    small = grey[:64, :64]
    frames = [_j2k(small)] * 5
    base = dict(Rows=64, Columns=64)
    # NumberOfFrames absent, but the Basic Offset Table lists 5 frames ...
    refused(_save(_encapsulated(_ds(small.copy(), uid.JPEG2000Lossless, **base), frames), tmp_path / "bot.dcm"),
            "holds 5 frames")
    # ... or no offset table and 5 fragments that each start a codestream ...
    refused(_save(_encapsulated(_ds(small.copy(), uid.JPEG2000Lossless, **base), frames, has_bot=False),
                  tmp_path / "nobot.dcm"), "holds 5 frames")
    # ... or native pixel data four frames long under a one-frame header.
    ds = _ds(grey)
    ds.PixelData = grey.tobytes() * 4
    refused(_save(ds, tmp_path / "long.dcm"), "holds 4 frames of pixel data")
    assert not no_pixel_decoding


def test_pixel_limit_counts_samples_and_is_checked_before_decoding(tmp_path, grey, no_pixel_decoding):
    n = grey.size
    rgb = _save(_ds(np.dstack([grey] * 3)), tmp_path / "rgb.dcm")
    refused(rgb, rf"{grey.shape[1]}x{grey.shape[0]} pixels x 3 samples .*exceeds the limit of {2 * n}",
            ImageLimits(max_pixels=2 * n))
    assert load_image(_save(_ds(grey), tmp_path / "grey.dcm"), limits=ImageLimits(max_pixels=2 * n)).shape == grey.shape
    ds = _ds(None, uid.JPEG2000Lossless, Rows=30000, Columns=30000, SamplesPerPixel=1,
             PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
             PixelRepresentation=0)
    refused(_save(_encapsulated(ds, [b"\xff\x4f\xff\x51" + bytes(100)]), tmp_path / "big.dcm"),
            "30000x30000 pixels exceeds the limit")
    no_pixel_decoding.clear()
    # The pixel data's decoded size must fit max_bytes too (a small compressed file of a big image).
    j2k = _save(_encapsulated(_ds(grey.astype(np.uint16), uid.JPEG2000Lossless), [_j2k(grey)]), tmp_path / "j2k.dcm")
    size = j2k.stat().st_size
    refused(j2k, r"would take \d+ bytes once decoded", ImageLimits(max_bytes=size + 1000))
    assert not no_pixel_decoding
    assert load_image(j2k).shape == grey.shape  # within the default limits it decodes


def test_codestream_larger_than_its_header_is_refused(tmp_path, grey):
    bomb = Image.new("L", (4000, 4000), 7)
    for ts, data in [(uid.JPEG2000Lossless, _j2k(bomb)), (uid.JPEGBaseline8Bit, _jpeg(bomb))]:
        ds = _encapsulated(_ds(grey[:64, :64].copy(), ts), [data])
        refused(_save(ds, tmp_path / "liar.dcm"), "compressed frame declares 4000x4000 pixels")


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def test_rle_segment_bomb_is_refused_without_decoding(tmp_path, grey, no_pixel_decoding):
    # A 64x64 8-bit frame whose one segment would decode to 6.4 MB (run of 128 bytes per 2 bytes).
    frame = struct.pack("<16L", 1, 64, *[0] * 14) + b"\x81\x00" * 50_000
    ds = _encapsulated(_ds(grey[:64, :64].copy(), uid.RLELossless), [frame])
    refused(_save(ds, tmp_path / "rle_bomb.dcm"), "RLE segment 0 decodes to more than")
    assert not no_pixel_decoding


def test_deflate_bomb_is_refused(tmp_path, grey):
    ds = _ds(grey, uid.DeflatedExplicitVRLittleEndian)
    ds.add_new(0x00091010, "OB", bytes(8_000_000))  # private element: 8 MB of zeros, deflates to ~8 KB
    ds.add_new(0x00090010, "LO", "hostile")
    path = _save(ds, tmp_path / "deflated.dcm")
    assert path.stat().st_size < 400_000
    refused(path, r"deflated DICOM data set inflates to more than 2000000 bytes", ImageLimits(max_bytes=2_000_000))
    ok = _save(_ds(grey, uid.DeflatedExplicitVRLittleEndian), tmp_path / "deflated_ok.dcm")
    expected = (grey - grey.min()) / (grey.max() - grey.min())  # DICOM: rescaled from its own range
    np.testing.assert_allclose(load_image(ok), expected, atol=1e-6)


def test_truncated_native_pixel_data(tmp_path, grey):
    path = _save(_ds(grey.astype(np.uint16)), tmp_path / "cut.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    refused(path, "pixel data is truncated")


def test_multipage_tiff_and_animations(tmp_path, grey):
    frames = [Image.fromarray(np.roll(grey, 10 * i, axis=1)) for i in range(3)]
    for name, kw in [("pages.tif", {}), ("anim.gif", {"duration": 100, "loop": 0}),
                     ("anim.webp", {"duration": 100, "lossless": True}), ("anim.png", {"duration": 100})]:
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], **kw)
        refused(tmp_path / name, "holds 3 frames.*; a chest X-ray is one frame: extract the frame you want")


def test_jpeg_extra_pictures_and_tiff_previews_are_not_frames(tmp_path, grey):
    import tifffile

    # A JPEG with an MPF preview (as phones write): only the primary picture is decoded.
    film = Image.fromarray(grey)
    film.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[film.resize((64, 64))])
    assert Image.open(tmp_path / "phone.jpg").n_frames == 2
    assert load_image(tmp_path / "phone.jpg").shape == grey.shape
    # A TIFF whose second page is a reduced-resolution preview of the first.
    with tifffile.TiffWriter(tmp_path / "preview.tif") as tif:
        tif.write(grey)
        tif.write(grey[::4, ::4], subfiletype=1)
    np.testing.assert_allclose(load_image(tmp_path / "preview.tif"), grey / 255.0, atol=1e-6)


def test_tiff_with_a_hundred_thousand_pages_is_counted_quickly(tmp_path, grey):
    one = io.BytesIO()
    Image.fromarray(grey).save(one, format="TIFF")
    data = bytearray(one.getvalue())
    assert data[:4] == b"II*\0"
    first = struct.unpack_from("<L", data, 4)[0]
    count = struct.unpack_from("<H", data, first)[0]
    # Chain 100,000 one-entry IFDs (pages) after the real one: 1.8 MB, Pillow would walk each.
    struct.pack_into("<L", data, first + 2 + 12 * count, len(data))
    n = 100_000
    start = len(data)
    chain = bytearray()
    for i in range(n):
        chain += struct.pack("<HHHLLL", 1, 254, 4, 1, 0, 0 if i == n - 1 else start + 18 * (i + 1))
    (tmp_path / "pages.tif").write_bytes(bytes(data + chain))
    refused(tmp_path / "pages.tif", r"holds more than 10000 frames \(TIFF pages\)", seconds=5)


def test_tiff_ifd_loop_does_not_hang(tmp_path, grey):
    one = io.BytesIO()
    Image.fromarray(grey).save(one, format="TIFF")
    data = bytearray(one.getvalue())
    first = struct.unpack_from("<L", data, 4)[0]
    count = struct.unpack_from("<H", data, first)[0]
    struct.pack_into("<L", data, first + 2 + 12 * count, first)  # the IFD points at itself
    (tmp_path / "loop.tif").write_bytes(bytes(data))
    with deadline(5):
        np.testing.assert_allclose(load_image(tmp_path / "loop.tif"), grey / 255.0, atol=1e-6)


def test_webp_canvas_bomb_refused_before_pillow_allocates(tmp_path):
    # VP8X header declaring a 16384x16384 canvas, and a tiny frame: a few dozen bytes.
    vp8x = b"VP8X" + struct.pack("<L", 10) + bytes([0x10, 0, 0, 0]) + (16383).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + b"VP8L" + struct.pack("<L", 6) + b"\x2f" + bytes(5)
    (tmp_path / "bomb.webp").write_bytes(b"RIFF" + struct.pack("<L", len(body)) + body)
    refused(tmp_path / "bomb.webp", "16384x16384 pixels x 4 samples .*exceeds the limit")


def test_png_declaring_a_huge_image_is_still_refused(tmp_path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)  # 2.5 G pixels of RGB in ~100 bytes
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(data)
    refused(tmp_path / "bomb.png", "exceeds.*limit")


def test_floods_of_tiny_items_are_cut_short(tmp_path):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # PNG: 300,000 empty ancillary chunks before a 64x64 image (3.6 MB).
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"xxXx", b"") * 300_000
           + chunk(b"IDAT", zlib.compress(bytes(65 * 64))) + chunk(b"IEND", b""))
    (tmp_path / "flood.png").write_bytes(png)
    refused(tmp_path / "flood.png", r"takes more than \d+ reads to parse", seconds=30)
    # JPEG: 500,000 empty APP5 markers (2 MB).
    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    (tmp_path / "flood.jpg").write_bytes(jpg[:2] + b"\xff\xe5\x00\x02" * 500_000 + jpg[2:])
    refused(tmp_path / "flood.jpg", r"takes more than \d+ reads to parse", seconds=30)
    # DICOM: 2 MB of zeros named .dcm parse as 250,000 empty data elements.
    (tmp_path / "zeros.dcm").write_bytes(bytes(2_000_000))
    refused(tmp_path / "zeros.dcm", r"takes more than \d+ reads to parse", seconds=30)


# ------------------------------------------------------------------------------------
# 2. invalid DICOM attributes: named, never a raw pydicom/numpy exception

@pytest.mark.parametrize("attrs,match", [
    ({"WindowCenter": 100, "WindowWidth": 0}, r"WindowWidth 0 is invalid"),
    ({"WindowCenter": 100, "WindowWidth": -20, "VOILUTFunction": "SIGMOID"}, r"WindowWidth -20 is invalid"),
    ({"WindowCenter": 100, "WindowWidth": 50, "VOILUTFunction": "CUBIC"}, r"VOILUTFunction 'CUBIC'"),
    ({"Rows": 0}, r"DICOM Rows 0 is invalid"),
    ({"BitsAllocated": 0}, r"DICOM BitsAllocated 0 is invalid"),
    ({"BitsAllocated": 12}, r"DICOM BitsAllocated 12 is invalid"),
    ({"BitsStored": 40}, r"DICOM BitsStored 40 is invalid"),
    ({"SamplesPerPixel": 0}, r"DICOM SamplesPerPixel 0 is invalid"),
    ({"NumberOfFrames": 0}, r"DICOM NumberOfFrames 0 is invalid"),
    ({"NumberOfFrames": -3}, r"DICOM NumberOfFrames -3 is invalid"),
    ({"Rows": None}, r"DICOM header lacks Rows"),
    ({"SamplesPerPixel": None}, r"DICOM header lacks SamplesPerPixel"),
    ({"BitsAllocated": None}, r"DICOM header lacks BitsAllocated"),
])
def test_invalid_dicom_attributes(tmp_path, grey, attrs, match):
    ds = _ds(grey.astype(np.uint16))
    for key, value in attrs.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    refused(_save(ds, tmp_path / "bad.dcm"), match)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns of the invalid values it reads
@pytest.mark.parametrize("keyword,good,bad,match", [
    ("RescaleSlope", b"9.75", b"abcd", r"RescaleSlope"),
    ("RescaleIntercept", b"-12.5", b"oops!", r"RescaleIntercept"),
    ("WindowWidth", b"1234.5", b"wide!!", r"WindowWidth"),
    ("NumberOfFrames", b"98765", b"abcde", r"NumberOfFrames"),
    ("RescaleSlope", b"9.75", b"nan ", r"RescaleSlope .*not a finite number"),
])
def test_malformed_dicom_values_in_the_file(tmp_path, grey, keyword, good, bad, match):
    attrs = {"RescaleSlope": 1, "RescaleIntercept": 0, "WindowCenter": 1000, "WindowWidth": 800}
    attrs[keyword] = good.decode()
    path = _save(_ds(grey.astype(np.uint16), **attrs), tmp_path / "bad.dcm")
    _patch(path, good, bad.ljust(len(good)))
    refused(path, match)


@pytest.mark.parametrize("vr,value,match", [("LO", "abc", r"Rows .*not a whole number"),
                                            ("SS", -5, r"Rows -5 is invalid"),
                                            ("FD", 12.5, r"Rows 12.5 is not a whole number")])
def test_dimensions_of_the_wrong_type(tmp_path, grey, vr, value, match):
    ds = _ds(grey.astype(np.uint16))
    del ds.Rows
    ds.add_new(0x00280010, vr, value)
    refused(_save(ds, tmp_path / "bad.dcm"), match)


def test_any_unexpected_decoder_error_becomes_invalid_image_error(tmp_path, real_png, grey, monkeypatch):
    import pydicom.pixels
    from PIL import ImageOps

    def boom(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(ImageOps, "exif_transpose", boom)
    refused(real_png, r"MemoryError")
    monkeypatch.undo()

    monkeypatch.setattr(pydicom.pixels, "apply_voi_lut", lambda *a, **k: 1 / 0)
    refused(_save(_ds(grey.astype(np.uint16)), tmp_path / "film.dcm"), r"VOI LUT.*ZeroDivisionError")
    monkeypatch.undo()

    def key_error(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(Image.Image, "load", key_error)
    refused(real_png, r"KeyError")


# ------------------------------------------------------------------------------------
# 4. type by content, not by name

def test_type_is_decided_by_content(tmp_path, real_png, grey):
    png_as_dcm = tmp_path / "film.dcm"
    png_as_dcm.write_bytes(real_png.read_bytes())
    np.testing.assert_array_equal(load_image(png_as_dcm), load_image(real_png))
    dcm_as_png = _save(_ds(grey.astype(np.uint16) * 16), tmp_path / "film.png")
    assert load_image(dcm_as_png).shape == grey.shape
    # DICOM without its 128-byte preamble: read when named .dcm, refused as unknown otherwise.
    ds = _ds(grey.astype(np.uint16) * 16)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    bare = buf.getvalue()
    bare = bare[132:] if bare[128:132] == b"DICM" else bare
    (tmp_path / "bare.dcm").write_bytes(bare)
    (tmp_path / "bare.png").write_bytes(bare)
    np.testing.assert_array_equal(load_image(tmp_path / "bare.dcm"), load_image(dcm_as_png))
    refused(tmp_path / "bare.png", "not a recognised image format")


@pytest.mark.parametrize("fmt,kw,atol", [("GIF", {}, 1e-6), ("WEBP", {"lossless": True}, 1e-6),
                                         ("WEBP", {"quality": 90}, 0.03), ("PPM", {}, 1e-6)])
def test_single_frame_gif_webp_ppm_decode(tmp_path, grey, fmt, kw, atol):
    path = tmp_path / f"film.{fmt.lower()}"
    Image.fromarray(grey).save(path, format=fmt, **kw)
    image = load_image(path)
    assert image.dtype == np.float32 and image.shape == grey.shape
    assert np.abs(image - grey / 255.0).mean() < atol if atol > 1e-6 else np.allclose(image, grey / 255.0, atol=atol)
