import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from patchflannel.segment.__main__ import main as segment_main
from patchflannel.segment.job import read_summary
from patchflannel.segment.job import run_batch
from patchflannel.store import H5MaskedDataset, read_masked_npz

BROKEN = {
    "broken/empty.png": b"",
    "broken/random.jpg": bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)),
    "broken/notes.png": b"patient notes, not an image\n" * 10,
}


@pytest.fixture(scope="module")
def input_folder(cxr4_rows, tmp_path_factory):
    """16 real cxr4 films (4 per class) plus broken, truncated and tiny files."""
    root = tmp_path_factory.mktemp("inputs")
    by_label = {}
    for row in cxr4_rows:
        by_label.setdefault(row["label"], []).append(row)
    for label, rows in sorted(by_label.items()):
        for row in rows[:: max(1, len(rows) // 4)][:4]:
            dest = root / label / Path(row["image"]).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(row["image"], dest)
    for name, content in BROKEN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    real = next(root.glob("covid/*.jpg")).read_bytes()
    (root / "broken/truncated.jpg").write_bytes(real[: len(real) // 3])
    import cv2

    cv2.imwrite(str(root / "broken/tiny.png"), np.zeros((20, 20), np.uint8))
    return root


@pytest.fixture(scope="module")
def finished_run(input_folder, segmenter, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    counts = run_batch(input_folder, out, segmenter, batch_size=4, workers=2, progress=False, h5_path=out / "pack.h5")
    return out, counts


def test_counts_and_specific_errors(finished_run):
    out, counts = finished_run
    assert counts["total"] == 21 and counts["error"] == 5 and counts["skipped"] == 0
    assert counts["ok"] + counts["rejected"] == 16 and counts["ok"] >= 15
    records = read_summary(out)
    assert "empty" in records["broken/empty.png"]["rejection"]
    assert "truncated" in records["broken/truncated.jpg"]["rejection"]
    assert "smaller than" in records["broken/tiny.png"]["rejection"]
    assert "not a recognised image format" in records["broken/notes.png"]["rejection"]
    assert (out / "summary.csv").read_text().count("\n") == 22


def test_npz_contents(finished_run, segmenter):
    out, _ = finished_run
    files = sorted(out.rglob("*.npz"))
    assert len(files) == read_summary(out).__len__() - 5 - sum(
        r["status"] == "rejected" for r in read_summary(out).values())
    z = read_masked_npz(files[0])
    assert z["masked_image"].shape == (1024, 1024) and z["masked_image"].dtype == np.uint8
    assert z["mask"].dtype == bool and 0.05 < z["mask"].mean() < 0.6
    assert not z["masked_image"][~z["mask"]].any()  # zero outside the lung
    assert z["masked_image"][z["mask"]].mean() > 10  # real film inside
    y0, x0, y1, x1 = z["content_box"]
    h, w = z["orig_shape"]
    assert max(y1 - y0, x1 - x0) == 1024 and abs((y1 - y0) / (x1 - x0) - h / w) < 0.01
    assert z["segmenter"] == segmenter.id and z["preprocess"]["gamma"] == 0.5
    assert not list(out.rglob("*.tmp"))


def test_resume_skips_finished_inputs(finished_run, input_folder, segmenter):
    out, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    stale = out / "covid" / ".film.jpg.npz.k3j2.tmp"  # what a SIGKILL during a write leaves
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"partial")
    counts = run_batch(input_folder, out, segmenter, progress=False)
    assert counts["skipped"] == 21 and counts["ok"] == 0
    assert not stale.exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == before


def test_torn_summary_line_is_redone_and_recorded(input_folder, segmenter, tmp_path):
    out = tmp_path / "out"
    run_batch(input_folder, out, segmenter, progress=False, limit=3)
    path = out / "summary.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed in the middle of a line
    run_batch(input_folder, out, segmenter, progress=False, limit=3)
    assert len(read_summary(out)) == 3  # the redone input's record starts on its own line


def test_interrupted_write_leaves_no_partial_file(input_folder, segmenter, tmp_path, monkeypatch):
    from patchflannel import store

    real = store.savez_compressed
    calls = {"n": 0}

    def flaky(f, level, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError("disk full")
        real(f, level, **arrays)

    monkeypatch.setattr(store, "savez_compressed", flaky)
    counts = run_batch(input_folder / "covid", tmp_path, segmenter, progress=False)
    assert counts["error"] == 1 and counts["ok"] + counts["rejected"] == 3
    assert len(list(tmp_path.rglob("*.npz"))) == counts["ok"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    failed = [r for r in read_summary(tmp_path).values() if r["status"] == "error"]
    assert "disk full" in failed[0]["rejection"]
    monkeypatch.setattr(store, "savez_compressed", real)
    counts = run_batch(input_folder / "covid", tmp_path, segmenter, progress=False, retry_failed=True)
    assert counts["ok"] == 1 and len(list(tmp_path.rglob("*.npz"))) == 4


def test_h5_pack_reads_in_dataloader_workers(finished_run):
    out, counts = finished_run
    ds = H5MaskedDataset(out / "pack.h5")
    assert len(ds) == counts["ok"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    seen = 0
    for batch in loader:
        for i, name in enumerate(batch["input"]):
            z = read_masked_npz(out / f"{name}.npz")
            np.testing.assert_array_equal(batch["masked_image"][i].numpy(), z["masked_image"])
            np.testing.assert_array_equal(batch["mask"][i].numpy(), z["mask"])
            seen += 1
    assert seen == counts["ok"]


def test_cli_exit_codes(input_folder, tmp_path, capsys):
    weights = str(Path(__file__).resolve().parents[1] / "weights" / "segmenter-fcdensenet-lite")
    assert segment_main([str(input_folder / "broken"), "--out", str(tmp_path / "a"), "--weights", weights,
                         "--no-progress"]) == 1  # nothing could be processed
    assert segment_main([str(input_folder / "normal"), "--out", str(tmp_path / "b"), "--weights", weights,
                         "--no-progress", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] >= 3
    assert segment_main([str(tmp_path / "missing"), "--out", str(tmp_path / "c"), "--weights", weights]) == 2


@pytest.mark.slow
def test_sigkill_and_restart_gives_one_valid_output_per_input(input_folder, tmp_path):
    out = tmp_path / "out"
    weights = str(Path(__file__).resolve().parents[1] / "weights" / "segmenter-fcdensenet-lite")
    cmd = [sys.executable, "-m", "patchflannel.segment", str(input_folder), "--out", str(out),
           "--weights", weights, "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-run, once some outputs exist
        summary = out / "summary.jsonl"
        if summary.exists() and summary.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_summary(out))
    assert 0 < done_before < 21, "the job should have been killed part-way"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    records = read_summary(out)
    assert len(records) == 21
    ok = [r for r in records.values() if r["status"] == "ok"]
    assert sorted(out.rglob("*.npz")) == sorted(out / r["output"] for r in ok)
    for r in ok:
        read_masked_npz(out / r["output"])  # every file is complete and loads
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_fast_savez_is_a_standard_deflated_npz(tmp_path):
    import zipfile

    import numpy as np

    from patchflannel.store import savez_compressed

    image = np.zeros((256, 256), np.uint8)
    image[60:200, 40:120] = np.arange(140 * 80, dtype=np.uint32).reshape(140, 80) % 251
    with open(tmp_path / "a.npz", "wb") as f:
        savez_compressed(f, masked_image=image, mask=image > 0)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert zf.testzip() is None  # CRCs check out
        assert all(info.compress_type == zipfile.ZIP_DEFLATED and info.compress_size < info.file_size
                   for info in zf.infolist())
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["masked_image"], image)
        np.testing.assert_array_equal(z["mask"], image > 0)
