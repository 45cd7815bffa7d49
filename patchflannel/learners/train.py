"""Train one patch learner on masked CXRs and write a learner bundle.

    python -m patchflannel.learners.train --packs runs/masked/cxr4.h5 runs/masked/adult.h5 \
        --learner efficientnet_lite0 --weights imagenet --out runs/learners/efficientnet_lite0

Each step draws images with class balancing (a weighted sampler by default), cuts
``--patches-per-image`` random lung-centred patches from each, augments them (small
rotation and zoom, intensity jitter inside the lung; no flips: lungs are not
mirror-symmetric) and takes an AdamW (Adam, SGD) step on a one-cycle schedule (``--schedule``:
cyclic, step decay, reduce-on-plateau or constant; ``--layer-decay`` for discriminative,
layer-wise rates). After every epoch
the image-level macro-F1 on the validation patients (mean softmax over ``--val-k``
seeded patches, through :class:`PatchEngine`) selects the best model, which is exported
as a bundle (``bundle/``); training stops early after ``--patience`` epochs without
improvement. The full training state is checkpointed every epoch; re-running the same
command resumes exactly.

``--input whole_image`` trains the same backbone on the whole, unmasked film letterboxed
to ``--patch-size`` pixels (a baseline; ``--image-roots`` gives each pack's image folder),
with the same augmentation, optimiser and model selection.

Patients are split train/val/test by ``patient_id`` only (stratified by source and
label; ``split.csv``), or ``--split`` reuses a split. Labels outside the four classes
(``other_pneumonia``) never enter training or model selection.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cv import read_split, split_patients, write_split
from ..distributed import setup, unwrap, wrap
from ..metrics import classification_report
from ..patches import extract_patches, sample_centres
from ..training import (
    OPTIMIZERS,
    SCHEDULES,
    LRPolicy,
    autocast,
    intensity_jitter,
    layer_groups,
    make_optimizer,
    optimization_step,
    random_affine,
    resolve_device,
    restore_training_state,
    save_training_state,
)
from .bundle import save_learner
from .data import MaskedSet, load_masked_set, load_whole_image_set, read_rows
from .engine import PatchEngine
from .registry import CLASSES, Normalization, create_learner

log = logging.getLogger(__name__)


@dataclass
class LearnerTrainConfig:
    """Everything that defines a patch-learner training run (saved in the checkpoint and bundle)."""

    learner: str = "efficientnet_lite0"
    input: str = "patches"  # "patches" (lung patches of masked films) or "whole_image" (baseline)
    weights: str | None = None  # None, "imagenet" (installed package) or a local file
    freeze_fraction: float = 0.0  # first fraction of parameter tensors kept frozen (pretrained starts only)
    patch_size: int = 224
    epochs: int = 10
    batch_size: int = 32  # patches per step
    patches_per_image: int = 2
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd" (Nesterov)
    lr: float = 1e-3  # the head-side rate (the peak rate for onecycle/cyclic)
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD momentum, Adam beta1 (cycled 0.85-0.95 by onecycle/cyclic)
    schedule: str = "onecycle"  # see patchflannel.training.LRPolicy
    step_size: int = 7  # epochs between decays ("step")
    gamma: float = 0.1  # decay factor ("step", "plateau")
    layer_decay: float = 1.0  # < 1: discriminative fine-tuning, each earlier quarter of layers x this
    seed: int = 0
    balance: str = "sampler"  # "sampler" (weighted sampling), "loss" (class weights) or "none"
    patience: int = 4
    val_k: int = 16
    min_lung_pixels: int = 1000
    max_rotation: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    amp: bool = True
    channels_last: bool = True
    split_fractions: dict = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    split_file: str | None = None
    normalization: Normalization = field(default_factory=Normalization)


# The settings each member of the ``lite`` preset is trained with (weights/learners-lite/MODEL_CARD.md):
# ImageNet-initialised EfficientNets fine-tune briefly with the input-side 30 % frozen, in float32
# (bf16 is slower for depthwise convolutions on CPU); the random-init members need many more steps.
_IMAGENET_RECIPE = {"weights": "imagenet", "freeze_fraction": 0.3, "amp": False, "lr": 1e-3, "epochs": 6,
                    "patches_per_image": 1}
RECIPES: dict[str, dict] = {
    "efficientnet_lite0": _IMAGENET_RECIPE, "efficientnet_lite1": _IMAGENET_RECIPE,
    "efficientnet_lite2": _IMAGENET_RECIPE,
    "resnet18": {"lr": 3e-3, "epochs": 14, "patches_per_image": 4, "patience": 6},
    "mobilenet_v3_small": {"amp": False, "lr": 3e-3, "epochs": 20, "patches_per_image": 4, "patience": 6},
}


def recipe_config(learner: str, **overrides) -> LearnerTrainConfig:
    """The :data:`RECIPES` configuration of ``learner`` (defaults for others), batch 32, validation
    K 8, with ``overrides`` applied last."""
    return LearnerTrainConfig(**{"learner": learner, "batch_size": 32, "val_k": 8,
                                 **RECIPES.get(learner, {}), **overrides})


def make_split(rows: list[dict], cfg: LearnerTrainConfig) -> dict[str, str]:
    """``{patient_id: split}``: ``cfg.split_file`` if given, else seeded, stratified by source and label."""
    if cfg.split_file:
        split = read_split(cfg.split_file)
        missing = {r["patient_id"] for r in rows} - set(split)
        if missing:
            raise ValueError(f"{cfg.split_file} lacks {len(missing)} patients, e.g. {sorted(missing)[:3]}")
        return split
    strata = [{"patient_id": r["patient_id"], "stratum": f"{r['source']}:{r['label']}"} for r in rows]
    return split_patients(strata, cfg.split_fractions, seed=cfg.seed, stratify_by="stratum")


def augment_patches(patches: torch.Tensor, cfg: LearnerTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation and zoom (one affine warp, zero fill) and gamma/contrast/brightness jitter
    applied inside the lung only (the zero background stays zero). ``patches`` in [0, 1]."""
    (patches,) = random_affine([patches], generator, max_rotation=cfg.max_rotation, scale_range=cfg.scale_range)
    return torch.where(patches > 0, intensity_jitter(patches, generator), torch.zeros_like(patches))


