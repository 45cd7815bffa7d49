"""Train a lung segmenter on ``lungseg/`` and write a weights bundle.

    python -m patchflannel.segment.train --data ../shared/data/lungseg --out runs/seg \
        --architecture fcdensenet_lite --size 160 --epochs 40

Patients are split train/val/test (seeded, stratified by ``source``) and the split is
written to ``split.csv``. By default the model learns the V7 lung convention (lung behind
the heart included): ``gbseg`` masks exclude the heart shadow, and mixing the two in
one target teaches the network neither; ``gbseg`` test images are still evaluated and
reported as a cross-convention check. Every epoch the full training state is
checkpointed (``checkpoint.pt``); re-running the same command resumes from it. The
model with the best validation Jaccard is exported as a bundle (``bundle/``) each time
it improves. The preprocessed training and validation films are cached in the run
folder (``samples-{train,val}-SIZE.npz``, 8-bit): with them and ``manifest.csv`` the run
folder trains on another machine (a GPU) without the original films
(``--max-epochs-this-run 0`` writes the split and caches and trains nothing).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evaluation.metrics import jaccard_dice
from ..losses import dice_bce_loss
from ..training.augment import intensity_jitter, random_affine
from ..evaluation.splits import read_split, split_patients, write_split
from ..manifest import read_manifest
from ..training.distributed import setup, unwrap, wrap
from ..io import load_image, load_mask
from ..preprocess import SegmenterPreprocess, resize
from ..pretrained import load_pretrained
from ..files import atomic_write
from ..devices import resolve_device
from ..training.loop import (
    grad_scaler,
    optimization_step,
    restore_training_state,
    save_training_state,
    seed_everything,
)
from ..training.schedules import LRPolicy
from .bundle import load_bundle, save_bundle, sha256_file
from .model import build_segmentation_model
from .segmenter import Segmenter

__all__ = ["V7_SOURCES", "SegSamples", "SegTrainConfig", "augment", "load_encoder_weights", "load_samples",
           "main", "train", "validation_jaccard"]

log = logging.getLogger(__name__)

V7_SOURCES = ("v7darwin", "v7darwin-kermany")


@dataclass
class SegTrainConfig:
    """Everything that defines a segmenter training run (saved in the checkpoint and bundle)."""

    architecture: dict = field(default_factory=lambda: {"type": "fcdensenet", "preset": "fcdensenet_lite"})
    size: int = 160
    epochs: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    train_sources: tuple[str, ...] = V7_SOURCES
    split_fractions: dict = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    max_rotation: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_translate: float = 0.06
    amp: bool = True
    channels_last: bool = True
    encoder_weights: str | None = None  # local file of pretrained encoder weights (smp models)
    init_from: str | None = None  # bundle folder whose weights start this run (a further training cycle)
    split_file: str | None = None  # an existing patient split (patient_id,split CSV) instead of drawing one


@dataclass
class SegSamples:
    """Preprocessed images and soft masks at the network size, kept in memory."""

    rows: list[dict]
    images: torch.Tensor  # (N, 1, S, S) float32 intensity in [0, 1] (before normalisation)
    masks: torch.Tensor  # (N, 1, S, S) float32 in [0, 1]


def load_samples(rows: list[dict], preprocess: SegmenterPreprocess, progress: bool = True,
                 cache: Path | None = None) -> SegSamples:
    """Decode, equalise at full resolution and resize each image/mask pair once.

    Images and masks are kept at 8 bits (1/255 steps, below the intensity jitter of
    training), so the set fits a small ``cache`` file (``.npz``): a resumed run, or the
    same run on another machine, reads it instead of the original films. The cache is
    used only when it holds exactly ``rows`` under this preprocessing.
    """
    # Films named by folder and file, not by absolute path, so the cache travels with the run folder.
    names = np.asarray(["/".join(Path(row["image"]).parts[-2:]) for row in rows])
    recipe = np.asarray(json.dumps(preprocess.to_dict(), sort_keys=True))
    stored = dict(np.load(cache)) if cache is not None and cache.is_file() else {}
    if stored.get("names", np.empty(0)).tolist() == names.tolist() and str(stored.get("preprocess")) == str(recipe):
        images, masks = stored["images"], stored["masks"]
    else:
        size = (preprocess.size, preprocess.size)
        images = np.zeros((len(rows), *size), np.uint8)
        masks = np.zeros((len(rows), *size), np.uint8)
        for i, row in enumerate(tqdm(rows, desc="loading", disable=not progress, leave=False)):
            images[i] = np.round(resize(preprocess.intensity(load_image(row["image"])), size) * 255)
            masks[i] = np.round(resize(load_mask(row["mask"]).astype(np.float32), size) * 255)
        if cache is not None:
            def write(tmp):
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, names=names, preprocess=recipe, images=images, masks=masks)
            atomic_write(cache, write)
    return SegSamples(rows, torch.from_numpy(images / np.float32(255))[:, None],
                      torch.from_numpy(masks / np.float32(255))[:, None])


def augment(images: torch.Tensor, masks: torch.Tensor, cfg: SegTrainConfig, generator: torch.Generator):
    """Random small rotation, zoom and shift (one affine warp of image and mask), and intensity jitter.

    No flips: lungs are not mirror-symmetric (heart on the left).
    """
    images, masks = random_affine([images, masks], generator, max_rotation=cfg.max_rotation,
                                  scale_range=cfg.scale_range, max_translate=cfg.max_translate)
    return intensity_jitter(images, generator), masks


def load_encoder_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load pretrained encoder weights of an smp model from a local file (see
    :func:`patchflannel.pretrained.load_pretrained`: by name or by position, grey first conv)."""
    load_pretrained(model.encoder, path)


