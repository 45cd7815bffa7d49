"""Training with a frozen, cached trunk: the pretrained early blocks run once per patch, not once per step.

A learner's first blocks (an EfficientNet's stem and its first ``frozen_blocks`` stages) keep
their ImageNet weights. Their output for a fixed bank of patches is computed once and stored
on disk as float16 (`build_bank`), and training runs only the remaining blocks and the head
on those activations (`train_cached`). On this project's 2-core CPU the trunk is ~95 % of a
patch's forward pass, so a training step costs a few per cent of a full fine-tuning step.

Two banks per learner and scale, both independent of the fold (the trunk is not trained), so
one bank serves every fold of a cross-validation and every epoch:

* the **training bank**: ``bank_patches`` augmented lung patches (or augmented whole films for
  the whole-image inputs) of every labelled film, drawn as the full trainer draws them;
* the **evaluation bank**: the ``eval_k`` patches `PatchEngine` would cut from every film (the
  same centres, the same film rescaling), so validation, stacking and testing need no further
  trunk pass, and the first K of them are the patches at any smaller K.

The trunk runs through ONNX Runtime when it is installed (about twice eager PyTorch for the
EfficientNet-Lite trunks on a 2-core CPU, ``benchmarks/learner_train_speed.py``; ``pip install
patchflannel[fast]``), else through PyTorch; the export is checked against PyTorch first. The trained learner is an ordinary bundle (trunk and top in
one model): the Pipeline and the engine run it like any other.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..devices import autocast, resolve_device
from ..evaluation.metrics import classification_report
from ..evaluation.protocol import film_id
from ..evaluation.splits import write_split
from ..files import atomic_write
from ..labels import CLASSES
from ..patches import extract_patches, rescale_centres
from ..training.augment import Augmentation
from ..training.distributed import setup
from ..training.loop import fit
from ..runtime import onnx_model, resolve_backend
from ..training.schedules import LRPolicy, layer_groups, make_optimizer
from .bundle import config_record, load_learner, save_trained_learner
from .data import (WHOLE_INPUTS, draw_patches, load_learner_inputs, load_masked_set, make_split, read_rows,
                   style_balanced_weights)
from .engine import PatchEngine
from .registry import create_learner

__all__ = ["PatchBank", "TrunkRunner", "bank_name", "build_bank", "split_trunk", "top_probs", "train_cached",
           "write_learning_curve"]

log = logging.getLogger(__name__)


class _Top(nn.Module):
    """The trainable rest of an EfficientNet after its first ``frozen_blocks`` stages (shares the
    model's modules: training it trains the model)."""

    def __init__(self, model: nn.Module, frozen_blocks: int):
        super().__init__()
        self.blocks = model.blocks[frozen_blocks:]
        self.conv_head, self.bn2, self.global_pool, self.classifier = (model.conv_head, model.bn2,
                                                                       model.global_pool, model.classifier)
        self.drop_rate = float(getattr(model, "drop_rate", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.bn2(self.conv_head(self.blocks(x))))
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return self.classifier(x)


def split_trunk(model: nn.Module, frozen_blocks: int) -> tuple[nn.Module, nn.Module]:
    """``(trunk, top)`` of an EfficientNet-style timm model: the stem and the first
    ``frozen_blocks`` stages (frozen, eval mode), and the rest, so that
    ``top(trunk(x)) == model(x)``."""
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
    if not all(hasattr(model, a) for a in needed):
        raise ValueError(f"{type(model).__name__}: a cached trunk needs an EfficientNet-style model "
                         f"({', '.join(needed)}), e.g. efficientnet_lite0/1/2")
    if not 0 < frozen_blocks < len(model.blocks):
        raise ValueError(f"frozen_blocks must be between 1 and {len(model.blocks) - 1}, not {frozen_blocks}")
    trunk = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:frozen_blocks])
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval(), _Top(model, frozen_blocks)


class TrunkRunner:
    """The frozen trunk as a function of normalised ``(N, 1, P, P)`` float patches -> float16
    activations; through ONNX Runtime when installed (exported once into ``folder``, checked
    against PyTorch: `patchflannel.runtime.onnx_model`)."""

    def __init__(self, trunk: nn.Module, folder: Path, patch_size: int, device: torch.device,
                 onnx: bool | None = None):
        if onnx is None:
            onnx = resolve_backend("auto", device) == "onnxruntime"
        self.device = device
        self.run = (onnx_model(trunk, (1, 1, patch_size, patch_size), folder) if onnx
                    else trunk.to(device).to(memory_format=torch.channels_last))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, True):
            return self.run(x).float().cpu().numpy().astype(np.float16)


