"""The one training loop (:func:`fit`) and what it needs: seeding, checkpoints, an optimization step."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..devices import autocast
from ..files import atomic_write

__all__ = ["grad_scaler", "load_checkpoint", "optimization_step", "restore_training_state",
           "save_checkpoint", "save_training_state", "seed_everything"]


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
    """Load a :func:`save_training_state` checkpoint into the objects; returns the whole state
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
    backward (through ``scaler``, :func:`grad_scaler`, for float16), optimizer step and
    ``scheduler.step()`` unless None (an :class:`LRPolicy` steps only its per-batch schedules there).
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