def validation_jaccard(model, samples: SegSamples, preprocess: SegmenterPreprocess, device, amp, channels_last) -> float:
    """Mean per-image Jaccard at the network size (threshold 0.5, no post-processing), through
    the same batched inference as :class:`Segmenter`."""
    segmenter = Segmenter(model, {"preprocess": preprocess.to_dict()}, device=device, amp=amp,
                          channels_last=channels_last)
    pred = segmenter.probabilities(preprocess.normalize(samples.images[:, 0].numpy())) > segmenter.threshold
    truth = (samples.masks[:, 0] > 0.5).numpy()
    return float(np.mean([jaccard_dice(p, t)[0] for p, t in zip(pred, truth)]))


def train(data_dir: Path, out_dir: Path, cfg: SegTrainConfig, *, device=None, progress: bool = True,
          limit: int | None = None, max_epochs_this_run: int | None = None) -> dict:
    """Train (or resume) and export the best model; returns the run's history.

    ``limit`` keeps only the first ``limit`` training images (for smoke tests);
    ``max_epochs_this_run`` stops early after that many epochs (the schedule still spans
    ``cfg.epochs``), so a run can be spread over several invocations.
    """
    place, device = setup(resolve_device(device))  # one process, or this rank of a torchrun job
    progress = progress and place.main
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    rows = read_manifest(data_dir / "manifest.csv")
    split_path = out_dir / "split.csv"
    if split_path.exists():
        split = read_split(split_path)
    elif cfg.split_file:
        split = read_split(cfg.split_file)
    else:
        split = split_patients(rows, cfg.split_fractions, seed=cfg.seed)
    if place.main and not split_path.exists():
        write_split(split, split_path)
    train_rows = [r for r in rows if split[r["patient_id"]] == "train" and r["source"] in cfg.train_sources]
    val_rows = [r for r in rows if split[r["patient_id"]] == "val" and r["source"] in cfg.train_sources]
    if limit:
        train_rows, val_rows = train_rows[:limit], val_rows[: max(2, limit // 4)]
    preprocess = SegmenterPreprocess(size=cfg.size)
    log.info("train %d images, val %d images", len(train_rows), len(val_rows))
    train_set = load_samples(train_rows, preprocess, progress, cache=out_dir / f"samples-train-{cfg.size}.npz")
    val_set = load_samples(val_rows, preprocess, progress, cache=out_dir / f"samples-val-{cfg.size}.npz")

    model = build_segmentation_model(cfg.architecture)
    if cfg.encoder_weights:
        load_encoder_weights(model, cfg.encoder_weights)
    if cfg.init_from:
        start_model, start_config = load_bundle(cfg.init_from)
        if start_config["architecture"] != cfg.architecture:
            raise ValueError(f"{cfg.init_from} holds a {start_config['architecture']} model, not {cfg.architecture}")
        model.load_state_dict(start_model.state_dict())
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set.images) / cfg.batch_size)
    scheduler = LRPolicy(optimizer, "onecycle", epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.15)
    scaler = grad_scaler(device, cfg.amp)
    history, best, start_epoch, elapsed = [], -1.0, 0, 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    state = restore_training_state(ckpt_path, model, optimizer, scheduler)
    if state is not None:
        history, best, start_epoch = json.loads(state["history"]), state["best"], state["epoch"] + 1
        elapsed = history[-1]["elapsed_s"] if history else 0.0
        log.info("resumed after epoch %d (best val Jaccard %.4f)", state["epoch"], best)
    model = wrap(model, place, device)

    training_record = dict(cfg.__dict__)
    if cfg.encoder_weights:  # a file name and hash, not a path on the training machine
        training_record["encoder_weights"] = {"file": Path(cfg.encoder_weights).name,
                                              "sha256": sha256_file(cfg.encoder_weights)}
    if cfg.init_from:
        start = json.loads((Path(cfg.init_from) / "config.json").read_text())
        training_record["init_from"] = {"bundle": Path(cfg.init_from).name, "weights_sha256": start["weights_sha256"],
                                        "training": start.get("training")}
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        if max_epochs_this_run is not None and epochs_run >= max_epochs_this_run:
            break
        t0 = time.perf_counter()
        # Seeded per epoch, so a resumed run draws exactly what an uninterrupted run would.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
        order = torch.randperm(len(train_set.images), generator=generator)
        model.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = augment(train_set.images[idx], train_set.masks[idx], cfg, generator)  # global batch
            x, y = place.share(x), place.share(y).to(device)
            losses.append(optimization_step(model, (x - preprocess.mean) / preprocess.std,
                                            lambda logits: dice_bce_loss(logits, y), optimizer, scheduler,
                                            device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                                            scaler=scaler))
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        val_j = place.from_main(lambda: validation_jaccard(unwrap(model), val_set, preprocess, device, cfg.amp,
                                                           cfg.channels_last))
        elapsed += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_jaccard": val_j,
                        "lr": scheduler.get_last_lr()[0], "elapsed_s": round(elapsed, 1)})
        improved = val_j > best
        best = max(best, val_j)
        if place.main:  # rank 0 logs and writes; the others follow its validation score
            log.info("epoch %d: loss %.4f, val Jaccard %.4f, %.0f s", epoch + 1, np.mean(losses), val_j, elapsed)
            if improved:
                save_bundle(out_dir / "bundle", unwrap(model), architecture=cfg.architecture, preprocess=preprocess,
                            extra={"training": {**training_record, "best_epoch": epoch + 1, "val_jaccard": val_j}})
            save_training_state(ckpt_path, unwrap(model), optimizer, scheduler, epoch=epoch, best=best,
                                history=json.dumps(history))
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
        place.barrier()
        epochs_run += 1
    return {"history": history, "best_val_jaccard": best}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchflannel.segment.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="lungseg folder (holding manifest.csv)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, split, history, bundle/")
    p.add_argument("--architecture", default="fcdensenet_lite",
                   help="FC-DenseNet preset (fcdensenet_lite, fcdensenet56, 67, 103) or smp:<Arch>:<encoder>")
    p.add_argument("--size", type=int, default=SegTrainConfig.size)
    p.add_argument("--epochs", type=int, default=SegTrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=SegTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=SegTrainConfig.lr)
    p.add_argument("--seed", type=int, default=SegTrainConfig.seed)
    p.add_argument("--encoder-weights", default=None, help="local pretrained encoder weights file (smp models)")
    p.add_argument("--init-from", default=None, help="start from this bundle's weights (a further training cycle)")
    p.add_argument("--split", default=None, help="use this patient_id,split CSV (e.g. a bundle's split.csv) "
                   "instead of drawing a split from --seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--all-sources", action="store_true", help="also train on gbseg (heart-excluded masks)")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    p.add_argument("--max-epochs-this-run", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.architecture.startswith("smp:"):
        _, arch, encoder = args.architecture.split(":")
        architecture = {"type": "smp", "arch": arch, "encoder_name": encoder}
    else:
        architecture = {"type": "fcdensenet", "preset": args.architecture}
    cfg = SegTrainConfig(architecture=architecture, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, amp=not args.no_amp, encoder_weights=args.encoder_weights, init_from=args.init_from,
                         split_file=args.split)
    if args.all_sources:
        cfg.train_sources = V7_SOURCES + ("gbseg",)
    result = train(args.data, args.out, cfg, device=args.device, progress=not args.no_progress,
                   limit=args.limit, max_epochs_this_run=args.max_epochs_this_run)
    print(json.dumps({"best_val_jaccard": result["best_val_jaccard"], "epochs": len(result["history"])}))


if __name__ == "__main__":
    main()
