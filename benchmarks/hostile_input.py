"""Hostile input: every case of the hostile-input tests, counted by entry point. Prints JSON.

    python benchmarks/hostile_input.py --out benchmarks/results/hostile_input.json

The cases are built at run time from real films by the tests named below (corrupt, truncated,
special, multi-frame, huge-by-header and non-CXR files; invalid DICOM attributes; colliding
names; output folders inside the input; full disks; odd manifests; tampered and downloading
bundles; bad arrays). Each test case is one hostile case put to one entry point (the decoder,
the two batch jobs, the Python API, the bundle loaders); passing means it ended in the
specific error or recorded rejection the test asks for, within its deadline.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from _report import emit  # benchmarks/ is first on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
SUITES = {
    "decoder (load_image)": "tests/test_io_hostile.py",
    "decoder, both jobs and the API on a fuzz corpus": "tests/test_hostile.py",
    "batch jobs (names, folders, special files, full disk, manifests, exit codes)": "tests/test_jobs_hostile.py",
    "manifests and pack columns": "tests/test_manifest.py",
    "bundles (hashes, downloads, paths)": "tests/test_bundles.py",
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    report: dict = {"benchmark": "hostile_input", "suites": {}}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                        *SUITES.values()], cwd=REPO, stdout=subprocess.DEVNULL)
        cases = ET.parse(xml).getroot().iter("testcase")
        by_file: dict[str, dict] = {}
        for case in cases:
            module = case.get("classname", "").replace(".", "/") + ".py"
            outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                       else "skipped" if case.find("skipped") is not None else "passed")
            counts = by_file.setdefault(module, {"cases": 0, "passed": 0, "failed": 0, "skipped": 0})
            counts["cases"] += 1
            counts[outcome] += 1
    for title, path in SUITES.items():
        report["suites"][title] = {"file": path, **by_file.get(path, {"cases": 0, "passed": 0, "failed": 0,
                                                                      "skipped": 0})}
    report["cases"] = sum(s["cases"] for s in report["suites"].values())
    report["passed"] = sum(s["passed"] for s in report["suites"].values())
    report["failed"] = sum(s["failed"] for s in report["suites"].values())
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
