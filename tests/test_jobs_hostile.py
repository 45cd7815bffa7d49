"""Hostile inputs at the level of the batch jobs, built from real films: names that collide,
output folders inside the input, special files, full disks, odd manifests, exit codes."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from patchflannel.predict import JSONL, main as predict_main, overlay_name, run_predict
from patchflannel.segment.__main__ import main as segment_main
from patchflannel.jobs.shell import collect_inputs, unique_file_name
from patchflannel.segment.job import read_summary
from patchflannel.segment.job import run_batch

from .conftest import REPO

WEIGHTS = str(REPO / "weights" / "segmenter-fcdensenet-lite")


@pytest.fixture(scope="module")
def two_films(cxr4_rows):
    return [Path(r["image"]) for r in cxr4_rows if r["label"] == "normal"][:2]


def _finishes(target, timeout: float = 120):
    """Run ``target`` in a thread; a regression that hangs fails here instead of hanging the suite."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=target()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not finish within {timeout} s"
    return out["value"]


def test_output_names_are_unique_per_input():
    names = ["a b.jpg", "a_b.jpg", "a__b.jpg", "肺.jpg", "폐.jpg", "x/y.jpg", "x__y.jpg", "../../etc/passwd", ".hidden.png"]
    flat = [overlay_name(n) for n in names]
    assert len(set(flat)) == len(names)
    assert all("/" not in f and not f.startswith(".") and f.endswith(".png") for f in flat)
    assert unique_file_name("a b.jpg").startswith("a_b.jpg-")  # still readable
    assert unique_file_name("肺.jpg").startswith("肺.jpg-")