@dataclass
class PatchBank:
    """Trunk activations of ``per_film`` items (patches or whole films) of each film.

    Attributes:
        features: ``(films, per_film, C, h, w)`` float16 (a read-only memory map).
        usable: ``(films,)`` bool; False where the lung is too small to centre patches on
            (the engine rejects such films).
        films: film ids (`patchflannel.evaluation.protocol.film_id`), in row order.
        meta: what the bank was built from (checked when it is opened again).
    """

    features: np.ndarray
    usable: np.ndarray
    films: list[str]
    meta: dict

    def index(self) -> dict[str, int]:
        return {f: i for i, f in enumerate(self.films)}


def bank_name(cfg, kind: str) -> str:
    """The folder name of ``cfg``'s ``kind`` ("train"/"eval") bank under a bank root."""
    scale = f"-{cfg.film_size}px" if cfg.film_size and cfg.input not in WHOLE_INPUTS else ""
    eq = "-eq" if cfg.equalize else ""
    return f"{cfg.learner}-{cfg.input}{scale}{eq}-frozen{cfg.frozen_blocks}-{kind}"


def _film_ids(rows: list[dict]) -> list[str]:
    return [film_id(r) for r in rows]


def build_bank(folder: str | os.PathLike, rows: list[dict], cfg, trunk: nn.Module, *, kind: str, per_film: int,
               image_roots: dict | None = None, device="cpu", progress: bool = True, chunk: int = 16,
               onnx: bool | None = None) -> PatchBank:
    """Build (or open, or resume building) the ``kind`` bank of ``rows`` for the learner of
    ``cfg`` (a `patchflannel.learners.train.LearnerTrainConfig`) under ``folder``.

    ``kind="train"``: ``per_film`` random lung patches per film, augmented with ``cfg.augment``
    (whole films: ``per_film`` augmented copies), seeded by ``cfg.seed`` and the chunk.
    ``kind="eval"``: the first ``per_film`` patches `PatchEngine` draws for each film (seed
    ``cfg.seed``; whole films: the film itself, ``per_film`` = 1). Written chunk by chunk into
    ``features.partial.npy`` with a progress file, so a killed build resumes; renamed to
    ``features.npy`` when complete.
    """
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', not {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    whole = cfg.input in WHOLE_INPUTS
    if whole and kind == "eval":
        per_film = 1
    films = _film_ids(rows)
    meta = {"kind": kind, "learner": cfg.learner, "weights": str(cfg.weights), "frozen_blocks": cfg.frozen_blocks,
            "input": cfg.input, "film_size": cfg.film_size, "equalize": cfg.equalize, "patch_size": cfg.patch_size,
            "per_film": per_film, "seed": cfg.seed, "normalization": cfg.normalization.to_dict(),
            "min_lung_pixels": cfg.min_lung_pixels, "augment": cfg.augment if kind == "train" else None,
            "films_sha256": hashlib.sha256("\n".join(films).encode()).hexdigest()}
    final, partial, progress_file = folder / "features.npy", folder / "features.partial.npy", folder / "progress.json"
    if final.is_file():
        saved = json.loads((folder / "bank.json").read_text())
        if saved["meta"] != meta:
            changed = sorted(k for k in meta if saved["meta"].get(k) != meta[k])
            raise ValueError(f"{folder} holds a bank built with other settings ({', '.join(changed)}): "
                             "delete it, or point the run at another bank folder")
        return PatchBank(np.load(final, mmap_mode="r"), np.asarray(saved["usable"], bool), films, meta)

    device = resolve_device(device)
    runner = TrunkRunner(trunk, folder, cfg.patch_size, device, onnx=onnx)
    shape = runner(torch.zeros(1, 1, cfg.patch_size, cfg.patch_size)).shape[1:]
    state = json.loads(progress_file.read_text()) if progress_file.is_file() and partial.is_file() else None
    if state is not None and state["meta"] != meta:
        state = None
    if state is None:
        features = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16,
                                             shape=(len(rows), per_film, *shape))
        state = {"meta": meta, "done": 0, "usable": []}
    else:
        features = np.load(partial, mmap_mode="r+")
        log.info("%s: resuming after %d of %d films", folder.name, state["done"], len(rows))
    engine = PatchEngine({}, k=per_film, patch_size=cfg.patch_size, seed=cfg.seed, device="cpu",
                         min_lung_pixels=cfg.min_lung_pixels)
    augmentation = Augmentation.parse(cfg.augment)
    if whole:  # whole films also shift a little (as the full trainer does)
        augmentation = replace(augmentation, translate=max(augmentation.translate, 0.05))
    starts = range(state["done"], len(rows), chunk)
    for start in tqdm(starts, desc=f"bank {folder.name}", disable=not progress, leave=False):
        part = rows[start:start + chunk]
        x, usable = _bank_items(part, cfg, kind, per_film, engine, augmentation, image_roots,
                                torch.Generator().manual_seed(cfg.seed * 1_000_003 + start))
        out = np.zeros((len(part), per_film, *shape), np.float16)
        if usable.any():
            x = (x - cfg.normalization.mean) / cfg.normalization.std
            out[usable] = np.concatenate([runner(x[i:i + 64]) for i in range(0, len(x), 64)]).reshape(
                int(usable.sum()), per_film, *shape)
        features[start:start + len(part)] = out
        features.flush()
        state["done"], state["usable"] = start + len(part), state["usable"] + usable.tolist()
        atomic_write(progress_file, lambda tmp: Path(tmp).write_text(json.dumps(state)))
    del features
    atomic_write(folder / "bank.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"meta": meta, "usable": state["usable"], "shape": [len(rows), per_film, *map(int, shape)]})))
    os.replace(partial, final)
    progress_file.unlink(missing_ok=True)
    return PatchBank(np.load(final, mmap_mode="r"), np.asarray(state["usable"], bool), films, meta)


def _bank_items(rows: list[dict], cfg, kind: str, per_film: int, engine: PatchEngine, augmentation: Augmentation,
                image_roots, generator: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """The items of one chunk in [0, 1], ``(usable films * per_film, 1, P, P)``, and which films are usable."""
    if cfg.input in WHOLE_INPUTS:
        data = load_learner_inputs(rows, cfg.input, cfg.patch_size, image_roots=image_roots, equalize=cfg.equalize,
                                   progress=False)
        x = data.images[:, None].float() / 255.0
        if kind == "train":
            x = augmentation(x.repeat_interleave(per_film, 0), generator)
        return x, np.ones(len(rows), bool)
    if kind == "eval":  # the engine's centres on the pack's grid, moved to the learner's scale
        if cfg.input != "patches" or cfg.equalize:
            raise ValueError("evaluation banks are built for the method's input (patches) only")
        lungs = load_masked_set(rows, progress=False)
        centres, rejected = engine.sample(lungs.images, lungs.masks)
        usable = np.asarray([r is None for r in rejected])
        size = cfg.film_size or lungs.images.shape[-1]
        films = engine.scaled_films(lungs.images, lungs.masks, size)
        keep = torch.from_numpy(usable)
        patches = extract_patches(films[keep][:, None], rescale_centres(centres[keep], lungs.images.shape[-1], size),
                                  cfg.patch_size)
        return patches.float() / 255.0, usable
    data = load_learner_inputs(rows, cfg.input, cfg.patch_size, image_roots=image_roots, film_size=cfg.film_size,
                               equalize=cfg.equalize, progress=False)
    usable = (data.masks.flatten(1).sum(1) >= max(1, cfg.min_lung_pixels)).numpy()
    idx = torch.from_numpy(np.flatnonzero(usable))
    if len(idx) == 0:
        return torch.zeros(0, 1, cfg.patch_size, cfg.patch_size), usable
    x = draw_patches(data, idx, per_film, cfg.patch_size, generator, cfg.min_lung_pixels)
    return augmentation(x, generator, keep_zero=True), usable  # intensity changes inside the lung only


@torch.inference_mode()
def top_probs(top: nn.Module, features: np.ndarray, device, batch: int = 256) -> torch.Tensor:
    """Softmax ``(..., C)`` of ``top`` for activations ``(..., C', h, w)``."""
    top.eval()
    lead = features.shape[:-3]
    flat = features.reshape(-1, *features.shape[-3:])
    out = []
    for start in range(0, len(flat), batch):
        x = torch.from_numpy(np.asarray(flat[start:start + batch], np.float32)).to(device)
        out.append(top(x.contiguous(memory_format=torch.channels_last)).float().softmax(-1).cpu())
    return torch.cat(out).reshape(*lead, -1)


def write_learning_curve(history: list[dict], path: str | os.PathLike, title: str,
                         selection: str = "macro_f1") -> None:
    """The training and validation loss, validation macro-F1 and learning rate per epoch, and the
    epoch ``selection`` chose, as a PNG (the JSON is the run's ``history.json``). Nothing is
    written without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss")
    if "val_loss" in history[0]:
        ax1.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation loss")
    ax1.set_xlabel("epoch")
    ax1.legend(fontsize=8)
    ax2.plot(epochs, [h["val_macro_f1"] for h in history], "o-", color="C2", label="validation macro-F1")
    key = "val_likelihood" if "val_likelihood" in history[0] and selection == "likelihood" else "val_macro_f1"
    best = max(history, key=lambda h: h[key])
    ax2.axvline(best["epoch"], color="grey", ls=":", label=f"best (epoch {best['epoch']})")
    ax2.set_xlabel("epoch")
    ax2.legend(fontsize=8, loc="lower right")
    lr = ax2.twinx()
    lr.semilogy(epochs, [h["lr"] for h in history], color="C3", lw=0.8)
    lr.set_ylabel("learning rate", color="C3", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def train_cached(packs: list[str | os.PathLike], out_dir: str | os.PathLike, cfg, *, bank_dir: str | os.PathLike,
                 eval_k: int, image_roots: list | None = None, device="auto", progress: bool = True,
                 max_epochs_this_run: int | None = None) -> dict:
    """Train (or resume) the learner of ``cfg`` (``cfg.frozen_blocks`` > 0) on its banks under
    ``bank_dir`` (built first if missing). Same split, balancing, loss, validation rule
    (image-level macro-F1, mean softmax over ``cfg.val_k`` patches), schedule, early stopping,
    checkpoints and bundle as `patchflannel.learners.train.train`.

    When training has finished, ``out_dir/predictions.npz`` holds the best model's softmax of
    every evaluation-bank item of every film (``films``, ``probs`` ``(films, eval_k, C)``,
    ``usable``), and ``learning_curve.png`` the curve of ``history.json``.
    """
    out_dir, bank_dir = Path(out_dir), Path(bank_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    place, device = setup(resolve_device(device))
    rows = read_rows(packs)
    split = make_split(rows, cfg)
    write_split({r["patient_id"]: split[r["patient_id"]] for r in rows}, out_dir / "split.csv")
    roots = {str(p): r for p, r in zip(packs, image_roots)} if image_roots is not None else None

    torch.manual_seed(cfg.seed)
    model = create_learner(cfg.learner, len(CLASSES), weights=cfg.weights)
    trunk, top = split_trunk(model, cfg.frozen_blocks)
    labelled = [r for r in rows if r["label"] in CLASSES]
    train_bank = build_bank(bank_dir / bank_name(cfg, "train"), labelled, cfg, trunk, kind="train",
                            per_film=cfg.bank_patches, image_roots=roots, device=device, progress=progress)
    eval_bank = build_bank(bank_dir / bank_name(cfg, "eval"), rows, cfg, trunk, kind="eval", per_film=eval_k,
                           image_roots=roots, device=device, progress=progress)
    val_k = 1 if cfg.input in WHOLE_INPUTS else cfg.val_k  # a whole film is one item
    if val_k > eval_bank.features.shape[1]:
        raise ValueError(f"val_k {cfg.val_k} exceeds the evaluation bank's {eval_bank.features.shape[1]} patches")

    train_films = np.asarray([i for i, r in enumerate(labelled)
                              if split[r["patient_id"]] == "train" and train_bank.usable[i]])
    train_labels = np.asarray([CLASSES.index(labelled[i]["label"]) for i in train_films])
    val_films = np.asarray([i for i, r in enumerate(rows) if split[r["patient_id"]] == "val"
                            and r["label"] in CLASSES and eval_bank.usable[i]])
    val_labels = np.asarray([CLASSES.index(rows[i]["label"]) for i in val_films])
    counts = np.bincount(train_labels, minlength=len(CLASSES)).astype(float)
    log.info("%s: train %d films %s, val %d films", out_dir.name, len(train_films), counts.astype(int).tolist(),
             len(val_films))
    if cfg.balance == "sampler":
        sample_weight = torch.as_tensor(1.0 / counts[train_labels], dtype=torch.float64)
    elif cfg.balance == "source":
        sample_weight = style_balanced_weights(train_labels, [labelled[i]["source"] for i in train_films])
    elif cfg.balance == "none":
        sample_weight = None
    else:
        raise ValueError(f"the cached trainer balances by 'sampler', 'source' or 'none', not {cfg.balance!r}")

    top = top.to(device).to(memory_format=torch.channels_last)
    trainable = [p for p in top.parameters() if p.requires_grad]
    optimizer = make_optimizer(layer_groups(trainable, cfg.lr, cfg.layer_decay), cfg.optimizer,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    films_per_step = max(1, cfg.batch_size // cfg.patches_per_image)
    steps_per_epoch = math.ceil(len(train_films) / films_per_step)
    scheduler = LRPolicy(optimizer, cfg.schedule, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                         step_size=cfg.step_size, gamma=cfg.gamma, plateau_patience=cfg.plateau_patience)
    record = {**config_record(cfg), "packs": [Path(p).name for p in packs], "eval_k": eval_k}
    val_features = eval_bank.features[val_films, :val_k]  # read once (a copy): every epoch validates on it
    per_bank = train_bank.features.shape[1]

    def draw_order(generator: torch.Generator) -> torch.Tensor:
        if sample_weight is not None:
            return torch.multinomial(sample_weight, len(train_films), replacement=True, generator=generator)
        return torch.randperm(len(train_films), generator=generator)

    def make_batch(idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        films = train_films[idx.numpy()]
        items = torch.randint(per_bank, (len(films), cfg.patches_per_image), generator=generator).numpy()
        order = np.argsort(films, kind="stable")  # memory-map reads in file order
        x = np.empty((len(films), cfg.patches_per_image, *train_bank.features.shape[2:]), np.float32)
        x[order] = train_bank.features[films[order][:, None], items[order]]
        y = torch.as_tensor(train_labels[idx.numpy()]).repeat_interleave(cfg.patches_per_image)
        return torch.from_numpy(x.reshape(-1, *x.shape[2:])), y

    def validate(model_top: nn.Module) -> dict:
        probs = top_probs(model_top, val_features, device).mean(1)
        report = classification_report(val_labels, probs.argmax(-1).numpy())
        loss = float(nn.functional.nll_loss(probs.clamp_min(1e-7).log(), torch.as_tensor(val_labels)))
        return {"val_macro_f1": report["macro_f1"], "val_accuracy": report["accuracy"], "val_loss": loss,
                "val_likelihood": float(np.exp(-loss)),
                "val_f1": {c: v["f1"] for c, v in report["per_class"].items()}}

    working_size = cfg.patch_size if cfg.input in WHOLE_INPUTS else cfg.film_size or _pack_grid(rows)
    loss_fn = nn.CrossEntropyLoss()
    result = fit(top, optimizer, scheduler, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                 images_per_step=films_per_step, seed=cfg.seed, draw_order=draw_order, make_batch=make_batch,
                 loss=lambda logits, y: loss_fn(logits.float(), y), place=place, device=device, amp=cfg.amp,
                 channels_last=True, validate=validate, score=f"val_{cfg.selection}", patience=cfg.patience,
                 out_dir=out_dir,
                 on_best=lambda _top, entry: save_trained_learner(out_dir, model, cfg, record, entry, working_size,
                                                                  CLASSES),
                 extra_state={"config": json.dumps(record)}, max_epochs_this_run=max_epochs_this_run,
                 progress=progress)
    history = result["history"]
    finished = len(history) >= cfg.epochs or (cfg.patience is not None and result["best_epoch"] > 0
                                              and len(history) - result["best_epoch"] >= cfg.patience)
    if place.main and history:
        chosen = history[result["best_epoch"] - 1] if result["best_epoch"] else history[-1]
        write_learning_curve(history, out_dir / "learning_curve.png",
                             f"{out_dir.parent.name}/{out_dir.name}: epoch {result['best_epoch']} chosen by validation "
                             f"{cfg.selection} (macro-F1 {chosen['val_macro_f1']:.3f})", cfg.selection)
    if finished and place.main and not (out_dir / "predictions.npz").is_file():
        best_model, _ = load_learner(out_dir / "bundle")
        _, best_top = split_trunk(best_model, cfg.frozen_blocks)
        probs = torch.full((len(rows), eval_bank.features.shape[1], len(CLASSES)), float("nan"))
        keep = np.flatnonzero(eval_bank.usable)
        best_top = best_top.to(device)
        for start in range(0, len(keep), 64):
            part = keep[start:start + 64]
            probs[part] = top_probs(best_top, eval_bank.features[part], device)
        atomic_write(out_dir / "predictions.npz", lambda tmp: _save_npz(
            tmp, films=np.asarray(eval_bank.films), probs=probs.numpy().astype(np.float16), usable=eval_bank.usable))
    best_f1 = history[result["best_epoch"] - 1]["val_macro_f1"] if result["best_epoch"] else float("nan")
    return {"history": history, "best_val_macro_f1": best_f1, "best_epoch": result["best_epoch"],
            "finished": finished}


def _save_npz(path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
        np.savez(f, **arrays)


def _pack_grid(rows: list[dict]) -> int:
    from ..store import H5MaskedDataset

    return int(H5MaskedDataset(rows[0]["pack"])[rows[0]["index"]]["mask"].shape[-1])
