"""Where and in what precision models run: one device rule and one autocast rule for
inference and training alike."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["CPU_BF16_ENV", "autocast", "cpu_bf16_enabled", "cpu_bf16_is_fast", "resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


#: Environment variable for bf16 on the CPU: "auto" (default: only where the CPU has fast bf16
#: kernels), "1" (always, e.g. to measure what bf16 changes) or "0" (never).
CPU_BF16_ENV = "PATCHFLANNEL_CPU_BF16"


@functools.cache
def cpu_bf16_is_fast() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX-512 BF16/AMX through oneDNN). Without
    them bf16 autocast is emulated and an order of magnitude slower than float32 (measured 28x
    for EfficientNet-Lite0 on an AVX2-only CPU), so autocast stays off there."""
    try:  # oneDNN's own check also says yes for plain AVX-512, where bf16 is emulated
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_enabled() -> bool:
    """Whether ``autocast(cpu, True)`` uses bf16: see `CPU_BF16_ENV`."""
    choice = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if choice in ("1", "true", "yes", "on"):
        return True
    if choice in ("0", "false", "no", "off"):
        return False
    return cpu_bf16_is_fast()


def autocast(device: torch.device, enabled: bool = True):
    """Reduced precision where it is fast: bf16 on GPUs that support it (else fp16), bf16 on
    CPUs with native bf16 kernels (`cpu_bf16_enabled`); float32 otherwise or when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and not cpu_bf16_enabled():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