def draw_patches(data: MaskedSet, indices: torch.Tensor, k: int, size: int, generator: torch.Generator,
                 min_lung_pixels: int) -> torch.Tensor:
    """``k`` random lung patches of each image in ``indices``: ``(len * k, 1, size, size)`` float in [0, 1]."""
    centres = torch.stack([sample_centres(data.masks[i], k, generator=generator, min_pixels=min_lung_pixels)
                           for i in indices.tolist()])
    return extract_patches(data.images[indices][:, None], centres, size).float() / 255.0


def draw_inputs(data: MaskedSet, indices: torch.Tensor, cfg: LearnerTrainConfig,
                generator: torch.Generator) -> torch.Tensor:
    """An augmented training batch in [0, 1]: ``patches_per_image`` lung patches per image, or
    the whole images for ``cfg.input == "whole_image"``."""
    if cfg.input == "whole_image":
        (x,) = random_affine([data.images[indices][:, None].float() / 255.0], generator,
                             max_rotation=cfg.max_rotation, scale_range=cfg.scale_range, max_translate=0.05)
        return intensity_jitter(x, generator)
    x = draw_patches(data, indices, cfg.patches_per_image, cfg.patch_size, generator, cfg.min_lung_pixels)
    return augment_patches(x, cfg, generator)


