"""Can the segmenter's own features tell a film from an unseen source? Leave-one-source-out. Prints JSON.

    python benchmarks/familiarity.py --data ../shared/data --out benchmarks/results/familiarity.json

Each film of cxr4 and adult goes through the shipped segmenter once; the feature of a film
is the spatial mean and standard deviation of every down-path dense block's output and of
the bottleneck (what the segmenter computes anyway). For each source S (cohen, kermany,
nih): the other sources' patients are split 60/20/20 (grouped by patient, seeded); a
familiarity model (standardise, PCA, one Ledoit-Wolf Gaussian per training source, score =
the smallest Mahalanobis distance) is fitted on the first 60 %, its flag threshold set at
the 95th percentile of the next 20 %, and measured on the last 20 % (false flags, goal
<= 5 %) and on every film of S (flagged, goal >= 90 %), with the ROC-AUC of the score.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from _report import emit  # benchmarks/ is first on sys.path when a script runs


def film_features(data: Path, cache: Path) -> dict[str, np.ndarray]:
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    from patchflannel.io import load_image
    from patchflannel.manifest import read_manifest
    from patchflannel.segment import Segmenter

    seg = Segmenter.from_bundle(device="cpu")
    model = seg.torch_model
    taken: list[torch.Tensor] = []

    def keep(_m, _i, out):
        taken.append(torch.cat([out.mean((2, 3)), out.std((2, 3))], 1))

    hooks = [b.register_forward_hook(keep) for b in [*model.down_blocks, model.bottleneck]]
    rows = read_manifest(data / "cxr4" / "manifest.csv") + read_manifest(data / "adult" / "manifest.csv")
    feats, intensity = [], []
    with torch.inference_mode():
        for start in range(0, len(rows), 16):
            part = rows[start:start + 16]
            films = [load_image(r["image"]) for r in part]
            intensity += [film_statistics(f) for f in films]
            x = torch.from_numpy(np.stack([seg.network_input(f) for f in films]))[:, None]
            taken.clear()
            model(x.float())
            feats.append(torch.cat(taken, 1).numpy())
            print(f"{start + len(part)}/{len(rows)}", file=sys.stderr, end="\r")
    for h in hooks:
        h.remove()
    out = {"features": np.concatenate(feats).astype(np.float32), "intensity": np.asarray(intensity, np.float32), "source": np.asarray([r["source"] for r in rows]),
           "patient": np.asarray([r["patient_id"] for r in rows]), "label": np.asarray([r["label"] for r in rows])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def film_statistics(film: np.ndarray) -> np.ndarray:
    """Acquisition cues of the decoded film: its 32-bin grey-level histogram (cumulative), the
    aspect ratio and the share of pure black and white pixels."""
    hist = np.histogram(film, bins=32, range=(0, 1))[0] / film.size
    return np.r_[np.cumsum(hist), film.shape[0] / film.shape[1], (film <= 1 / 255).mean(), (film >= 254 / 255).mean()]


def fit(x: np.ndarray, sources: np.ndarray, dims: int):
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    mean, std = x.mean(0), x.std(0) + 1e-6
    pca = PCA(n_components=min(dims, x.shape[1]), random_state=0).fit((x - mean) / std)
    z = pca.transform((x - mean) / std)
    models = {s: LedoitWolf().fit(z[sources == s]) for s in np.unique(sources)}
    return lambda y: np.min([m.mahalanobis(pca.transform((y - mean) / std)) for m in models.values()], 0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=Path("runs/familiarity_features.npz"))
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    f = film_features(args.data, args.cache)
    sources, patients = f["source"], f["patient"]
    report = {"benchmark": "familiarity", "dims": args.dims, "feature_sets": {}}
    for name, x in (("segmenter", f["features"]), ("film statistics", f["intensity"]),
                    ("segmenter + film statistics", np.concatenate([f["features"], f["intensity"]], 1))):
        report["feature_sets"][name] = held_out(x, sources, patients, args)
    return emit(report, args.out)


def held_out(x, sources, patients, args) -> dict:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(args.seed)
    report = {"features": int(x.shape[1]), "held_out": {}}
    for held in sorted(set(sources)):
        inside = np.flatnonzero(sources != held)
        ids = np.unique(patients[inside])
        role = dict(zip(ids, rng.permutation(len(ids)) % 5))  # 0-2 fit, 3 calibrate, 4 test
        r = np.asarray([role[patients[i]] for i in inside])
        fit_i, cal_i, test_i = inside[r <= 2], inside[r == 3], inside[r == 4]
        score = fit(x[fit_i], sources[fit_i], args.dims)
        threshold = float(np.quantile(score(x[cal_i]), 0.95))
        unseen = score(x[sources == held])
        seen = score(x[test_i])
        report["held_out"][held] = {
            "films": int((sources == held).sum()), "flagged": round(float((unseen > threshold).mean()), 4),
            "false_flags": round(float((seen > threshold).mean()), 4),
            "roc_auc": round(float(roc_auc_score(np.r_[np.zeros(len(seen)), np.ones(len(unseen))],
                                                 np.r_[seen, unseen])), 4),
            "trained_on": sorted(set(sources[fit_i]))}
    return report


if __name__ == "__main__":
    main()
