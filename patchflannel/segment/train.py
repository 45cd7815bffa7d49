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
import sys
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..evaluation.metrics import jaccard_dice
from ..evaluation.splits import read_split, split_patients, write_split
from ..files import atomic_write
from ..io import load_image, load_mask
from ..losses import dice_bce_loss
from ..manifest import read_manifest
from ..options import add_config_arguments, config_from_args
from ..preprocess import SegmenterPreprocess, resize
from ..pretrained import load_pretrained
from ..training.augment import Augmentation
from ..training.distributed import setup
from ..training.loop import fit, seed_everything
from ..training.schedules import LRPolicy
from .bundle import load_bundle, save_bundle, sha256_file
from .model import build_segmentation_model
from .segmenter import Segmenter
from ..errors import run_command

__all__ = ["V7_SOURCES", "SegSamples", "SegTrainConfig", "load_encoder_weights", "load_samples",
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
    augment: str = "segmenter"  # an Augmentation set (patchflannel.training.augment), film and mask warped together
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


def load_encoder_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load pretrained encoder weights of an smp model from a local file (see
    `patchflannel.pretrained.load_pretrained`: by name or by position, grey first conv)."""
    load_pretrained(model.encoder, path)


def validation_jaccard(model, samples: SegSamples, preprocess: SegmenterPreprocess, device, amp, channels_last) -> float:
    """Mean per-image Jaccard at the network size (threshold 0.5, no post-processing), through
    the same batched inference as `Segmenter`."""
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

    training_record = dict(cfg.__dict__)
    if cfg.encoder_weights:  # a file name and hash, not a path on the training machine
        training_record["encoder_weights"] = {"file": Path(cfg.encoder_weights).name,
                                              "sha256": sha256_file(cfg.encoder_weights)}
    if cfg.init_from:
        start = json.loads((Path(cfg.init_from) / "config.json").read_text())
        training_record["init_from"] = {"bundle": Path(cfg.init_from).name, "weights_sha256": start["weights_sha256"],
                                        "training": start.get("training")}

    augmentation = Augmentation.parse(cfg.augment)

    def make_batch(idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = augmentation.apply(train_set.images[idx], generator, masks=train_set.masks[idx])
        return (x - preprocess.mean) / preprocess.std, y

    def save_best(model: torch.nn.Module, entry: dict) -> None:
        save_bundle(out_dir / "bundle", model, architecture=cfg.architecture, preprocess=preprocess,
                    extra={"training": {**training_record, "best_epoch": entry["epoch"],
                                        "val_jaccard": entry["val_jaccard"]}})

    result = fit(model, optimizer, scheduler, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                 images_per_step=cfg.batch_size, seed=cfg.seed,
                 draw_order=lambda g: torch.randperm(len(train_set.images), generator=g), make_batch=make_batch,
                 loss=dice_bce_loss, place=place, device=device, amp=cfg.amp, channels_last=cfg.channels_last,
                 validate=lambda m: {"val_jaccard": validation_jaccard(m, val_set, preprocess, device, cfg.amp,
                                                                       cfg.channels_last)},
                 score="val_jaccard", out_dir=out_dir, on_best=save_best, max_epochs_this_run=max_epochs_this_run,
                 progress=progress)
    history, best = result["history"], result["best"]
    return {"history": history, "best_val_jaccard": best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchflannel.segment.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="lungseg folder (holding manifest.csv)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, split, history, bundle/")
    p.add_argument("--architecture", default="fcdensenet_lite",
                   help="FC-DenseNet preset (fcdensenet_lite, fcdensenet56, 67, 103) or smp:<Arch>:<encoder>")
    add_config_arguments(p, SegTrainConfig, skip=("train_sources",), names={"split_file": "split"}, help={
        "size": "network input side", "encoder_weights": "local pretrained encoder weights file (smp models)",
        "init_from": "start from this bundle's weights (a further training cycle)",
        "split_file": "use this patient_id,split CSV (e.g. a bundle's split.csv) instead of drawing a split",
        "amp": "bf16/fp16 autocast where fast"})
    p.add_argument("--device", default="auto")
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
    cfg = config_from_args(SegTrainConfig, args, architecture=architecture)
    if args.all_sources:
        cfg.train_sources = V7_SOURCES + ("gbseg",)
    result = train(args.data, args.out, cfg, device=args.device, progress=not args.no_progress,
                   limit=args.limit, max_epochs_this_run=args.max_epochs_this_run)
    print(json.dumps({"best_val_jaccard": result["best_val_jaccard"], "epochs": len(result["history"])}))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
