"""The shipped default pipeline's predictions, pinned: a refactor must not change them.

``tests/golden/default_pipeline.json`` was written by this file's ``write_golden`` (run
``python tests/test_behaviour.py``) before the layout changed; the test compares every field
of every prediction. Floats in a prediction are rounded to 6 decimals, so the comparison
allows one rounding unit: kernels of another CPU may land a value on the other side of it.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "default_pipeline.json"
K = 8
#: (manifest, label) -> films taken in manifest order: every class, children and adults.
FILMS = {("cxr4", "covid"): 2, ("cxr4", "normal"): 2, ("cxr4", "viral"): 1,
         ("cxr4", "bacterial"): 1, ("adult", "normal"): 1, ("adult", "other_pneumonia"): 1}


def pick_films(data_dir: Path) -> list[Path]:
    from patchflannel.manifest import read_manifest

    out = []
    for (name, label), n in FILMS.items():
        rows = [r for r in read_manifest(data_dir / name / "manifest.csv") if r["label"] == label]
        out += [Path(r["image"]) for r in rows[:n]]
    return out


def snapshot(data_dir: Path, pipe=None) -> list[dict]:
    """Every prediction's fields, with its mask as a hash (arrays are not JSON)."""
    from patchflannel import Pipeline

    pipe = pipe or Pipeline.from_pretrained(device="cpu", k=K)
    assert pipe.engine.k == K
    films = pick_films(data_dir)
    out = []
    for film, pred in zip(films, pipe.predict(films)):
        entry = pred.to_dict()
        entry["source"] = f"{film.parent.parent.name}/{film.parent.name}/{film.name}"
        entry["mask_sha256"] = hashlib.sha256(pred.packed_mask.tobytes()).hexdigest()
        entry["centres"] = pred.centres.tolist()
        out.append(entry)
    return out


def assert_same(got, want, where: str = "") -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert math.isclose(got, want, abs_tol=1.5e-6), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} items != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_default_pipeline_predicts_what_it_predicted_before(data_dir, default_pipeline):
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} missing: run python tests/test_behaviour.py on a known-good commit")
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(snapshot(data_dir, default_pipeline)))  # the same types as the file's
    assert [g["source"] for g in got] == [w["source"] for w in want]
    for g, w in zip(got, want):
        assert_same(g, w, w["source"])


def write_golden(data_dir: Path) -> None:
    GOLDEN.write_text(json.dumps(snapshot(data_dir), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import DATA

    write_golden(DATA)
