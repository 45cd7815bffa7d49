"""``make demo``'s job on a small sample: the layout the README shows, a readable report."""
import json

import pytest

from patchflannel.demo import main as demo_main


@pytest.mark.slow
def test_demo_writes_the_readme_layout(data_dir, tmp_path, capsys):
    demo_main(["--data", str(data_dir), "--out", str(tmp_path / "demo"), "--per-group", "1", "--k", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["classified"] >= summary["films"] - 1 >= 4
    masked = tmp_path / "demo" / "masked"
    npz = sorted(p.relative_to(masked).as_posix() for p in masked.rglob("*.npz"))
    assert npz and all(p.startswith("images/") for p in npz), npz  # not _external/
    assert (masked / "sample.h5").is_file() and (tmp_path / "demo" / "report.html").is_file()
    assert (tmp_path / "demo" / "predictions" / "predictions.csv").read_text().count("\n") == summary["films"] + 1
