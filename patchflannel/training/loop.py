"""The one training loop (`fit`) and what it needs: seeding, checkpoints, an optimization step."""
from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..devices import autocast
from ..files import atomic_write
from .distributed import Distributed, unwrap, wrap

__all__ = ["fit", "grad_scaler", "load_checkpoint", "optimization_step", "restore_training_state",
           "save_checkpoint", "save_training_state", "seed_everything"]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically save a training state (tensors, numbers, strings, lists, dicts only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict | None:
    """The saved state, or ``None`` when there is no checkpoint yet (``weights_only``: no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)



def save_training_state(path: str | os.PathLike, model, optimizer, scheduler, **extra) -> None:
    """Checkpoint model, optimizer and scheduler plus ``extra`` (epoch, best score, history...)."""
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), **extra})


def restore_training_state(path: str | os.PathLike, model, optimizer, scheduler) -> dict | None:
    """Load a `save_training_state` checkpoint into the objects; returns the whole state
    (for its extra entries), or ``None`` when there is no checkpoint yet."""
    state = load_checkpoint(path)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return state


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast (GPUs without bf16); disabled (a pass-through) otherwise."""
    fp16 = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=fp16)


def optimization_step(model, x: torch.Tensor, loss_fn, optimizer, scheduler, *, device: torch.device,
                      amp: bool, channels_last: bool, scaler: torch.amp.GradScaler | None = None) -> float:
    """Forward ``x`` (moved to ``device``, channels_last if asked) under autocast, ``loss_fn(logits)``,
    backward (through ``scaler``, `grad_scaler`, for float16), optimizer step and
    ``scheduler.step()`` unless None (an `LRPolicy` steps only its per-batch schedules there).
    Returns the loss."""
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(x)
    loss = loss_fn(logits)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.item()




def fit(model: torch.nn.Module, optimizer, schedule, *, epochs: int, steps_per_epoch: int, images_per_step: int,
        seed: int, draw_order: Callable[[torch.Generator], torch.Tensor],
        make_batch: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], place: Distributed, device: torch.device,
        amp: bool = False, channels_last: bool = False,
        validate: Callable[[torch.nn.Module], dict] | None = None, score: str | None = None,
        patience: int | None = None, out_dir: str | os.PathLike | None = None,
        on_best: Callable[[torch.nn.Module, dict], None] | None = None,
        on_epoch: Callable[[dict, Path], None] | None = None, on_resume: Callable[[dict], None] | None = None,
        extra_state: dict | None = None, max_epochs_this_run: int | None = None, progress: bool = True,
        desc: str = "epoch") -> dict:
    """The epoch loop of every trainer: seeded per epoch, checkpointed every epoch, resumable.

    Each epoch draws its order of training items (``draw_order(generator)``: a permutation or a
    weighted draw of indices), cuts it into steps of ``images_per_step`` items, builds each
    global batch with ``make_batch(indices, generator)`` (inputs ready for the network, and
    targets; every rank builds the same one and trains on its share), and takes an
    `optimization_step` on ``loss(logits, targets)``. The generator and torch's global
    seed are ``seed * 100_003 + epoch``, so a resumed run draws exactly what an uninterrupted one
    would. Then ``validate(model)`` (run on rank 0; a dict of history entries holding
    ``score``, higher is better) feeds the schedule's `epoch_end`;
    ``on_best(model, entry)`` runs when ``score`` improved (e.g. to write the bundle), and
    ``on_epoch(entry, checkpoint)`` after the checkpoint is written.

    With ``out_dir``, ``checkpoint.pt`` (model, optimizer, schedule, history, best, and
    ``extra_state``) and ``history.json`` are written there after every epoch, and a later call
    resumes from them (``on_resume(state)`` sees the saved state first). Training stops after
    ``epochs``, after ``patience`` epochs without improvement, or after ``max_epochs_this_run``
    epochs of this call (the schedule still spans ``epochs``).

    Returns:
        ``{"history": [...], "best": best score, "best_epoch": epoch of the best score}``.
    """
    history, best, best_epoch, start_epoch, elapsed = [], -1.0, 0, 0, 0.0  # scores are >= 0
    ckpt_path = None if out_dir is None else Path(out_dir) / "checkpoint.pt"
    state = None if ckpt_path is None else restore_training_state(ckpt_path, model, optimizer, schedule)
    if state is not None:
        history, best, best_epoch = json.loads(state["history"]), state["best"], state.get("best_epoch", 0)
        start_epoch = state["epoch"] + 1
        elapsed = history[-1]["elapsed_s"] if history else 0.0
        log.info("resumed after epoch %d (best %s %.4f)", state["epoch"] + 1, score, best)
        if on_resume is not None:
            on_resume(state)
    trained = wrap(model, place, device)
    scaler = grad_scaler(device, amp)
    epochs_run = 0
    for epoch in range(start_epoch, epochs):
        if patience is not None and best_epoch > 0 and epoch - best_epoch >= patience:
            log.info("early stop: no improvement since epoch %d", best_epoch)
            break
        if max_epochs_this_run is not None and epochs_run >= max_epochs_this_run:
            break
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        # Dropout draws from the device's default generator. (torch.manual_seed would also do it,
        # at ~1.5 ms a call: as much as a step of the weight module.)
        torch.default_generator.manual_seed(seed * 100_003 + epoch)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed * 100_003 + epoch)
        order = draw_order(generator)
        trained.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for step in bar:
            x, y = make_batch(order[step * images_per_step:(step + 1) * images_per_step], generator)
            x, y = place.share(x), place.share(y).to(device)  # this rank's share of the global batch
            losses.append(optimization_step(trained, x, lambda logits: loss(logits, y),  # noqa: B023 (called now)
                                            optimizer, schedule, device=device, amp=amp,
                                            channels_last=channels_last, scaler=scaler))
            if progress:
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        metrics = place.from_main(lambda: validate(unwrap(trained))) if validate is not None else {}
        elapsed += time.perf_counter() - t0
        schedule.epoch_end(metrics.get(score) if score else None)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **metrics,
                 "lr": schedule.get_last_lr()[-1], "elapsed_s": round(elapsed, 1)}
        history.append(entry)
        improved = score is not None and metrics[score] > best
        if improved:
            best, best_epoch = metrics[score], epoch + 1
        if place.main:  # rank 0 logs and writes; the others follow its validation score
            if score is not None:
                log.info("epoch %d: loss %.4f, %s %.4f, %.0f s", epoch + 1, entry["train_loss"], score, metrics[score],
                         elapsed)
            if improved and on_best is not None:
                on_best(unwrap(trained), {**entry, "best_epoch": best_epoch})
            if ckpt_path is not None:
                save_training_state(ckpt_path, unwrap(trained), optimizer, schedule, epoch=epoch, best=best,
                                    best_epoch=best_epoch, history=json.dumps(history), **(extra_state or {}))
                (Path(out_dir) / "history.json").write_text(json.dumps(history, indent=1))
                if on_epoch is not None:
                    on_epoch(entry, ckpt_path)
        place.barrier()  # a resumed job finds the checkpoint every rank trained to
        epochs_run += 1
    return {"history": history, "best": best, "best_epoch": best_epoch}
