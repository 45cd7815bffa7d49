"""Throughput of the segment batch job end to end against the network alone. Prints JSON.

    python benchmarks/segment_throughput.py --data ../shared/data --n 96 --repeats 3

In one run, on the same ``n`` cxr4 images and the same batch size:
(a) ``end_to_end``: ``run_batch`` from files to written ``.npz`` files (decode, equalise,
    network, post-process, compress, atomic write) into an empty folder;
(b) ``model_only``: the segmenter's forward passes over the same images' network inputs,
    already preprocessed in memory.
Reports images/s (median over repeats, alternating a/b) and the ratio a/b (target >= 0.8).
Peak memory: the batch job's peak RSS in fresh processes over ``n`` and ``4 n`` images
(flat means it does not grow with the number of images).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import emit  # benchmarks/ is first on sys.path when a script runs

from patchflannel.manifest import read_manifest
from patchflannel.io import load_image
from patchflannel.segment import Segmenter
from patchflannel.segment.job import run_batch


def write_manifest(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image"])
        w.writeheader()
        w.writerows({"image": r["image"]} for r in rows)


def peak_rss_mib(manifest: Path, weights, batch_size: int, workers: int) -> float:
    """Run the batch job in a fresh process; return its peak resident memory in MiB."""
    code = (
        "import resource, sys, tempfile; from pathlib import Path;"
        "from patchflannel.segment import Segmenter; from patchflannel.segment.job import run_batch;"
        f"s = Segmenter.from_bundle({str(weights)!r} if {weights is not None} else None, device='cpu');"
        f"run_batch(Path({str(manifest)!r}), Path(tempfile.mkdtemp()), s, batch_size={batch_size},"
        f" workers={workers}, progress=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--device", default="cpu", help="cpu (the README's numbers), cuda, or auto")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    rows = read_manifest(args.data / "cxr4" / "manifest.csv")
    step = max(1, len(rows) // (4 * args.n))
    rows_4n = rows[::step][: 4 * args.n]
    rows_n = rows_4n[: args.n]
    segmenter = Segmenter.from_bundle(args.weights, device=args.device, batch_size=args.batch_size)
    inputs = [segmenter.network_input(load_image(r["image"])) for r in rows_n]
    segmenter.probabilities(inputs[: args.batch_size])  # warm-up

    tmp = Path(tempfile.mkdtemp())
    manifest_n, manifest_4n = tmp / "n.csv", tmp / "4n.csv"
    write_manifest(rows_n, manifest_n)
    write_manifest(rows_4n, manifest_4n)
    e2e, model = [], []
    for r in range(args.repeats):
        out = tmp / f"out{r}"
        t0 = time.perf_counter()
        counts = run_batch(manifest_n, out, segmenter, batch_size=args.batch_size, workers=args.workers, progress=False)
        e2e.append(args.n / (time.perf_counter() - t0))
        shutil.rmtree(out)
        t0 = time.perf_counter()
        segmenter.probabilities(inputs)
        model.append(args.n / (time.perf_counter() - t0))
    report = {
        "images": args.n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "input_size": segmenter.preprocess.size,
        "working_size": segmenter.working_size,
        "segmenter_id": segmenter.id,
        "last_run_counts": counts,
        "end_to_end_images_per_s": round(statistics.median(e2e), 2),
        "model_only_images_per_s": round(statistics.median(model), 2),
        "ratio_end_to_end_over_model": round(statistics.median(a / b for a, b in zip(e2e, model)), 3),
        "all_end_to_end": [round(x, 2) for x in e2e],
        "all_model_only": [round(x, 2) for x in model],
    }
    if not args.no_memory:
        small = peak_rss_mib(manifest_n, args.weights, args.batch_size, args.workers)
        large = peak_rss_mib(manifest_4n, args.weights, args.batch_size, args.workers)
        report["peak_rss_mib"] = {str(args.n): round(small, 1), str(4 * args.n): round(large, 1),
                                  "ratio": round(large / small, 3)}
    shutil.rmtree(tmp)
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
