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
    from patchflannel.data import read_manifest

    return read_manifest(lungseg_dir / "manifest.csv")


@pytest.fixture(scope="session")
def cxr4_rows(cxr4_dir):
    from patchflannel.data import read_manifest

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
