"""Peak memory of the work that used to grow with the input, each case in a fresh process. Prints JSON.

    python benchmarks/memory.py --data ../shared/data --out benchmarks/results/memory.json

Cases, each against its baseline in the same run (peak resident set size of the process,
``ru_maxrss``, minus that of the same process just before the measured call):

* ``explain``: ``Pipeline.predict(film, explain=True)`` at K = 100 with the Grad-CAM backward
  pass over 8 patches at a time (the default) and over 32 (the earlier setting). Goal <= 2 GB.
* ``huge_films``: the segment job over six all-zero 10000 x 9999 PNGs (100 MP each, ~100 KB
  on disk) with the default bound on decoded pixels in flight and with no bound (the earlier
  behaviour: twice the batch size decoded at once, whatever their size).
* ``prediction_list``: ``Pipeline.predict`` over ``--films`` films at K = 4, kept in a list:
  the bytes its predictions hold (bit-packed lung masks) against unpacked masks.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import emit  # benchmarks/ is first on sys.path when a script runs

CHILD = r"""
import json, resource, sys
import numpy as np
case, arg = sys.argv[1], json.loads(sys.argv[2])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from patchflannel import Pipeline
if case == "explain":
    pipe = Pipeline.from_pretrained(device="cpu", k=100, explain_batch_size=arg["batch"])
    pipe.predict(arg["film"])  # models loaded and warm
    before = peak()
    pred = pipe.predict(arg["film"], explain=True)
    out = {"label": pred.label}
elif case == "huge_films":
    from patchflannel.segment import Segmenter
    from patchflannel.segment.job import run_batch
    seg = Segmenter.from_bundle(device="cpu", working_size=1024)
    before = peak()
    counts = run_batch(arg["folder"], arg["out"], seg, batch_size=4, workers=2, progress=False,
                       max_pixels_in_flight=arg["budget"])
    out = {"counts": counts}
elif case == "prediction_list":
    pipe = Pipeline.from_pretrained(device="cpu", k=4)
    preds = pipe.predict(arg["films"])
    packed = sum(p.packed_mask.nbytes for p in preds if p.packed_mask is not None)
    unpacked = sum(p.mask.nbytes for p in preds if p.packed_mask is not None)
    before = peak()
    out = {"films": len(preds), "packed_mask_bytes": packed, "unpacked_mask_bytes": unpacked}
print(json.dumps({**out, "peak_bytes": peak(), "baseline_bytes": before, "added_bytes": peak() - before}))
"""


def run_case(case: str, arg: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, case, json.dumps(arg)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/")
    p.add_argument("--films", type=int, default=40, help="films kept in the prediction_list case")
    p.add_argument("--skip", nargs="*", default=[], help="cases to leave out (their results in --out are kept)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import cv2
    import numpy as np

    from patchflannel.manifest import read_manifest
    from patchflannel.jobs.shell import MAX_PIXELS_IN_FLIGHT

    rows = read_manifest(args.data / "cxr4" / "manifest.csv")
    report: dict = {"benchmark": "memory"}
    if args.skip and args.out and args.out.is_file():  # keep the skipped cases' earlier results
        report = {k: v for k, v in json.loads(args.out.read_text()).items() if k in args.skip or k == "benchmark"}
    if "explain" not in args.skip:
        film = rows[0]["image"]
        report["explain"] = {f"batch_{b}": run_case("explain", {"film": film, "batch": b}) for b in (8, 32)}
        report["explain"]["goal_added_bytes"] = 2e9
        report["explain"]["goal_met"] = report["explain"]["batch_8"]["added_bytes"] <= 2e9
    if "huge_films" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "in"
            folder.mkdir()
            zeros = np.zeros((9999, 10000), np.uint8)
            for i in range(6):
                cv2.imwrite(str(folder / f"zero{i}.png"), zeros)
            report["huge_films"] = {
                name: run_case("huge_films", {"folder": str(folder), "out": str(Path(tmp) / name), "budget": budget})
                for name, budget in (("bounded", MAX_PIXELS_IN_FLIGHT), ("unbounded", 10**15))}
            report["huge_films"]["bound_pixels"] = MAX_PIXELS_IN_FLIGHT
    if "prediction_list" not in args.skip:
        report["prediction_list"] = run_case("prediction_list", {"films": [r["image"] for r in rows[:args.films]]})
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
