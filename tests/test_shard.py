"""Sharded batch jobs: n shards into one folder, then a merge, equal one unsharded job."""
import json
import shutil

import numpy as np
import pytest

from patchflannel.jobs.shard import Shard, shard_of


def test_parse_and_ownership(monkeypatch):
    assert Shard.parse(None) is None and Shard.parse("2/3") == Shard(2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError):
            Shard.parse(bad)
    names = [f"img{i}.png" for i in range(200)]
    owners = [[n for n in names if Shard(i, 3).owns(n)] for i in range(3)]
    assert sorted(sum(owners, [])) == sorted(names) and all(len(o) > 40 for o in owners)  # a partition
    assert shard_of("a/b.png", 5) == shard_of("a/b.png", 5)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert Shard.parse("auto") == Shard(3, 4)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert Shard.parse("auto") == Shard(1, 2)


@pytest.fixture(scope="module")
def folder(cxr4_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_in")
    for label in ("covid", "normal", "viral"):
        for r in [r for r in cxr4_rows if r["label"] == label][:2]:
            shutil.copy(r["image"], root / f"{label}_{r['image'].split('/')[-1]}")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def test_two_segment_shards_equal_one_job(folder, segmenter, tmp_path):
    from patchflannel.segment.__main__ import main
    from patchflannel.segment.job import read_summary
    from patchflannel.segment.job import run_batch
    from patchflannel.store import read_masked_npz

    run_batch(folder, tmp_path / "one", segmenter, batch_size=4, progress=False, h5_path=tmp_path / "one.h5")
    for i in range(2):
        run_batch(folder, tmp_path / "two", segmenter, batch_size=4, progress=False, shard=Shard(i, 2))
    assert not (tmp_path / "two" / "summary.jsonl").exists()
    assert main([str(folder), "--out", str(tmp_path / "two"), "--merge", "--h5", str(tmp_path / "two.h5")]) == 0
    one, two = read_summary(tmp_path / "one"), read_summary(tmp_path / "two")
    assert list(one) == list(two)  # same inputs, same order
    for name in one:
        assert {k: v for k, v in one[name].items()} == two[name]
        if one[name]["status"] == "ok":
            a = read_masked_npz(tmp_path / "one" / one[name]["output"])
            b = read_masked_npz(tmp_path / "two" / two[name]["output"])
            assert np.array_equal(a["masked_image"], b["masked_image"]) and np.array_equal(a["mask"], b["mask"])
    assert (tmp_path / "one" / "summary.csv").read_text() == (tmp_path / "two" / "summary.csv").read_text()
    assert not list((tmp_path / "two").glob("summary.shard-*"))  # merged away
    import h5py

    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        assert np.array_equal(a["masked_image"][:], b["masked_image"][:])


def test_two_predict_shards_equal_one_job(folder, tmp_path):
    from patchflannel import Pipeline
    from patchflannel.predict import CSV, JSONL, main, run_predict

    pipeline = Pipeline.from_bundles(device="cpu", k=2)
    run_predict(folder, tmp_path / "one", pipeline, batch_size=3, progress=False)
    for i in range(2):
        run_predict(folder, tmp_path / "two", pipeline, batch_size=3, progress=False, shard=Shard(i, 2))
    assert main([str(folder), "--out", str(tmp_path / "two"), "--merge"]) == 0
    assert (tmp_path / "one" / CSV).read_text() == (tmp_path / "two" / CSV).read_text()
    one = [json.loads(x) for x in (tmp_path / "one" / JSONL).read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / JSONL).read_text().splitlines()]
    assert sorted(one, key=lambda r: r["input"]) == two
