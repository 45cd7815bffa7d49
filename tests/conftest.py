import csv
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PATCHFLANNEL_DATA") or REPO.parent / "shared" / "data")
SHIPPED_SEGMENTER = REPO / "weights" / "segmenter-fcdensenet-lite"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: set PATCHFLANNEL_DATA to the folder holding lungseg/, cxr4/, adult/")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA)


@pytest.fixture(scope="session")
def lungseg_dir(data_dir) -> Path:
    return _need(data_dir / "lungseg")


@pytest.fixture(scope="session")
def cxr4_dir(data_dir) -> Path:
    return _need(data_dir / "cxr4")


@pytest.fixture(scope="session")
def lungseg_rows(lungseg_dir):
    from patchflannel.manifest import read_manifest

    return read_manifest(lungseg_dir / "manifest.csv")


@pytest.fixture(scope="session")
def cxr4_rows(cxr4_dir):
    from patchflannel.manifest import read_manifest

    return read_manifest(cxr4_dir / "manifest.csv")


@pytest.fixture(scope="session")
def real_png(lungseg_rows) -> Path:
    return Path(lungseg_rows[0]["image"])


@pytest.fixture(scope="session")
def segmenter():
    from patchflannel.segment import Segmenter

    if not SHIPPED_SEGMENTER.is_dir():
        pytest.fail(f"shipped segmenter missing at {SHIPPED_SEGMENTER}")
    return Segmenter.from_bundle(SHIPPED_SEGMENTER, device="cpu")


PIPELINE_K = 4  # patches per film in the pipeline tests: enough to exercise every stage, cheap on CPU


@pytest.fixture(scope="session")
def pipeline():
    """The shipped segmenter and learners, combined by their mean, K = 4 (shared by the test files)."""
    from patchflannel import Pipeline

    return Pipeline.from_bundles(device="cpu", k=PIPELINE_K)


@pytest.fixture(scope="session")
def default_pipeline():
    """The shipped default pipeline (``lite``: segmenter, learners, FLANNEL module), K = 8."""
    from patchflannel import Pipeline

    return Pipeline.from_pretrained("lite", device="cpu", k=8)


WORKING = 384  # a small working grid keeps the Stage 2 tests fast; the library default is 1024


def make_packs(root, data_dir, segmenter, working_size: int, per_label: dict) -> list:
    """Small real Stage 1 packs: the first films of each label of cxr4 and adult.

    The films are copied to ``root/<part>/images`` beside a manifest with relative paths, as
    in the real data folders, so ``root/<part>`` is the image folder of pack ``root/<part>.h5``.
    """
    import shutil

    from patchflannel.manifest import read_manifest
    from patchflannel.segment import Segmenter
    from patchflannel.segment.job import run_batch

    resized = Segmenter(segmenter.model, segmenter.config, device="cpu", working_size=working_size)
    out = []
    for part, n in per_label.items():
        picked, seen = [], {}
        for row in read_manifest(data_dir / part / "manifest.csv"):
            if seen.get(row["label"], 0) < n:
                seen[row["label"]] = seen.get(row["label"], 0) + 1
                picked.append(row)
        (root / part / "images").mkdir(parents=True)
        manifest = root / part / "manifest.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "label", "patient_id", "source"])
            writer.writeheader()
            for row in picked:
                name = Path("images") / Path(row["image"]).name
                shutil.copyfile(row["image"], root / part / name)
                writer.writerow({**{k: row[k] for k in writer.fieldnames}, "image": name.as_posix()})
        counts = run_batch(manifest, root / f"{part}-masked", resized, h5_path=root / f"{part}.h5", progress=False)
        assert counts["error"] == 0
        out.append(root / f"{part}.h5")
    return out


@pytest.fixture(scope="session")
def packs(tmp_path_factory, data_dir, segmenter):
    """cxr4 films of each class plus adult normals and other_pneumonia, on a small working grid."""
    return make_packs(tmp_path_factory.mktemp("stage1"), data_dir, segmenter, WORKING, {"cxr4": 10, "adult": 5})


@pytest.fixture(scope="session")
def training_packs(tmp_path_factory, data_dir, segmenter):
    """Fewer films at the library's 1024 px working size, for 224 px training patches."""
    return make_packs(tmp_path_factory.mktemp("stage1_1024"), data_dir, segmenter, 1024, {"cxr4": 8, "adult": 3})