def test_colliding_names_get_their_own_outputs(two_films, segmenter, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(two_films[0], folder / "a b.jpg")
    shutil.copyfile(two_films[1], folder / "a_b.jpg")
    counts = run_batch(folder, tmp_path / "out", segmenter, progress=False)
    assert counts["ok"] == 2
    outputs = {r["output"] for r in read_summary(tmp_path / "out").values()}
    assert len(outputs) == 2


def test_output_folder_inside_the_input_is_never_listed(two_films, segmenter, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in two_films:
        shutil.copyfile(f, folder / f.name)
    out = folder / "out"
    run_batch(folder, out, segmenter, progress=False)
    (out / "stray.png").write_bytes(two_films[0].read_bytes())  # e.g. an overlay of a previous run
    again = run_batch(folder, out, segmenter, progress=False)
    assert again["total"] == 2 and again["skipped"] == 2
    assert {x.name for x in collect_inputs(folder, exclude=out)} == {f.name for f in two_films}


def test_special_files_are_recorded_never_opened_or_waited_on(two_films, segmenter, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(two_films[0], folder / "good.png")
    os.mkfifo(folder / "fifo.png")
    os.symlink("/dev/zero", folder / "zero.png")
    os.symlink("/dev/urandom", folder / "urandom.dcm")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    os.symlink(tmp_path, folder / "folder_link.png")
    (folder / "IM0001").write_bytes(two_films[1].read_bytes())  # no suffix: listed by content
    (folder / "notes.txt").write_text("not an input")
    counts = _finishes(lambda: run_batch(folder, tmp_path / "out", segmenter, progress=False))
    records = read_summary(tmp_path / "out")
    assert set(records) == {"good.png", "fifo.png", "zero.png", "urandom.dcm", "dangling.png", "loop.png",
                            "folder_link.png", "IM0001"}
    assert counts["ok"] == 2
    reasons = {k: r.get("rejection", "") for k, r in records.items() if r["status"] != "ok"}
    assert "FIFO" in reasons["fifo.png"] and "device" in reasons["zero.png"]
    assert "broken" in reasons["dangling.png"] and "symbolic link" in reasons["loop.png"]
    assert "director" in reasons["folder_link.png"]


def test_manifest_pointing_at_special_files_records_them(two_films, segmenter, tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "manifest.csv").write_text(
        f"image,label\n{two_films[0]},normal\n/dev/zero,x\n/dev/urandom,x\nfifo,x\n/proc/self/mem,x\n")
    counts = _finishes(lambda: run_batch(tmp_path / "manifest.csv", tmp_path / "out", segmenter, progress=False))
    assert counts == {"ok": 1, "rejected": 0, "error": 4, "skipped": 0, "total": 5}


def _limited(limit_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.slow
def test_pack_on_a_full_disk_stops_cleanly_and_the_rerun_finishes(two_films, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in two_films:
        shutil.copyfile(f, folder / f.name)
    cmd = [sys.executable, "-m", "patchflannel.segment", str(folder), "--out", str(tmp_path / "out"), "--weights",
           WEIGHTS, "--h5", str(tmp_path / "pack.h5"), "--no-progress", "--working-size", "512"]
    # The masked files (~20-90 KB) fit under the limit; the pack of both does not.
    proc = subprocess.run(cmd, preexec_fn=_limited(150_000), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pack.h5" in errors[0] and "File too large" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pack.h5").exists() and not list(tmp_path.glob(".pack.h5.*.tmp"))
    (tmp_path / ".pack.h5.killed.tmp").write_bytes(b"half a pack")  # what a killed write leaves
    assert segment_main(cmd[3:]) == 0  # the rerun, in this process: no limit
    assert (tmp_path / "pack.h5").is_file() and not list(tmp_path.glob(".pack.h5.*.tmp"))


def test_predict_removes_a_killed_runs_temporary_files_and_retries_failures(pipeline, two_films, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(two_films[0], folder / "a.png")
    (folder / "b.png").write_bytes(b"not yet an image")
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / ".a.png-1234.png.x1y2.tmp").write_bytes(b"partial")
    (out / ".predictions.csv.x1y2.tmp").write_text("partial")
    first = run_predict(folder, out, pipeline, progress=False)
    assert first["ok"] == 1 and first["rejected"] == 1
    assert not [p for p in out.rglob("*.tmp")]
    shutil.copyfile(two_films[1], folder / "b.png")  # the bad input is fixed
    assert run_predict(folder, out, pipeline, progress=False)["skipped"] == 2  # recorded: not redone
    again = run_predict(folder, out, pipeline, progress=False, retry_failed=True)
    assert again["ok"] == 1 and again["skipped"] == 1
    records = [json.loads(line) for line in (out / JSONL).read_text().splitlines()]
    assert [r["status"] for r in records if r["input"] == "b.png"] == ["rejected", "ok"]


def test_manifests_with_bom_crlf_and_a_column_called_input(two_films, segmenter, tmp_path):
    rows = "".join(f"{f},normal,{i}\r\n" for i, f in enumerate(two_films))
    (tmp_path / "m.csv").write_bytes("\ufeffimage,label,input\r\n".encode() + rows.encode())
    counts = run_batch(tmp_path / "m.csv", tmp_path / "out", segmenter, h5_path=tmp_path / "m.h5", progress=False)
    assert counts["ok"] == 2
    again = run_batch(tmp_path / "m.csv", tmp_path / "out", segmenter, progress=False)
    assert again["skipped"] == 2  # the manifest's "input" column never replaces the record's
    from patchflannel.store import H5MaskedDataset

    columns = H5MaskedDataset(tmp_path / "m.h5").columns
    assert columns["manifest_input"] == ["0", "1"] and len(set(columns["input"])) == 2


@pytest.mark.parametrize("text, problem", [
    ("image,label\n{a},normal,\n", "line 2"),  # a trailing comma: one field too many
    ("image,,label\n{a},x,normal\n", "empty"),
    ("image,la/bel\n{a},normal\n", None),  # fine: stored safely
])
def test_manifest_problems_are_one_line_errors_naming_file_and_line(two_films, tmp_path, capsys, text, problem):
    (tmp_path / "m.csv").write_text(text.format(a=two_films[0]))
    rc = segment_main([str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--weights", WEIGHTS,
                       "--h5", str(tmp_path / "m.h5"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    if problem is None:
        assert rc == 0 and (tmp_path / "m.h5").is_file()
    else:
        assert rc == 2 and "m.csv" in err and problem in err and "Traceback" not in err


def test_latin1_manifest_is_refused_naming_the_file(two_films, tmp_path, capsys):
    (tmp_path / "m.csv").write_bytes(f"image,label\n{two_films[0]},pneumonía\n".encode("latin-1"))
    assert predict_main([str(tmp_path / "m.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "m.csv" in err and "UTF-8" in err


def test_both_jobs_check_inputs_before_loading_models_and_share_exit_codes(tmp_path, monkeypatch, capsys):
    from patchflannel import Pipeline
    from patchflannel.segment import Segmenter

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(Segmenter, "from_bundle", classmethod(refuse))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for main in (predict_main, segment_main):
        assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o1")]) == 1  # nothing to do
        assert "no images found" in capsys.readouterr().err and not (tmp_path / "o1").exists()
        assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2  # usage
        assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "file")]) == 2  # --out is a file
        assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "file" / "sub")]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 3 and "Traceback" not in err


def test_predict_loses_no_input_of_a_batch_with_a_bad_dicom(pipeline, two_films, tmp_path):
    import cv2
    import numpy as np

    from .test_io import _dicom

    grey = cv2.imread(str(two_films[0]), cv2.IMREAD_GRAYSCALE)
    _dicom(tmp_path / "bad.dcm", grey.astype(np.uint16) * 16, slope=1.5)
    data = (tmp_path / "bad.dcm").read_bytes()
    assert data.count(b"1.5 ") == 1
    (tmp_path / "bad.dcm").write_bytes(data.replace(b"1.5 ", b"abcd"))  # RescaleSlope "abcd"
    preds = pipeline.predict([two_films[0], tmp_path / "bad.dcm", two_films[1]])
    assert [p.ok for p in preds] == [True, False, True]
    assert "bad.dcm" in preds[1].rejection and "RescaleSlope" in preds[1].rejection


def test_public_api_is_where_the_readme_says():
    import pydoc

    import patchflannel
    from patchflannel import Pipeline, write_predictions  # noqa: F401

    assert {"Pipeline", "Prediction", "write_predictions", "Segmenter"} <= set(dir(patchflannel))
    assert "Pipeline" in pydoc.render_doc(patchflannel, renderer=pydoc.plaintext)


def test_predict_record_keeps_json_lines_intact(pipeline, two_films, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(two_films[0], folder / "line\nbreak.png")
    run_predict(folder, tmp_path / "out", pipeline, progress=False)
    lines = (tmp_path / "out" / JSONL).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "ok"


def test_names_that_are_not_utf8_or_too_long_and_out_equal_to_input(two_films, segmenter, pipeline, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(two_films[0], os.path.join(os.fsencode(folder), b"latin\xe9.png"))  # not UTF-8
    shutil.copyfile(two_films[1], folder / "sub" / ("肺" * 80 + ".png"))  # 240 bytes: a long overlay name
    counts = run_batch(folder, folder, segmenter, h5_path=tmp_path / "p.h5", progress=False)  # --out = input
    assert counts["ok"] == 2 and "latin\\xe9.png" in (folder / "summary.csv").read_text()
    assert run_batch(folder, folder, segmenter, progress=False)["skipped"] == 2  # subfolders still listed
    out = folder / "pred"
    run_predict(folder, out, pipeline, explain=True, progress=False)
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert run_predict(folder, out, pipeline, explain=True, progress=False)["total"] == 2  # overlays not inputs


def test_one_file_named_twice_in_a_manifest_is_refused(two_films, tmp_path):
    from patchflannel.errors import PatchflannelError

    shutil.copyfile(two_films[0], tmp_path / "x.png")
    (tmp_path / "m.csv").write_text(f"image\nx.png\n{tmp_path / 'x.png'}\n")
    with pytest.raises(PatchflannelError, match="lines 2 and 3"):
        collect_inputs(tmp_path / "m.csv")


def test_every_format_the_decoder_reads_is_listed_from_a_folder(two_films, tmp_path):
    from PIL import Image

    from patchflannel.io import load_image
    from patchflannel.jobs.shell import list_folder

    film = Image.open(two_films[0]).convert("L")
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["a.png", "a.jpg", "a.tif", "a.bmp", "a.gif", "a.webp", "a.jp2", "a.pgm", "a.ppm"]
    for name in names:
        (film.convert("RGB") if name.endswith(".ppm") else film).save(folder / name)
    for name in ("a.jp2", "a.pgm", "a.webp"):  # and by content alone, without a suffix
        shutil.copyfile(folder / name, folder / name.replace(".", "_"))
    listed = [p.name for p in list_folder(folder)]
    assert sorted(listed) == sorted([*names, "a_jp2", "a_pgm", "a_webp"])
    for path in list_folder(folder):
        assert load_image(path).shape == (film.height, film.width)


@pytest.mark.slow
def test_predict_records_a_full_disk_under_explain_and_retries_it(pipeline, two_films, tmp_path, monkeypatch):
    import errno

    import patchflannel.predict as predict

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(two_films[0], folder / "a.png")
    out = tmp_path / "out"
    real = predict.write_overlay

    def disk_full(out_dir, record, pred):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "overlays" / "a.png"))

    monkeypatch.setattr(predict, "write_overlay", disk_full)
    first = run_predict(folder, out, pipeline, progress=False, explain=True)
    assert first["error"] == 1 and first["ok"] == 0
    (record,) = [json.loads(line) for line in (out / JSONL).read_text().splitlines()]
    assert record["status"] == "error" and "No space left on device" in record["rejection"]
    monkeypatch.setattr(predict, "write_overlay", real)
    again = run_predict(folder, out, pipeline, progress=False, explain=True, retry_failed=True)
    assert again["ok"] == 1
    assert [p.name for p in (out / "overlays").iterdir()] and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_decoded_pixels_in_flight_stay_within_the_budget(two_films, segmenter, tmp_path, monkeypatch):
    """The segment job decodes ahead only as far as its pixel budget allows: with a budget
    below one film, each film is decoded only once the one before it is written."""
    import patchflannel.segment.job as job

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        shutil.copyfile(two_films[i % 2], folder / f"{i}.png")
    events, lock = [], threading.Lock()
    real = job.load_image

    def decoding(path, *args, **kwargs):
        with lock:
            events.append("decode")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(job, "load_image", decoding)

    def done(*_):
        with lock:
            events.append("done")

    for budget, out in ((1, "tight"), (job.MAX_PIXELS_IN_FLIGHT, "default")):
        events.clear()
        counts = run_batch(folder, tmp_path / out, segmenter, batch_size=2, workers=2, progress=False,
                           max_pixels_in_flight=budget, on_segmented=done)
        assert counts["ok"] == 4
        held = max(sum(1 if e == "decode" else -1 for e in events[:i + 1]) for i in range(len(events)))
        if budget == 1:
            assert events == ["decode", "done"] * 4
        else:
            assert held > 1  # without a tight budget the job decodes ahead of the network
