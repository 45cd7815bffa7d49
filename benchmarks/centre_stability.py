"""Patch-centre stability when the lung mask changes by a few pixels. Prints JSON.

    python benchmarks/centre_stability.py --data ../shared/data --n 100 --k 100 \
        --out benchmarks/results/centre_stability.json

The same ``n`` real films (cxr4 and adult, every class) are segmented twice by the shipped
segmenter, in float32 and in bf16 autocast: two precisions decide a few border pixels of the
lung mask differently, as two devices or two CPUs do. The whole pipeline (learners in float32
both times) then runs both ways on every film whose masks differ. Reported, film by film and in total: mask pixels that differ; the share of patch centres
that are identical (multiset overlap of the K centres) for the library's sampler (seeded by
the decoded input, a candidate stream accepted against the mask) and for the earlier one
(seeded by a hash of the masked film, drawn by index over the lung pixels), which the first
replaced; identical labels and the largest class-probability difference of the whole pipeline.
Goals: >= 95 % identical centres, >= 99 % identical labels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _report import emit  # benchmarks/ is first on sys.path when a script runs

from patchflannel import Pipeline
from patchflannel.manifest import read_manifest
from patchflannel.io import load_image
from patchflannel.patches import image_seed, sample_centres
from patchflannel.devices import CPU_BF16_ENV


def pick_films(data: Path, n: int) -> list[str]:
    """``n`` films spread evenly over cxr4's four classes and adult's two labels."""
    groups: dict[str, list[str]] = {}
    for part in ("cxr4", "adult"):
        for row in read_manifest(data / part / "manifest.csv"):
            groups.setdefault(f"{part}:{row['label']}", []).append(row["image"])
    per_group = -(-n // len(groups))
    films = [p for key in sorted(groups) for p in groups[key][:: max(1, len(groups[key]) // per_group)][:per_group]]
    return films[:n]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of the K centres of ``a`` that also are in ``b`` (as multisets)."""
    ca, cb = Counter(map(tuple, a.tolist())), Counter(map(tuple, b.tolist()))
    return sum((ca & cb).values()) / len(a)


def index_draw(mask: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The earlier sampler: a hash of the masked film seeds an index draw over the lung pixels."""
    coords = np.argwhere(mask)
    generator = torch.Generator().manual_seed(seed)
    return coords[torch.randint(len(coords), (k,), generator=generator).numpy()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/ and adult/")
    p.add_argument("--pipeline", type=Path, default=None, help="pipeline bundle (default: the shipped one)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--pipeline-n", type=int, default=None, help="at most this many films through the pipeline")
    p.add_argument("--pipeline-k", type=int, default=None, help="patches per film in the pipeline runs (default: --k)")
    p.add_argument("--same-checks", type=int, default=4,
                   help="films with identical masks also run through the pipeline both ways")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    films = pick_films(args.data, args.n)
    pipe = Pipeline.from_pretrained(args.pipeline, device="cpu", k=args.k, batch_size=4)
    pipe.engine.amp = False  # the learners in float32 both times: only the segmenter's precision changes
    os.environ[CPU_BF16_ENV] = "1"  # bf16 even where this CPU only emulates it
    segs, seconds = {}, {}
    for name, amp in (("float32", False), ("bf16", True)):
        pipe.segmenter.amp = amp
        start = time.perf_counter()
        segs[name] = [pipe.segmenter.segment(load_image(f), original_mask=False) for f in films]
        seconds[f"segment_{name}"] = time.perf_counter() - start
    # Films whose two masks are identical get identical centres and patches, so the pipeline
    # runs (both ways) on the films whose masks differ, plus a few identical ones as a check.
    differ = [int((a.working_mask != b.working_mask).sum()) if a.ok and b.ok else -1
              for a, b in zip(segs["float32"], segs["bf16"])]
    checked = ([i for i, d in enumerate(differ) if d > 0][:args.pipeline_n]
               + [i for i, d in enumerate(differ) if d == 0][:args.same_checks])
    pipe.engine.k = args.pipeline_k or args.k
    preds = {}
    for name, amp in (("float32", False), ("bf16", True)):
        pipe.segmenter.amp = amp
        start = time.perf_counter()
        preds[name] = dict(zip(checked, pipe.predict([films[i] for i in checked])))
        seconds[f"pipeline_{name}"] = time.perf_counter() - start
    per_film, library, earlier, same_label, prob_diff, mask_diff = [], [], [], [], [], []
    for i, path in enumerate(films):
        a, b = segs["float32"][i], segs["bf16"][i]
        if differ[i] < 0:
            per_film.append({"film": Path(path).name, "ok": [a.ok, b.ok]})
            continue
        seed = image_seed(load_image(path), pipe.engine.seed)  # what Pipeline seeds with
        draw = lambda m: sample_centres(m, args.k, generator=torch.Generator().manual_seed(seed)).numpy()  # noqa: E731
        library.append(overlap(draw(a.working_mask), draw(b.working_mask)))
        earlier.append(overlap(*[index_draw(s.working_mask, args.k, image_seed(torch.from_numpy(s.masked_working_image),
                                                                               pipe.engine.seed)) for s in (a, b)]))
        mask_diff.append(differ[i])
        film = {"film": Path(path).name, "mask_pixels_differ": differ[i], "centres_identical": library[-1],
                "earlier_centres_identical": earlier[-1]}
        if i in checked:
            pa, pb = preds["float32"][i], preds["bf16"][i]
            if pa.ok and pb.ok:
                if pipe.engine.k == args.k:
                    assert overlap(pa.centres, pb.centres) == library[-1]  # the pipeline drew these very centres
                same_label.append(pa.label == pb.label)
                prob_diff.append(max(abs(pa.probabilities[c] - pb.probabilities[c]) for c in pa.probabilities))
                film.update(same_label=same_label[-1], max_probability_difference=round(prob_diff[-1], 6))
        per_film.append(film)
    changed = [i for i, d in enumerate(mask_diff) if d]
    report = {
        "benchmark": "centre_stability", "films": len(films), "compared": len(library), "k": args.k, "pipeline_k": pipe.engine.k,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "films_whose_mask_differs": len(changed),
        "mask_pixels_differ_median_where_changed": statistics.median([mask_diff[i] for i in changed]) if changed else 0,
        "centres_identical": round(float(np.mean(library)), 4),
        "centres_identical_where_mask_differs": round(float(np.mean([library[i] for i in changed])), 4) if changed else None,
        "earlier_sampler_centres_identical": round(float(np.mean(earlier)), 4),
        "earlier_sampler_centres_identical_where_mask_differs":
            round(float(np.mean([earlier[i] for i in changed])), 4) if changed else None,
        "pipeline_compared": len(same_label),
        # films with identical masks have identical inputs to the learners: identical labels
        "labels_identical": round((sum(same_label) + (len(library) - len(same_label))) / len(library), 4),
        "labels_identical_where_compared": round(float(np.mean(same_label)), 4),
        "max_probability_difference": round(max(prob_diff), 6),
        "goals": {"centres_identical": 0.95, "labels_identical": 0.99},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "per_film": per_film,
    }
    report["goals_met"] = {"centres_identical": report["centres_identical"] >= 0.95,
                           "labels_identical": report["labels_identical"] >= 0.99}
    return emit(report, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
