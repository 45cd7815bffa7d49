"""Training-loop pieces shared by every trainer: seeding, devices, AMP, atomic checkpoints."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CPU (and on GPUs that support it, else fp16); a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16)


# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename into ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def _uniform(n: int, generator: torch.Generator):
    return lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)


def random_affine(tensors: list[torch.Tensor], generator: torch.Generator, *, max_rotation: float,
                  scale_range: tuple[float, float], max_translate: float = 0.0) -> list[torch.Tensor]:
    """One random rotation/zoom/shift per sample, the same warp applied to every ``(N, C, H, W)``
    tensor in ``tensors`` (e.g. images and their masks), bilinear, zero fill. No flips: lungs
    are not mirror-symmetric. ``max_translate`` is a fraction of the side."""
    n = tensors[0].shape[0]
    u = _uniform(n, generator)
    angle = torch.deg2rad(u(-max_rotation, max_rotation))
    scale = u(*scale_range)
    if max_translate:
        tx, ty = u(-max_translate, max_translate) * 2, u(-max_translate, max_translate) * 2
    else:
        tx = ty = torch.zeros(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, tensors[0].shape, align_corners=False)
    return [F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False) for t in tensors]


def intensity_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random gamma (x0.78-1.28), contrast (0.9-1.1) and brightness (+-0.05) per sample; images in [0, 1]."""
    u = _uniform(images.shape[0], generator)
    gamma = torch.exp(u(-0.25, 0.25))[:, None, None, None]
    contrast = u(0.9, 1.1)[:, None, None, None]
    brightness = u(-0.05, 0.05)[:, None, None, None]
    return (images.clamp(0, 1) ** gamma * contrast + brightness).clamp(0, 1)


def optimization_step(model, x: torch.Tensor, loss_fn, optimizer, scheduler, *, device: torch.device,
                      amp: bool, channels_last: bool) -> float:
    """Forward ``x`` (moved to ``device``, channels_last if asked) under autocast, ``loss_fn(logits)``,
    backward, optimizer and scheduler step. Returns the loss."""
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        logits = model(x)
    loss = loss_fn(logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()
