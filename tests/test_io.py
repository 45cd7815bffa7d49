import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from patchflannel.errors import InvalidImageError
from patchflannel.io import ImageLimits, load_image, load_mask, to_grey_float


@pytest.fixture(scope="module")
def grey8(real_png):
    return cv2.imread(str(real_png), cv2.IMREAD_GRAYSCALE)


def test_png_8bit_matches_opencv(real_png, grey8):
    image = load_image(real_png)
    assert image.dtype == np.float32 and image.shape == grey8.shape
    np.testing.assert_allclose(image, grey8 / 255.0, atol=1e-6)


def test_16bit_png_rescaled_from_its_range(tmp_path, grey8):
    # A 12-bit film stored in 16 bits: values 0..4095 must still span [0, 1].
    deep = (grey8.astype(np.uint16) * 16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    image = load_image(tmp_path / "deep.png")
    assert image.min() == 0.0 and image.max() == 1.0
    expected = (deep - deep.min()) / (deep.max() - deep.min())
    np.testing.assert_allclose(image, expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "LA"])
def test_colour_modes_become_grey(tmp_path, grey8, mode):
    im = Image.fromarray(grey8).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path, quality=95) if mode == "CMYK" else im.save(path)
    image = load_image(path)
    assert image.shape == grey8.shape
    # Grey content survives every colour mode (JPEG/palette within quantisation error).
    assert np.abs(image - grey8 / 255.0).mean() < 0.03


def test_jpeg_exif_orientation_applied(tmp_path, grey8):
    im = Image.fromarray(grey8)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rot.jpg")
    assert image.shape == grey8.shape[::-1]
    np.testing.assert_allclose(image, np.rot90(grey8, -1) / 255.0, atol=0.05)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiff_16bit_and_float(tmp_path, grey8, dtype):
    import tifffile

    data = grey8.astype(dtype) * (100 if dtype == np.uint16 else 0.5)
    tifffile.imwrite(tmp_path / "x.tif", data)
    image = load_image(tmp_path / "x.tif")
    np.testing.assert_allclose(image, (data - data.min()) / (data.max() - data.min()), atol=1e-5)


def _dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, with_pixels=True):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_monochrome2_and_monochrome1_inverted(tmp_path, grey8):
    raw = grey8.astype(np.uint16) * 16
    _dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", slope=2.0, intercept=-100)
    _dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1")
    m2 = load_image(tmp_path / "m2.dcm")
    m1 = load_image(tmp_path / "m1.dcm")
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(m2, expected, atol=1e-5)  # linear rescale keeps the picture
    np.testing.assert_allclose(m1, 1.0 - expected, atol=1e-5)  # MONOCHROME1: bright = low values


def test_dicom_detected_by_magic_not_extension(tmp_path, grey8):
    _dicom(tmp_path / "film.bin", grey8.astype(np.uint16))
    assert load_image(tmp_path / "film.bin").shape == grey8.shape


def test_dicom_without_pixel_data(tmp_path, grey8):
    _dicom(tmp_path / "empty.dcm", grey8, with_pixels=False)
    with pytest.raises(InvalidImageError, match="no pixel data"):
        load_image(tmp_path / "empty.dcm")


def _png_header_only(width, height) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A valid 20000x20000 header and a few bytes of data: a few hundred bytes declaring 400 MP.
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.png", b"", "empty"),
        ("noise.png", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a recognised"),
        ("text.jpg", b"this is not an image at all\n" * 20, "not a recognised"),
        ("bomb.png", _png_header_only(20000, 20000), "exceeds.*limit"),
        ("tiny.png", None, "smaller than"),
    ],
)
def test_refusals_name_file_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        cv2.imwrite(str(path), np.full((1, 1), 128, np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidImageError, match=reason) as info:
        load_image(path)
    assert info.value.path == str(path) and name in str(info.value)


def test_truncated_file(tmp_path, real_png):
    data = real_png.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="truncated|corrupt"):
        load_image(tmp_path / "cut.png")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InvalidImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(tmp_path)


def test_limits_are_configurable(real_png):
    with pytest.raises(InvalidImageError, match="exceeds"):
        load_image(real_png, limits=ImageLimits(max_pixels=1000))


def test_arrays_nan_and_shapes():
    with pytest.raises(InvalidImageError, match="NaN"):
        to_grey_float(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(InvalidImageError, match="shape"):
        to_grey_float(np.zeros((2, 3, 5)))
    out = to_grey_float(np.array([[10, 20], [30, 50]], dtype=np.int32))
    np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1.0]])


def test_load_mask(lungseg_rows):
    mask = load_mask(lungseg_rows[0]["mask"])
    assert mask.dtype == bool and 0.05 < mask.mean() < 0.7
