"""Hostile input: a fuzz corpus built from a real film, fed to the decoder, both batch jobs and
the Python API. Every case must end in a specific error or a recorded rejection; no batch job
may die on one, and nothing may be written outside the output folder."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from patchflannel import Pipeline
from patchflannel.errors import InvalidImageError
from patchflannel.io import load_image
from patchflannel.predict import JSONL, run_predict
from patchflannel.segment.job import read_summary
from patchflannel.segment.job import run_batch

from .test_io import _dicom, _png_header_only


def _encode(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def fuzz_corpus(film: Path, tmp: Path) -> dict[str, tuple[bytes, str]]:
    """``{file name: (bytes, expected)}``: expected is ``"ok"`` (a valid image of a chest: must
    classify), ``"rejected"`` (decodes, but is no chest film) or a regex the error must match."""
    grey = cv2.imread(str(film), cv2.IMREAD_GRAYSCALE)
    png = _encode(grey, "PNG")
    rgb = np.dstack([grey] * 3)
    _dicom(tmp / "nopix.dcm", grey, with_pixels=False)
    _dicom(tmp / "ok.dcm", grey)
    rng = np.random.default_rng(0)
    return {
        "zero_bytes.png": (b"", "empty"),
        "truncated_half.png": (png[: len(png) // 2], "truncated|corrupt"),
        "truncated_jpeg.jpg": (_encode(grey, "JPEG")[:3000], "truncated|corrupt"),
        "truncated_header.png": (png[:40], "truncated|corrupt|not a recognised"),
        "random_bytes.png": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not a recognised"),
        "random_bytes.dcm": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "DICOM|not a recognised"),
        "text_named.jpg": (b"not an image\n" * 50, "not a recognised"),
        "png_named.jpg": (png, "ok"),  # wrong extension: decoded by content
        "one_pixel.png": (_encode(np.full((1, 1), 9, np.uint8), "PNG"), "smaller than"),
        "declared_20000x20000.png": (_png_header_only(20000, 20000), "exceeds.*limit"),
        "uint16.tif": (_encode((grey.astype(np.uint16) * 257), "TIFF"), "ok"),
        "float32.tif": (_encode(grey.astype(np.float32) / 255, "TIFF"), "ok"),
        "rgba.png": (_encode(np.dstack([rgb, np.full_like(grey, 255)]), "PNG"), "ok"),
        "palette.png": (_encode(Image.fromarray(rgb).convert("P"), "PNG"), "ok"),
        "cmyk.jpg": (_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "ok"),
        "dicom_ok.dcm": ((tmp / "ok.dcm").read_bytes(), "ok"),
        "dicom_no_pixels.dcm": ((tmp / "nopix.dcm").read_bytes(), "no pixel data"),
        "black.png": (_encode(np.zeros_like(grey), "PNG"), "rejected"),
        "noise_photo.png": (_encode(rng.integers(0, 256, grey.shape, dtype=np.uint8), "PNG"), "rejected"),
    }


@pytest.fixture(scope="module")
def corpus(cxr4_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    film = Path(next(r["image"] for r in cxr4_rows if r["label"] == "covid"))
    cases = fuzz_corpus(film, tmp_path_factory.mktemp("fuzz_src"))
    for name, (data, _) in cases.items():
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / name).write_bytes(data)
    # A manifest with a missing file and paths that climb out of its folder.
    (root / "outside.png").write_bytes(cases["png_named.jpg"][0])
    (root / "in" / "manifest.csv").write_text(
        "image,label\n" + "".join(f"{n},x\n" for n in cases) + "missing.png,x\n../outside.png,x\n../../etc/passwd,x\n")
    return root, cases


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_decoder_answers_every_case(corpus):
    root, cases = corpus
    for name, (_, expected) in cases.items():
        if expected in ("ok", "rejected"):
            image = load_image(root / "in" / name)
            assert image.dtype == np.float32 and image.ndim == 2 and np.isfinite(image).all(), name
        else:
            with pytest.raises(InvalidImageError, match=expected) as info:
                load_image(root / "in" / name)
            assert name in str(info.value)



def test_segment_job_records_every_case_and_stays_in_its_folder(corpus, segmenter):
    root, cases = corpus
    before = _files(root)
    out = root / "segment_out"
    counts = run_batch(root / "in" / "manifest.csv", out, segmenter, batch_size=4, progress=False)
    records = read_summary(out)
    assert counts["total"] == len(records) == len(cases) + 3
    by_path = {Path(r["path"]).name: r for r in records.values()}
    for name, (_, expected) in cases.items():
        status = by_path[name]["status"]
        assert status == ("ok" if expected == "ok" else "rejected" if expected == "rejected" else "error"), name
        assert status == "ok" or by_path[name]["rejection"]
    assert by_path["missing.png"]["status"] == "error" and "does not exist" in by_path["missing.png"]["rejection"]
    assert by_path["outside.png"]["status"] == "ok"  # readable, written under out/_external/
    new = _files(root) - before
    assert new and all(p.is_relative_to(out) for p in new)
    assert not [p for p in new if p.name.startswith(".")]  # no temp files left


def test_predict_job_records_every_case_and_stays_in_its_folder(corpus, pipeline):
    root, cases = corpus
    before = _files(root)
    out = root / "predict_out"
    counts = run_predict(root / "in" / "manifest.csv", out, pipeline, batch_size=4, explain=True, progress=False)
    assert counts["inputs"] == len(cases) + 3 and counts["error"] == 0
    import json

    records = {Path(r["path"]).name: r for r in map(json.loads, (out / JSONL).read_text().splitlines())}
    for name, (_, expected) in cases.items():
        assert records[name]["status"] == ("ok" if expected == "ok" else "rejected"), name
        assert records[name]["status"] == "ok" or records[name]["rejection"]
    assert all(p.is_relative_to(out) for p in _files(root) - before)


@pytest.mark.parametrize("array,reason", [
    (np.full((300, 300), np.nan), "NaN"),
    (np.where(np.eye(300) > 0, np.inf, 0.5), "infinite"),
    (np.zeros((0, 300)), "no pixels"),
    (np.zeros((300, 300, 7)), "shape"),
    (np.ones((300, 300), bool), "mask"),
    (np.zeros((300, 300), complex), "pixel type"),
    (np.zeros((10, 10), np.uint8), "smaller than"),
    (np.zeros((300, 300), np.uint8), "lung"),
])
def test_python_api_rejects_bad_arrays_with_a_reason(pipeline, array, reason):
    pred = pipeline.predict([array])[0]
    assert pred.label is None and pred.rejection and reason in pred.rejection


@pytest.mark.slow
def test_predict_job_sigkill_and_restart_gives_one_record_per_input(corpus, tmp_path):
    root, cases = corpus
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "patchflannel.predict", str(root / "in"), "--out", str(out), "--k", "2",
           "--batch-size", "2", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / JSONL).exists() and (out / JSONL).read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < (out / JSONL).read_text().count("\n") < len(cases), "the job should have been killed part-way"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    lines = (out / JSONL).read_text().splitlines()
    import json

    names = [json.loads(line)["input"] for line in lines]
    assert sorted(names) == sorted(set(names)) and len(names) == len(cases)  # each input exactly once
    assert (out / "predictions.csv").read_text().count("\n") == len(cases) + 1
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_tampered_pipeline_bundle_is_refused(pipeline, tmp_path):
    from patchflannel import WeightsError

    pipeline.save_pretrained(tmp_path / "bundle")
    target = tmp_path / "bundle" / "learners" / "resnet18" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern in the last tensor
    target.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256") as info:
        Pipeline.from_pretrained(tmp_path / "bundle", device="cpu")
    assert "resnet18" in str(info.value)
