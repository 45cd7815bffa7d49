"""Patch inference: the published per-patch procedure, a batch-1 loop, and our engine. Prints JSON.

    python benchmarks/patch_inference.py --data ../shared/data --n 4 --k 100

In one run, on the same ``n`` cxr4 films (segmented by the shipped segmenter, stored at the
1024 px working size), the same K lung-centred patches per film and the same L learners
(the ``lite`` preset; ``--learners DIR`` loads trained bundles, which does not change speed):

(a) ``reference``: the data path of the published patch-by-patch code, per patch and
    learner: reload the film's float32 image and mask arrays from disk (``.npy`` at the
    stored size, as that code keeps them), resize both to the 1024 px working size with PIL,
    multiply, list the non-zero pixels, cut the crop, and run a batch-1 forward pass in
    float32 with autograd on (no ``no_grad``/``inference_mode``). The same centres as the
    engine's are used, so only the cost differs. Timed on the first film only (it costs
    K x L x ~0.1-0.5 s); images/s = 1 / that film's time. Our films are stored at 512 px on
    the long side; the published code reloaded full-size originals, so this understates it.
(b) ``loop``: in memory, images already loaded; one crop and one batch-1 forward per patch
    and learner under ``inference_mode`` (float32, the usual "no_grad loop").
(c) ``engine``: :class:`patchflannel.learners.PatchEngine` (sampling, extraction once for
    all learners, batches of ``--batch-size`` patches, bf16 autocast, channels_last, voting).
(d) ``bare_forward``: the same learners' forward passes over the already extracted and
    normalised (n*K) patch tensor, same batch size and precision: the floor for (c).

Times are medians over ``--repeats`` (alternating b, c, d). Reports images/s, the speed-ups
c/a and c/b (targets >= 30 and >= 2.5) and the engine's overhead (c - d) / d (target <= 10 %).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit  # benchmarks/ is first on sys.path when a script runs
from PIL import Image

from patchflannel.manifest import read_manifest
from patchflannel.io import load_image
from patchflannel.learners import PRESETS, PatchEngine, create_learner
from patchflannel.learners.bundle import load_learner_set
from patchflannel.patches import extract_patches
from patchflannel.segment import Segmenter


def segment_films(data: Path, n: int):
    """``n`` cxr4 films: masked working-size images and masks (N, 1024, 1024), plus the first
    film's float image and mask at its stored size (for the reference procedure)."""
    rows = [r for r in read_manifest(data / "cxr4" / "manifest.csv")][:: 1396 // max(n, 1)][:n]
    segmenter = Segmenter.from_bundle(device="cpu")
    originals = [load_image(r["image"]) for r in rows]
    results = segmenter.segment_batch(originals)
    images = torch.stack([torch.from_numpy(np.where(s.working_mask, s.working_image, 0)) for s in results])
    masks = torch.stack([torch.from_numpy(s.working_mask) for s in results])
    return images, masks, originals[0], results[0].mask


def reference_procedure(image_path: Path, mask_path: Path, centres: torch.Tensor, models: list,
                        engine: PatchEngine, working_size: int) -> float:
    """Seconds for one film by the published data path (see the module docstring)."""
    start = time.perf_counter()
    for model in models:
        for centre in centres:
            image = Image.fromarray(np.load(image_path)).resize((working_size, working_size))
            mask = Image.fromarray(np.load(mask_path)).resize((working_size, working_size))
            masked = np.asarray(image) * np.round(np.asarray(mask))
            np.nonzero(masked)  # the published code draws its centre from this list, per patch
            patch = extract_patches(torch.from_numpy(masked)[None, None], centre[None, None], engine.patch_size)
            model(((patch - engine.normalization.mean) / engine.normalization.std).float()).softmax(-1)
    return time.perf_counter() - start


@torch.inference_mode()
def batch1_loop(images, centres, models, engine) -> torch.Tensor:
    out = []
    for model in models:
        for i in range(len(images)):
            for centre in centres[i]:
                patch = extract_patches(images[i][None, None], centre[None, None], engine.patch_size)
                out.append(model(engine.normalize(patch)).softmax(-1))
    return torch.cat(out)


def set_memory_format(models, memory_format) -> None:
    for model in models:
        model.to(memory_format=memory_format)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding cxr4/")
    p.add_argument("--learners", type=Path, default=None, help="folder of trained learner bundles (optional)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.learners:
        learners, _ = load_learner_set(args.learners)
    else:
        learners = {name: create_learner(name) for name in PRESETS["lite"]}
    engine = PatchEngine(learners, k=args.k, batch_size=args.batch_size, device="cpu")
    models = engine.models
    images, masks, first_image, first_mask = segment_films(args.data, args.n)
    centres, rejected = engine.sample(images, masks)
    assert not any(rejected), rejected

    # The floor for the engine: the same forward passes (normalisation, batching, precision) over
    # patches already extracted, without sampling, extraction or voting.
    patches = extract_patches(images[:, None], centres, engine.patch_size)

    engine.predict(images[:1], masks[:1])  # warm-up (allocator, oneDNN kernels)
    loop_s, engine_s, bare_s = [], [], []
    for _ in range(args.repeats):
        set_memory_format(models, torch.contiguous_format)  # the plain loop uses plain models
        loop_s.append(timed(batch1_loop, images, centres, models, engine))
        set_memory_format(models, torch.channels_last)
        engine_s.append(timed(engine.predict, images, masks))
        bare_s.append(timed(engine.forward_patches, patches))
    set_memory_format(models, torch.contiguous_format)

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "film.image.npy", first_image.astype(np.float32))
        np.save(Path(tmp) / "film.mask.npy", first_mask.astype(np.float32))
        reference_s = reference_procedure(Path(tmp) / "film.image.npy", Path(tmp) / "film.mask.npy", centres[0],
                                          models, engine, images.shape[-1])

    n, k, num_learners = len(images), args.k, len(models)
    loop, eng, bare = (statistics.median(x) for x in (loop_s, engine_s, bare_s))
    report = {
        "benchmark": "patch_inference",
        "images": n, "k": k, "learners": list(learners), "patch_size": engine.patch_size,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "images_per_s": {"reference": 1 / reference_s, "loop": n / loop, "engine": n / eng,
                         "bare_forward": n / bare},
        "ms_per_patch_and_learner": {"reference": 1000 * reference_s / (k * num_learners),
                                     "loop": 1000 * loop / (n * k * num_learners),
                                     "engine": 1000 * eng / (n * k * num_learners),
                                     "bare_forward": 1000 * bare / (n * k * num_learners)},
        "speedup_engine_vs_reference": reference_s / (eng / n),
        "speedup_engine_vs_loop": loop / eng,
        "engine_overhead_vs_bare_forward": (eng - bare) / bare,
        "targets": {"speedup_engine_vs_reference": ">= 30", "speedup_engine_vs_loop": ">= 2.5",
                    "engine_overhead_vs_bare_forward": "<= 0.10"},
        "seconds": {"reference_one_image": reference_s, "loop": loop_s, "engine": engine_s, "bare_forward": bare_s},
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
