"""The whole pipeline on the CPU and on a GPU, same films, same seed. Prints JSON.

    python benchmarks/pipeline_devices.py --data ../shared/data --n 32 --devices cpu cuda

For each device, :meth:`patchflannel.Pipeline.predict` runs over the same ``n`` cxr4 films
(decode, segment, K lung patches, the five learners, the weight module), once to warm up
and then ``--repeats`` times; reported: films/s (median), and against the first device,
the speed ratio, the share of films given the same label, the largest difference of a
class probability and whether every film drew the same patch centres. Centres are seeded by
the decoded input (:func:`patchflannel.patches.image_seed`) and drawn as a candidate stream
accepted against the mask, so a border pixel decided differently on another device moves only
the centres that landed on it (``benchmarks/centre_stability.py`` measures how many).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit  # benchmarks/ is first on sys.path when a script runs

from patchflannel import Pipeline
from patchflannel.manifest import read_manifest


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/")
    p.add_argument("--pipeline", type=Path, default=None, help="pipeline bundle (default: the shipped one)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    rows = read_manifest(args.data / "cxr4" / "manifest.csv")
    films = [r["image"] for r in rows[:: max(1, len(rows) // args.n)][: args.n]]
    runs = {}
    for device in args.devices:
        pipeline = Pipeline.from_pretrained(args.pipeline, device=device)
        predictions = pipeline.predict(films)  # warm-up, and the predictions compared below
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipeline.predict(films)
            seconds.append(time.perf_counter() - t0)
        runs[device] = {"predictions": predictions, "films_per_s": len(films) / statistics.median(seconds),
                        "seconds": [round(s, 3) for s in seconds], "k": pipeline.engine.k}

    base, first = args.devices[0], runs[args.devices[0]]["predictions"]
    report = {"benchmark": "pipeline_devices", "films": len(films), "k": runs[base]["k"], "torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "rejected": sum(p.label is None for p in first), "devices": {}}
    for device in args.devices:
        preds = runs[device]["predictions"]
        same_label = [a.label == b.label for a, b in zip(first, preds)]
        diffs = [max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities)
                 for a, b in zip(first, preds) if a.probabilities and b.probabilities]
        same_centres = all(np.array_equal(a.centres, b.centres) for a, b in zip(first, preds)
                           if a.centres is not None and b.centres is not None)
        report["devices"][device] = {
            "films_per_s": round(runs[device]["films_per_s"], 2),
            "speed_vs_" + base: round(runs[device]["films_per_s"] / runs[base]["films_per_s"], 2),
            "same_label_as_" + base: round(float(np.mean(same_label)), 3),
            "max_probability_difference": round(float(max(diffs, default=0.0)), 4),
            "median_probability_difference": round(float(np.median(diffs)) if diffs else 0.0, 4),
            "same_patch_centres": same_centres,
            "seconds": runs[device]["seconds"],
        }
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