@torch.inference_mode()
def predict_whole_images(model: torch.nn.Module, images: torch.Tensor, normalization: Normalization, device,
                         batch_size: int = 64) -> torch.Tensor:
    """Softmax ``(N, C)`` of a whole-image model for ``(N, S, S)`` uint8 letterboxed films."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size, None].float().to(device) / 255.0
        with autocast(device, True):
            logits = model(((x - normalization.mean) / normalization.std).contiguous(memory_format=torch.channels_last))
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


def evaluate(model: torch.nn.Module, data: MaskedSet, cfg: LearnerTrainConfig, device, k: int) -> dict:
    """Image-level report (mean softmax over ``k`` seeded patches, or the whole-image softmax)
    on the images with a class label."""
    if cfg.input == "whole_image":
        pred = predict_whole_images(model, data.images, cfg.normalization, device).argmax(-1).numpy()
        return classification_report(data.labels, pred)
    engine = PatchEngine({cfg.learner: model}, k=k, patch_size=cfg.patch_size, normalization=cfg.normalization,
                         device=device, amp=True, channels_last=cfg.channels_last, seed=cfg.seed,
                         min_lung_pixels=cfg.min_lung_pixels)
    probs = []
    for start in range(0, len(data), 16):
        out = engine.predict(data.images[start:start + 16], data.masks[start:start + 16])
        probs.append(out.probs[:, 0])
    pred = torch.cat(probs).argmax(-1).numpy()
    return classification_report(data.labels, pred)


def train(packs: list[str | Path], out_dir: str | Path, cfg: LearnerTrainConfig, *, device="auto",
          progress: bool = True, limit: int | None = None, max_epochs_this_run: int | None = None,
          image_roots: list[str | Path] | None = None, on_epoch=None) -> dict:
    """Train (or resume) one learner. Returns the history and the best validation macro-F1.

    ``image_roots`` (one folder per pack, for ``cfg.input == "whole_image"``) is where each
    pack's relative ``input`` paths point. ``on_epoch(entry, checkpoint_path)``, if given, is
    called on rank 0 after each epoch's checkpoint is written (``entry``: that epoch's history
    record), e.g. to report to a hyper-parameter search. Resuming with a different ``lr``,
    ``momentum`` or ``weight_decay`` than the checkpoint's applies the new values from there on."""
    if cfg.input not in ("patches", "whole_image"):
        raise ValueError(f"input must be 'patches' or 'whole_image', not {cfg.input!r}")
    if cfg.input == "whole_image" and (image_roots is None or len(image_roots) != len(packs)):
        raise ValueError("whole-image training needs one image folder per pack (image_roots)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    place, device = setup(resolve_device(device))  # one process, or this rank of a torchrun job
    progress = progress and place.main
    rows = read_rows(packs)
    split = make_split(rows, cfg)
    if place.main:
        write_split({r["patient_id"]: split[r["patient_id"]] for r in rows}, out_dir / "split.csv")
    labelled = [i for i, r in enumerate(rows) if r["label"] in CLASSES]
    train_idx = [i for i in labelled if split[rows[i]["patient_id"]] == "train"]
    val_idx = [i for i in labelled if split[rows[i]["patient_id"]] == "val"]
    if limit:
        rng = np.random.default_rng(cfg.seed)
        train_idx = sorted(rng.choice(train_idx, min(limit, len(train_idx)), replace=False).tolist())
        val_idx = sorted(rng.choice(val_idx, min(max(limit // 4, 8), len(val_idx)), replace=False).tolist())
    if cfg.input == "whole_image":
        roots = {str(p): r for p, r in zip(packs, image_roots)}
        train_set = load_whole_image_set([rows[i] for i in train_idx], roots, cfg.patch_size, progress=progress)
        val_set = load_whole_image_set([rows[i] for i in val_idx], roots, cfg.patch_size, progress=progress)
    else:
        train_set = load_masked_set([rows[i] for i in train_idx], progress=progress)
        val_set = load_masked_set([rows[i] for i in val_idx], progress=progress)
    counts = np.bincount(train_set.labels, minlength=len(CLASSES)).astype(float)
    log.info("train %d images %s, val %d images", len(train_set), counts.astype(int).tolist(), len(val_set))

    torch.manual_seed(cfg.seed)
    model = create_learner(cfg.learner, len(CLASSES), weights=cfg.weights)
    params = list(model.parameters())
    if cfg.weights and cfg.freeze_fraction > 0:
        for p in params[: int(len(params) * cfg.freeze_fraction)]:
            p.requires_grad_(False)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in params if p.requires_grad]
    optimizer = make_optimizer(layer_groups(trainable, cfg.lr, cfg.layer_decay), cfg.optimizer,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    per_image = 1 if cfg.input == "whole_image" else cfg.patches_per_image
    images_per_step = max(1, cfg.batch_size // per_image)
    steps_per_epoch = math.ceil(len(train_set) / images_per_step)
    scheduler = LRPolicy(optimizer, cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                         step_size=cfg.step_size, gamma=cfg.gamma)
    class_weight = torch.as_tensor(counts.sum() / np.maximum(counts, 1) / len(CLASSES), dtype=torch.float32)
    sample_weight = torch.as_tensor(1.0 / counts[train_set.labels], dtype=torch.float64)
    loss_weight = class_weight.to(device) if cfg.balance == "loss" else None

    history, best, best_epoch, start_epoch, elapsed = [], -1.0, 0, 0, 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    state = restore_training_state(ckpt_path, model, optimizer, scheduler)
    if state is not None:
        history, best, best_epoch = json.loads(state["history"]), state["best"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
        elapsed = history[-1]["elapsed_s"] if history else 0.0
        log.info("resumed after epoch %d (best val macro-F1 %.4f)", state["epoch"] + 1, best)
        _apply_changed_hyperparameters(json.loads(state.get("config", "{}")), cfg, optimizer, scheduler)
    model = wrap(model, place, device)
    record = {k: v for k, v in asdict(cfg).items() if k != "split_file"}
    record["packs"] = [Path(p).name for p in packs]

    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        if epoch - best_epoch >= cfg.patience and best_epoch > 0:
            log.info("early stop: no improvement since epoch %d", best_epoch)
            break
        if max_epochs_this_run is not None and epochs_run >= max_epochs_this_run:
            break
        t0 = time.perf_counter()
        # Seeded per epoch, so a resumed run draws exactly what an uninterrupted run would.
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
        if cfg.balance == "sampler":
            order = torch.multinomial(sample_weight, len(train_set), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(train_set), generator=generator)
        model.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = order[step * images_per_step:(step + 1) * images_per_step]
            x = draw_inputs(train_set, idx, cfg, generator)  # the global batch, on every rank alike
            y = torch.as_tensor(train_set.labels[idx.numpy()]).repeat_interleave(per_image)
            x, y = place.share(x), place.share(y).to(device)
            losses.append(optimization_step(model, (x - cfg.normalization.mean) / cfg.normalization.std,
                                            lambda logits: F.cross_entropy(logits.float(), y, weight=loss_weight),
                                            optimizer, scheduler, device=device, amp=cfg.amp,
                                            channels_last=cfg.channels_last))
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        report = place.from_main(lambda: evaluate(unwrap(model), val_set, cfg, device, cfg.val_k))
        elapsed += time.perf_counter() - t0
        scheduler.epoch_end(report["macro_f1"])
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_f1": report["macro_f1"],
                        "val_accuracy": report["accuracy"],
                        "val_f1": {c: v["f1"] for c, v in report["per_class"].items()},
                        "lr": scheduler.get_last_lr()[-1], "elapsed_s": round(elapsed, 1)})
        if report["macro_f1"] > best:
            best, best_epoch = report["macro_f1"], epoch + 1
        if place.main:  # rank 0 logs and writes; the others follow its validation score
            log.info("epoch %d: loss %.4f, val macro-F1 %.4f, %.0f s", epoch + 1, np.mean(losses), report["macro_f1"],
                     elapsed)
            if best_epoch == epoch + 1:
                save_learner(out_dir / "bundle", unwrap(model), name=cfg.learner, patch_size=cfg.patch_size,
                             normalization=cfg.normalization,
                             extra={"input": cfg.input,
                                    "training": {**record, "best_epoch": best_epoch, "val_macro_f1": best}})
            save_training_state(ckpt_path, unwrap(model), optimizer, scheduler, epoch=epoch, best=best,
                                best_epoch=best_epoch, history=json.dumps(history), config=json.dumps(record))
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            if on_epoch is not None:
                on_epoch(history[-1], ckpt_path)
        place.barrier()  # a resumed job finds the checkpoint every rank trained to
        epochs_run += 1
    return {"history": history, "best_val_macro_f1": best, "best_epoch": best_epoch}


def _apply_changed_hyperparameters(saved: dict, cfg: LearnerTrainConfig, optimizer, scheduler: LRPolicy) -> None:
    """After restoring a checkpoint trained with ``saved`` settings: carry the schedule's
    progress over to ``cfg``'s rate, and set its momentum and weight decay."""
    if saved.get("lr", cfg.lr) != cfg.lr:
        log.info("learning rate %g -> %g from here on", saved["lr"], cfg.lr)
        scheduler.rescale([cfg.lr / saved["lr"]] * len(optimizer.param_groups))
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group and scheduler.name not in ("onecycle", "cyclic"):  # those cycle it themselves
            group["momentum"] = cfg.momentum
        elif "betas" in group and scheduler.name not in ("onecycle", "cyclic"):
            group["betas"] = (cfg.momentum, group["betas"][1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m patchflannel.learners.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LearnerTrainConfig
    p.add_argument("--packs", nargs="+", required=True, help="Stage 1 HDF5 packs with label/patient_id/source columns")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, split, history, bundle/")
    p.add_argument("--input", choices=("patches", "whole_image"), default=d.input,
                   help="lung patches (the method) or whole unmasked films (a baseline)")
    p.add_argument("--image-roots", nargs="+", default=None,
                   help="with --input whole_image: the folder of each pack's manifest (its relative image paths)")
    p.add_argument("--learner", default=d.learner, help="backbone name (see patchflannel.learners.create_learner)")
    p.add_argument("--weights", default=None, help="'imagenet' (installed weights package) or a local weights file")
    p.add_argument("--freeze-fraction", type=float, default=d.freeze_fraction,
                   help="keep this fraction of the (pretrained) parameter tensors, input side first, frozen")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step")
    p.add_argument("--patches-per-image", type=int, default=d.patches_per_image)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr, help="head-side (peak) learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum / Adam beta1")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--step-size", type=int, default=d.step_size, help="epochs between decays (--schedule step)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="decay factor (--schedule step/plateau)")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay,
                   help="discriminative fine-tuning: each earlier quarter of the layers trains at this "
                        "times the next one's rate (1 = one rate)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--balance", choices=("sampler", "loss", "none"), default=d.balance)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--val-k", type=int, default=d.val_k, help="patches per validation image")
    p.add_argument("--split", default=None, help="patient_id,split CSV to reuse instead of drawing one")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="train in float32 (faster than bf16 for depthwise "
                   "convolutions on CPU)")
    p.add_argument("--no-channels-last", action="store_true", help="contiguous tensors instead of channels_last")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    p.add_argument("--max-epochs-this-run", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = LearnerTrainConfig(learner=args.learner, input=args.input, weights=args.weights, freeze_fraction=args.freeze_fraction,
                             epochs=args.epochs, batch_size=args.batch_size, patches_per_image=args.patches_per_image,
                             optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                             momentum=args.momentum, schedule=args.schedule, step_size=args.step_size,
                             gamma=args.gamma, layer_decay=args.layer_decay, seed=args.seed, balance=args.balance,
                             patience=args.patience,
                             val_k=args.val_k, amp=not args.no_amp, channels_last=not args.no_channels_last,
                             split_file=args.split)
    result = train(args.packs, args.out, cfg, device=args.device, progress=not args.no_progress, limit=args.limit,
                   max_epochs_this_run=args.max_epochs_this_run, image_roots=args.image_roots)
    print(json.dumps({"best_val_macro_f1": result["best_val_macro_f1"], "best_epoch": result["best_epoch"],
                      "epochs": len(result["history"])}))


if __name__ == "__main__":
    main()
