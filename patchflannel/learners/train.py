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
seeded patches, through `PatchEngine`) selects the best model, which is exported
as a bundle (``bundle/``); training stops early after ``--patience`` epochs without
improvement. The full training state is checkpointed every epoch; re-running the same
command resumes exactly.

``--input whole_image`` trains the same backbone on the whole, unmasked film letterboxed
to ``--patch-size`` pixels (a baseline; ``--image-roots`` gives each pack's image folder),
with the same augmentation, optimiser and model selection. The other inputs of
`LEARNER_INPUTS` (unmasked patches, the whole masked film,
the lung box), ``--film-size`` (patch scale) and ``--equalize`` are ablations of what the
method's input does; a Pipeline runs only ``patches`` learners at the working size.

Patients are split train/val/test by ``patient_id`` only (stratified by source and
label; ``split.csv``), or ``--split`` reuses a split. Labels outside the four classes
(``other_pneumonia``) never enter training or model selection.
"""
from __future__ import annotations

import argparse
import sys
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..devices import autocast, resolve_device
from ..evaluation.metrics import classification_report
from ..evaluation.splits import write_split
from ..labels import CLASSES
from ..losses import FocalLoss
from ..options import add_config_arguments, config_from_args
from ..training.augment import Augmentation
from ..training.distributed import setup
from ..training.loop import fit, grad_scaler, optimization_step
from ..training.lr_finder import lr_range_test, write_lr_result
from ..training.schedules import OPTIMIZERS, SCHEDULES, LRPolicy, layer_groups, make_optimizer
from .bundle import config_record, save_trained_learner
from .data import (
    FILE_INPUTS,
    LEARNER_INPUTS,
    WHOLE_INPUTS,
    MaskedSet,
    draw_patches,
    load_learner_inputs,
    make_split,
    read_rows,
    style_balanced_weights,
)
from .engine import PatchEngine
from .registry import Normalization, create_learner
from ..errors import run_command

__all__ = ["BALANCES", "TASKS", "RECIPES", "ROTATION_CLASSES", "LearnerTrainConfig", "draw_inputs",
           "evaluate", "find_lr", "main", "predict_inputs",
           "predict_whole_images", "recipe_config", "rotate_quarters", "train",
           "training_batch"]

log = logging.getLogger(__name__)


#: What a learner can be trained for: the four classes, or label-free rotation pretraining.
TASKS = ("classify", "rotation")
#: How classes (and sources) are balanced in training: see ``LearnerTrainConfig.balance``.
BALANCES = ("sampler", "source", "loss", "focal", "none")


@dataclass
class LearnerTrainConfig:
    """Everything that defines a patch-learner training run (saved in the checkpoint and bundle)."""

    learner: str = "efficientnet_lite0"
    input: str = "patches"  # a key of LEARNER_INPUTS: "patches" (the method), "whole_image" (baseline), ablations
    film_size: int | None = None  # patch inputs: resize the working-size films to this first (patch scale)
    equalize: bool = False  # per-film histogram equalisation of the lung pixels
    task: str = "classify"  # "classify" (the four classes) or "rotation" (label-free pretraining)
    weights: str | None = None  # None, "imagenet" (installed package) or a local file
    freeze_fraction: float = 0.0  # first fraction of parameter tensors kept frozen (pretrained starts only)
    # > 0: the stem and this many stages of an EfficientNet stay frozen and their activations are
    # cached in patch banks (patchflannel.learners.cached): only the rest trains, at a fraction of the cost
    frozen_blocks: int = 0
    bank_patches: int = 16  # with frozen_blocks: augmented patches (whole films: copies) per film in the bank
    # What model selection, the plateau schedule and early stopping follow: "macro_f1" (validation
    # macro-F1) or, with frozen_blocks, "likelihood" (exp(-validation log loss): smoother)
    selection: str = "macro_f1"
    patch_size: int = 224
    epochs: int = 10
    batch_size: int = 32  # patches per step
    patches_per_image: int = 2
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd" (Nesterov)
    lr: float = 1e-3  # the head-side rate (the peak rate for onecycle/cyclic)
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD momentum, Adam beta1 (cycled 0.85-0.95 by onecycle/cyclic)
    schedule: str = "onecycle"  # see patchflannel.training.schedules.LRPolicy
    step_size: int = 7  # epochs between decays ("step")
    gamma: float = 0.1  # decay factor ("step", "plateau")
    plateau_patience: int = 2  # epochs without improvement before a "plateau" decay
    layer_decay: float = 1.0  # < 1: discriminative fine-tuning, each earlier quarter of layers x this
    seed: int = 0
    # "sampler" (weighted sampling by class), "source" (by class, then equally by source within
    # a class: style-balanced), "loss" (class weights), "focal" or "none"
    balance: str = "sampler"
    focal_gamma: float = 2.0  # with balance="focal": FocalLoss(alpha = inverse class frequency, gamma)
    patience: int = 4
    val_k: int = 16
    min_lung_pixels: int = 1000
    augment: str = "standard"  # an Augmentation set: "standard", "none", "strong", "+"-joined modifiers
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
    """The `RECIPES` configuration of ``learner`` (defaults for others), batch 32, validation
    K 8, with ``overrides`` applied last."""
    return LearnerTrainConfig(**{"learner": learner, "batch_size": 32, "val_k": 8,
                                 **RECIPES.get(learner, {}), **overrides})


def draw_inputs(data: MaskedSet, indices: torch.Tensor, cfg: LearnerTrainConfig, augmentation: Augmentation,
                generator: torch.Generator) -> torch.Tensor:
    """A training batch in [0, 1] augmented with ``augmentation`` (``cfg.augment``, parsed once per
    run): ``patches_per_image`` lung patches per image, or the whole images for
    ``cfg.input`` in `WHOLE_INPUTS`."""
    if cfg.input in WHOLE_INPUTS:
        return augmentation(data.images[indices][:, None].float() / 255.0, generator)
    x = draw_patches(data, indices, cfg.patches_per_image, cfg.patch_size, generator, cfg.min_lung_pixels)
    return augmentation(x, generator, keep_zero=True)  # intensity changes inside the lung only


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


def predict_inputs(model: torch.nn.Module, data: MaskedSet, cfg: LearnerTrainConfig, device, k: int,
                   chunk: int = 16) -> torch.Tensor:
    """Softmax ``(N, C)`` of a learner trained with ``cfg`` for ``data`` (from
    `load_learner_inputs` with ``cfg``'s input): the
    whole-image softmax, or the mean over ``k`` seeded lung patches per film."""
    if cfg.input in WHOLE_INPUTS:
        return predict_whole_images(model, data.images, cfg.normalization, device)
    engine = PatchEngine({cfg.learner: model}, k=k, patch_size=cfg.patch_size, normalization=cfg.normalization,
                         device=device, amp=True, channels_last=cfg.channels_last, seed=cfg.seed,
                         min_lung_pixels=cfg.min_lung_pixels)
    return torch.cat([engine.predict(data.images[start:start + chunk], data.masks[start:start + chunk]).probs[:, 0]
                      for start in range(0, len(data), chunk)])


def evaluate(model: torch.nn.Module, data: MaskedSet, cfg: LearnerTrainConfig, device, k: int) -> dict:
    """Image-level report (mean softmax over ``k`` seeded patches, or the whole-image softmax)
    on the images with a class label; for the rotation task, the report of the rotation
    predictions of ``k`` seeded patches per image, each turned by a seeded multiple of 90 degrees."""
    if cfg.task == "rotation":
        return _evaluate_rotation(model, data, cfg, device, k)
    return classification_report(data.labels, predict_inputs(model, data, cfg, device, k).argmax(-1).numpy())


@dataclass
class _Run:
    """What training and the learning-rate finder set up alike."""

    place: object
    device: torch.device
    progress: bool
    train_set: MaskedSet
    val_set: MaskedSet
    model: torch.nn.Module
    trainable: list
    images_per_step: int
    augmentation: Augmentation
    loss_fn: torch.nn.Module
    sample_weight: torch.Tensor | None  # None: a random permutation per epoch


def _prepare(packs, out_dir: Path, cfg: LearnerTrainConfig, *, device, progress: bool, limit: int | None,
             image_roots) -> _Run:
    """Split, read the films, build the (partly frozen) model and the loss."""
    if cfg.input not in LEARNER_INPUTS:
        raise ValueError(f"input must be one of {list(LEARNER_INPUTS)}, not {cfg.input!r}")
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {cfg.task!r}")
    if cfg.balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, not {cfg.balance!r}")
    if cfg.optimizer not in OPTIMIZERS or cfg.schedule not in SCHEDULES:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} and schedule one of {SCHEDULES}, "
                         f"not {cfg.optimizer!r} and {cfg.schedule!r}")
    if cfg.input in FILE_INPUTS and (image_roots is None or len(image_roots) != len(packs)):
        raise ValueError(f"input {cfg.input!r} decodes the original films: it needs one image folder per pack "
                         "(image_roots)")
    out_dir.mkdir(parents=True, exist_ok=True)
    place, device = setup(resolve_device(device))  # one process, or this rank of a torchrun job
    progress = progress and place.main
    rows = read_rows(packs)
    split = make_split(rows, cfg)
    if place.main:
        write_split({r["patient_id"]: split[r["patient_id"]] for r in rows}, out_dir / "split.csv")
    # The pretext task needs no label: it uses every film of the training patients.
    usable = [i for i, r in enumerate(rows) if cfg.task == "rotation" or r["label"] in CLASSES]
    train_idx = [i for i in usable if split[rows[i]["patient_id"]] == "train"]
    val_idx = [i for i in usable if split[rows[i]["patient_id"]] == "val"]
    if limit:
        rng = np.random.default_rng(cfg.seed)
        train_idx = sorted(rng.choice(train_idx, min(limit, len(train_idx)), replace=False).tolist())
        val_idx = sorted(rng.choice(val_idx, min(max(limit // 4, 8), len(val_idx)), replace=False).tolist())
    roots = {str(p): r for p, r in zip(packs, image_roots)} if image_roots is not None else None
    train_set, val_set = (load_learner_inputs([rows[i] for i in idx], cfg.input, cfg.patch_size, image_roots=roots,
                                              film_size=cfg.film_size, equalize=cfg.equalize, progress=progress)
                          for idx in (train_idx, val_idx))
    counts = np.bincount(train_set.labels[train_set.labels >= 0], minlength=len(CLASSES)).astype(float)
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
    per_image = 1 if cfg.input in WHOLE_INPUTS else cfg.patches_per_image
    augmentation = Augmentation.parse(cfg.augment)
    if cfg.input in WHOLE_INPUTS:  # whole films also shift a little
        augmentation = replace(augmentation, translate=max(augmentation.translate, 0.05))
    class_weight = torch.as_tensor(counts.sum() / np.maximum(counts, 1) / len(CLASSES), dtype=torch.float32)
    sample_weight = None
    if cfg.task == "rotation":  # four rotations drawn uniformly: nothing to balance
        loss_fn = torch.nn.CrossEntropyLoss()
    elif cfg.balance == "focal":
        loss_fn = FocalLoss(class_weight, gamma=cfg.focal_gamma).to(device)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(weight=class_weight.to(device) if cfg.balance == "loss" else None)
        if cfg.balance == "sampler":
            sample_weight = torch.as_tensor(1.0 / counts[train_set.labels], dtype=torch.float64)
        elif cfg.balance == "source":
            sample_weight = style_balanced_weights(train_set.labels, [r["source"] for r in train_set.rows])
    return _Run(place, device, progress, train_set, val_set, model, [p for p in params if p.requires_grad],
                max(1, cfg.batch_size // per_image), augmentation, loss_fn, sample_weight)


def training_batch(run: _Run, indices: torch.Tensor, cfg: LearnerTrainConfig,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (normalised) and targets of one global batch: the images' classes, or for the
    rotation task each patch turned by a random multiple of 90 degrees and that multiple."""
    x = draw_inputs(run.train_set, indices, cfg, run.augmentation, generator)
    if cfg.task == "rotation":
        y = torch.randint(0, 4, (len(x),), generator=generator)
        x = rotate_quarters(x, y)
    else:
        per_image = len(x) // len(indices)
        y = torch.as_tensor(run.train_set.labels[indices.numpy()]).repeat_interleave(per_image)
    return (x - cfg.normalization.mean) / cfg.normalization.std, y


#: The outputs of a ``task="rotation"`` model: the patch's quarter turn.
ROTATION_CLASSES = ("0", "90", "180", "270")


def rotate_quarters(x: torch.Tensor, quarters: torch.Tensor) -> torch.Tensor:
    """Each ``(1, H, W)`` sample of square ``x`` turned by ``quarters[i]`` x 90 degrees."""
    out = x.clone()
    for k in range(1, 4):
        chosen = quarters == k
        out[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
    return out


@torch.inference_mode()
def _evaluate_rotation(model: torch.nn.Module, data: MaskedSet, cfg: LearnerTrainConfig, device, k: int) -> dict:
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    truth, pred = [], []
    for start in range(0, len(data), 16):
        idx = torch.arange(start, min(start + 16, len(data)))
        x = draw_patches(data, idx, k, cfg.patch_size, generator, cfg.min_lung_pixels)
        y = torch.randint(0, 4, (len(x),), generator=generator)
        x = ((rotate_quarters(x, y) - cfg.normalization.mean) / cfg.normalization.std).to(device)
        with autocast(device, True):
            pred.append(model(x.contiguous(memory_format=torch.channels_last)).float().argmax(-1).cpu())
        truth.append(y)
    return classification_report(torch.cat(truth).numpy(), torch.cat(pred).numpy())


def train(packs: list[str | Path], out_dir: str | Path, cfg: LearnerTrainConfig, *, device="auto",
          progress: bool = True, limit: int | None = None, max_epochs_this_run: int | None = None,
          image_roots: list[str | Path] | None = None, on_epoch=None, bank_dir: str | Path | None = None,
          eval_k: int = 48) -> dict:
    """Train (or resume) one learner. Returns the history and the best validation macro-F1.

    With ``cfg.frozen_blocks`` > 0 the run trains on cached trunk activations
    (`patchflannel.learners.cached.train_cached`; banks under ``bank_dir``, default
    ``out_dir/banks``, with ``eval_k`` evaluation patches per film).

    ``image_roots`` (one folder per pack, for ``cfg.input`` in ``FILE_INPUTS``) is where each
    pack's relative ``input`` paths point. ``on_epoch(entry, checkpoint_path)``, if given, is
    called on rank 0 after each epoch's checkpoint is written (``entry``: that epoch's history
    record), e.g. to report to a hyper-parameter search. Resuming with a different ``lr``,
    ``momentum`` or ``weight_decay`` than the checkpoint's applies the new values from there on."""
    out_dir = Path(out_dir)
    if cfg.selection not in ("macro_f1", "likelihood"):
        raise ValueError(f"selection must be 'macro_f1' or 'likelihood', not {cfg.selection!r}")
    if cfg.selection != "macro_f1" and not cfg.frozen_blocks:
        raise ValueError("selection 'likelihood' is a cached-trunk option (frozen_blocks > 0)")
    if cfg.frozen_blocks:
        from .cached import train_cached

        if limit or on_epoch is not None:
            raise ValueError("a cached-trunk run (frozen_blocks > 0) takes neither limit nor on_epoch")
        return train_cached(packs, out_dir, cfg, bank_dir=bank_dir or out_dir / "banks", eval_k=eval_k,
                            image_roots=image_roots, device=device, progress=progress,
                            max_epochs_this_run=max_epochs_this_run)
    run = _prepare(packs, out_dir, cfg, device=device, progress=progress, limit=limit, image_roots=image_roots)
    place, device, progress, model, train_set, val_set = (run.place, run.device, run.progress, run.model,
                                                          run.train_set, run.val_set)
    optimizer = make_optimizer(layer_groups(run.trainable, cfg.lr, cfg.layer_decay), cfg.optimizer,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    steps_per_epoch = math.ceil(len(train_set) / run.images_per_step)
    scheduler = LRPolicy(optimizer, cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                         step_size=cfg.step_size, gamma=cfg.gamma, plateau_patience=cfg.plateau_patience)
    record = {**config_record(cfg), "packs": [Path(p).name for p in packs]}
    classes = ROTATION_CLASSES if cfg.task == "rotation" else CLASSES

    def draw_order(generator: torch.Generator) -> torch.Tensor:
        if run.sample_weight is not None:
            return torch.multinomial(run.sample_weight, len(train_set), replacement=True, generator=generator)
        return torch.randperm(len(train_set), generator=generator)

    def validate(model: torch.nn.Module) -> dict:
        report = evaluate(model, val_set, cfg, device, cfg.val_k)
        return {"val_macro_f1": report["macro_f1"], "val_accuracy": report["accuracy"],
                "val_f1": {c: v["f1"] for c, v in report["per_class"].items()}}

    def save_best(model: torch.nn.Module, entry: dict) -> None:
        save_trained_learner(out_dir, model, cfg, record, entry, cfg.film_size or int(train_set.images.shape[-1]),
                             classes)

    result = fit(model, optimizer, scheduler, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                 images_per_step=run.images_per_step, seed=cfg.seed, draw_order=draw_order,
                 make_batch=lambda idx, g: training_batch(run, idx, cfg, g),
                 loss=lambda logits, y: run.loss_fn(logits.float(), y), place=place, device=device, amp=cfg.amp,
                 channels_last=cfg.channels_last, validate=validate, score="val_macro_f1", patience=cfg.patience,
                 out_dir=out_dir, on_best=save_best, on_epoch=on_epoch,
                 on_resume=lambda state: _apply_changed_hyperparameters(json.loads(state.get("config", "{}")), cfg,
                                                                       optimizer, scheduler),
                 extra_state={"config": json.dumps(record)}, max_epochs_this_run=max_epochs_this_run,
                 progress=progress)
    history, best, best_epoch = result["history"], result["best"], result["best_epoch"]
    return {"history": history, "best_val_macro_f1": best, "best_epoch": best_epoch}


def find_lr(packs: list[str | Path], out_dir: str | Path, cfg: LearnerTrainConfig, *, device="auto",
            progress: bool = True, limit: int | None = None, image_roots: list[str | Path] | None = None,
            start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100) -> dict:
    """Learning-rate range test of ``cfg`` (same data, model, freezing, optimiser, layer-wise
    ratios, augmentation and loss as `train`): writes ``lr_find.json`` and
    ``lr_find.png`` to ``out_dir`` and returns the sweep with its suggestions (see
    `patchflannel.training.lr_finder`). Trains nothing that is kept."""
    out_dir = Path(out_dir)
    run = _prepare(packs, out_dir, cfg, device=device, progress=progress, limit=limit, image_roots=image_roots)
    optimizer = make_optimizer(layer_groups(run.trainable, start_lr, cfg.layer_decay), cfg.optimizer,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    scaler = grad_scaler(run.device, cfg.amp)
    bar = tqdm(total=steps, desc="LR range test", disable=not run.progress, leave=False)
    run.model.train()

    def step() -> float:
        if run.sample_weight is not None:
            idx = torch.multinomial(run.sample_weight, run.images_per_step, replacement=True, generator=generator)
        else:
            idx = torch.randint(0, len(run.train_set), (run.images_per_step,), generator=generator)
        x, y = training_batch(run, idx, cfg, generator)
        y = y.to(run.device)
        bar.update()
        return optimization_step(run.model, x, lambda logits: run.loss_fn(logits.float(), y), optimizer, None,
                                 device=run.device, amp=cfg.amp, channels_last=cfg.channels_last, scaler=scaler)

    result = lr_range_test(step, optimizer, start_lr=start_lr, end_lr=end_lr, steps=steps)
    bar.close()
    result["config"] = config_record(cfg)
    if run.place.main:
        write_lr_result(result, out_dir, title=f"{cfg.learner} ({cfg.optimizer}, layer decay {cfg.layer_decay})")
    log.info("LR range test: steepest %.2e, minimum %.2e, suggested %.2e-%.2e", result["steepest"],
             result["minimum"], *result["suggested_range"])
    return result


def _apply_changed_hyperparameters(saved: dict, cfg: LearnerTrainConfig, optimizer, scheduler: LRPolicy) -> None:
    """After restoring a checkpoint trained with ``saved`` settings: carry the schedule's
    progress over to ``cfg``'s rate, and set its momentum and weight decay."""
    if saved.get("lr", cfg.lr) != cfg.lr:
        log.info("learning rate %g -> %g from here on", saved["lr"], cfg.lr)
        scheduler.rescale(cfg.lr / saved["lr"])
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
        if scheduler.per_batch:  # onecycle and cyclic set the momentum themselves
            continue
        if "momentum" in group:
            group["momentum"] = cfg.momentum
        elif "betas" in group:
            group["betas"] = (cfg.momentum, group["betas"][1])


#: Help texts of the options generated from `LearnerTrainConfig`.
OPTION_HELP = {
    "input": "; ".join(f"{k}: {v}" for k, v in LEARNER_INPUTS.items()),
    "film_size": "patch inputs: resize the films to this many pixels first (patch scale: a patch covers "
                 "working size / film size times the field)",
    "equalize": "per-film histogram equalisation of the lung pixels",
    "learner": "backbone name (see patchflannel.learners.create_learner)",
    "weights": "'imagenet' (installed weights package) or a local weights file",
    "freeze_fraction": "keep this fraction of the (pretrained) parameter tensors, input side first, frozen",
    "batch_size": "patches per step",
    "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    "lr": "head-side (peak) learning rate",
    "momentum": "SGD momentum / Adam beta1",
    "schedule": f"one of {', '.join(SCHEDULES)}",
    "step_size": "epochs between decays (--schedule step)",
    "gamma": "decay factor (--schedule step/plateau)",
    "layer_decay": "discriminative fine-tuning: each earlier quarter of the layers trains at this times the "
                   "next one's rate (1 = one rate)",
    "balance": "class balancing: sampler (weighted sampling by class), source (by class then source: "
               "style-balanced), loss (class-weighted), focal or none",
    "augment": "augmentation set: standard, none or strong, '+'-joined with modifiers (rot5 rot15 zoom "
               "lighting warp elastic blur centrecrop randomcrop flip)",
    "val_k": "patches per validation image",
    "split_file": "patient_id,split CSV to reuse instead of drawing one",
    "amp": "bf16/fp16 autocast where fast (float32 is faster for depthwise convolutions on CPU)",
    "frozen_blocks": "EfficientNets: keep the stem and this many stages frozen and train the rest on their "
                     "cached activations (patch banks; 0 = train end to end)",
    "selection": "what model selection, the plateau schedule and early stopping follow: macro_f1 (validation "
                 "macro-F1) or, with --frozen-blocks, likelihood (exp(-validation log loss), smoother)",
    "bank_patches": "with --frozen-blocks: augmented patches (whole-film inputs: augmented copies) per film in "
                    "the training bank",
    "task": "rotation: label-free pretraining (predict each patch's quarter turn) on every film of the "
            "training patients; fine-tune from its bundle with --weights BUNDLE/model.safetensors",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m patchflannel.learners.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packs", nargs="+", required=True, help="Stage 1 HDF5 packs with label/patient_id/source columns")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, split, history, bundle/")
    p.add_argument("--image-roots", nargs="+", default=None,
                   help=f"with --input {' or '.join(FILE_INPUTS)}: the folder of each pack's manifest "
                        "(its relative image paths)")
    add_config_arguments(p, LearnerTrainConfig, names={"split_file": "split"}, help=OPTION_HELP, choices={
        "input": list(LEARNER_INPUTS), "task": TASKS, "balance": BALANCES, "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES})
    p.add_argument("--bank-dir", type=Path, default=None,
                   help="with --frozen-blocks: folder of the patch banks (default OUT/banks; share it between runs)")
    p.add_argument("--eval-k", type=int, default=48,
                   help="with --frozen-blocks: evaluation patches per film in the evaluation bank")
    p.add_argument("--device", default="auto")
    p.add_argument("--find-lr", action="store_true",
                   help="run a learning-rate range test instead of training: OUT/lr_find.json and lr_find.png")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke runs)")
    p.add_argument("--max-epochs-this-run", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = config_from_args(LearnerTrainConfig, args)
    if args.find_lr:
        found = find_lr(args.packs, args.out, cfg, device=args.device, progress=not args.no_progress,
                        limit=args.limit, image_roots=args.image_roots)
        print(json.dumps({k: found[k] for k in ("steepest", "minimum", "suggested_range")}))
        return 0
    result = train(args.packs, args.out, cfg, device=args.device, progress=not args.no_progress, limit=args.limit,
                   max_epochs_this_run=args.max_epochs_this_run, image_roots=args.image_roots,
                   bank_dir=args.bank_dir, eval_k=args.eval_k)
    print(json.dumps({"best_val_macro_f1": result["best_val_macro_f1"], "best_epoch": result["best_epoch"],
                      "epochs": len(result["history"])}))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
