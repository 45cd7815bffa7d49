"""Deterministic sharding of the batch jobs over processes, array jobs or machines.

An input belongs to shard ``sha1(name) mod n``: the same input lands in the same shard
whatever the listing order and however many other inputs there are, so shards can run
anywhere and be rerun independently. Shard ``i`` of ``n`` (``i`` from 0) writes its own
log beside the others in the shared output folder; a merge step combines the logs.

``--shard auto`` reads the launcher's environment: ``RANK``/``WORLD_SIZE`` (torchrun) or
``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT`` (a SLURM array starting at
``SLURM_ARRAY_TASK_MIN``).

Examples:
    >>> shard = Shard.parse("1/4")
    >>> shard.log_name("summary.jsonl")
    'summary.shard-1-of-4.jsonl'
    >>> shard.owns("images/a.png") == (shard_of("images/a.png", 4) == 1)
    True
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Shard", "shard_logs", "shard_of"]


def shard_of(name: str, n: int) -> int:
    """The shard (0..n-1) that input ``name`` belongs to."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % n


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self):
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str | None) -> Shard | None:
        """``"i/n"``, ``"auto"`` (from torchrun or SLURM variables) or ``None`` (no sharding)."""
        if text is None:
            return None
        if text == "auto":
            env = os.environ
            if "WORLD_SIZE" in env:
                return cls(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]))
            if "SLURM_ARRAY_TASK_COUNT" in env:
                first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                return cls(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
            raise ValueError("--shard auto: no RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_* variables set")
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r}: expected i/n (e.g. 0/4) or auto") from None
        return cls(index, count)

    def owns(self, name: str) -> bool:
        return shard_of(name, self.count) == self.index

    def log_name(self, base: str) -> str:
        """``summary.jsonl`` -> ``summary.shard-i-of-n.jsonl``."""
        stem, dot, suffix = base.rpartition(".")
        return f"{stem}.shard-{self.index}-of-{self.count}{dot}{suffix}"


def shard_logs(out_dir: Path, base: str) -> list[Path]:
    """The per-shard logs of ``base`` in ``out_dir`` (any shard count), sorted."""
    stem, _, suffix = base.rpartition(".")
    return sorted(Path(out_dir).glob(f"{stem}.shard-*-of-*.{suffix}"))
