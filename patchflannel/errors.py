"""The library's exceptions: one small hierarchy, each naming the file and the reason."""
from __future__ import annotations

import os

__all__ = ["DataNotFoundError", "InvalidImageError", "PatchflannelError", "WeightsError"]


class PatchflannelError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidImageError(PatchflannelError, ValueError):
    """An input that cannot be used as a chest X-ray image (unreadable, empty, too small, ...).

    Attributes:
        path: the file (or a description of the array) that was refused.
        reason: why, in words.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path or '<array>'}: {reason}")


class WeightsError(PatchflannelError):
    """Weights or a model bundle that are missing, incomplete or do not match their config."""


class DataNotFoundError(PatchflannelError, FileNotFoundError):
    """A data folder or manifest the caller pointed to does not exist."""
