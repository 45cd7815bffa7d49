"""Wall time of the test suite, whole and the fast subset, on this machine. Prints JSON.

    python benchmarks/test_suite.py --out benchmarks/results/test_suite.json

Runs ``pytest`` (what ``make test`` runs) and ``pytest -m "not slow"`` one after the other,
with the data folder of ``PATCHFLANNEL_DATA`` (default ``../shared/data``); reports wall
seconds and the pass/fail counts of each. Time it on a quiet machine: nothing else running.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from _report import emit  # benchmarks/ is first on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]


def run(marker: str | None) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-m", marker] if marker else [])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail)}
    return {"command": "pytest" + (f' -m "{marker}"' if marker else ""), "seconds": round(seconds, 1),
            "returncode": proc.returncode, **counts}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    report = {"benchmark": "test_suite", "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "whole": run(None), "fast": run("not slow")}
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
