from collections import Counter

import pytest

from patchflannel.evaluation.splits import assign_folds, check_no_patient_crosses_folds, read_folds, write_folds


@pytest.fixture(scope="module")
def rows(data_dir):
    from patchflannel.manifest import read_manifest

    adult_normals = [r for r in read_manifest(data_dir / "adult" / "manifest.csv") if r["label"] == "normal"]
    return read_manifest(data_dir / "cxr4" / "manifest.csv") + adult_normals


def test_folds_group_patients_and_balance_labels(rows, tmp_path):
    folds = assign_folds(rows, 5, seed=0)
    assert set(folds.values()) == set(range(5)) and set(folds) == {r["patient_id"] for r in rows}
    overall = Counter(r["label"] for r in rows)
    for fold in range(5):
        in_fold = [r for r in rows if folds[r["patient_id"]] == fold]
        counts = Counter(r["label"] for r in in_fold)
        assert 0.15 < len(in_fold) / len(rows) < 0.25
        for label, n in overall.items():  # each fold's class mix within 4 points of the whole
            assert abs(counts[label] / len(in_fold) - n / len(rows)) < 0.04
    assert assign_folds(rows, 5, seed=0) == folds and assign_folds(rows, 5, seed=1) != folds
    write_folds(rows, folds, tmp_path / "folds.csv")
    back = read_folds(tmp_path / "folds.csv")
    assert len(back) == len(rows) and all(b["fold"] == folds[b["patient_id"]] for b in back)


def test_a_patient_in_two_folds_is_caught():
    rows = [{"patient_id": "a", "fold": 0}, {"patient_id": "a", "fold": 1}, {"patient_id": "b", "fold": 1}]
    with pytest.raises(ValueError, match="1 patients .* more than one fold: \\['a'\\]"):
        check_no_patient_crosses_folds(rows)
