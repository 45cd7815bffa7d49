"""The shipped bundles, addressed by name: one registry, resolved from any working directory.

Each loader's default and every name it accepts come from here::

    Pipeline.from_pretrained("lite")                  # the default pipeline, by name
    Segmenter.from_bundle("segmenter-unet-lite0")     # a shipped segmenter, by name
    load_learner_set("learners-lite")                 # ... or any path to a bundle folder

The bundles live in the ``weights/`` folder beside the package (a source checkout or an
editable install); ``$PATCHFLANNEL_WEIGHTS`` points elsewhere (e.g. a copy on shared storage).
Nothing is downloaded: a name that is not there is an error that lists what is.

Examples:
    >>> from patchflannel.hub import SHIPPED, default_bundle
    >>> SHIPPED["lite"].folder
    'pipeline-lite'
    >>> default_bundle("segmenter").name
    'segmenter-fcdensenet-lite'
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError

__all__ = ["DEFAULTS", "SHIPPED", "WEIGHTS_ENV", "ShippedBundle", "default_bundle", "resolve_bundle",
           "shipped_bundles", "weights_dir"]

log = logging.getLogger(__name__)

#: Environment variable naming the folder that holds the shipped bundles (default: ``weights/``
#: beside the package).
WEIGHTS_ENV = "PATCHFLANNEL_WEIGHTS"


@dataclass(frozen=True)
class ShippedBundle:
    """A bundle shipped with the library: its kind, folder (under `weights_dir`) and what it is."""

    kind: str
    folder: str
    summary: str


#: Every shipped bundle by name (a pipeline also by its short name).
SHIPPED: dict[str, ShippedBundle] = {b.folder: b for b in (
    ShippedBundle("pipeline", "pipeline-lite", "FC-DenseNet lite segmenter + five lite learners + FLANNEL module"),
    ShippedBundle("segmenter", "segmenter-fcdensenet-lite", "FC-DenseNet (lite preset) lung segmenter, 256 px"),
    ShippedBundle("segmenter", "segmenter-fcdensenet103", "FC-DenseNet103 lung segmenter"),
    ShippedBundle("segmenter", "segmenter-unet-lite0", "U-Net with an EfficientNet-Lite0 encoder"),
    ShippedBundle("learners", "learners-lite", "the lite preset's five patch learners"),
    ShippedBundle("ensemble", "ensemble-lite", "FLANNEL weight module over learners-lite"),
)}
SHIPPED["lite"] = SHIPPED["pipeline-lite"]

#: The bundle each loader uses when given none.
DEFAULTS = {"pipeline": "lite", "segmenter": "segmenter-fcdensenet-lite", "learners": "learners-lite",
            "ensemble": "ensemble-lite"}


#: Variables of earlier versions, each naming one bundle; :data:`WEIGHTS_ENV` and names replace them.
RETIRED_ENV = ("PATCHFLANNEL_PIPELINE", "PATCHFLANNEL_LEARNERS", "PATCHFLANNEL_SEGMENTER")


def weights_dir() -> Path:
    """The folder holding the shipped bundles: ``$PATCHFLANNEL_WEIGHTS``, else ``weights/`` beside the package."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "weights"


def default_bundle(kind: str) -> Path:
    """The folder of the default bundle of ``kind`` (``pipeline``, ``segmenter``, ``learners``, ``ensemble``)."""
    if kind not in DEFAULTS:
        raise ValueError(f"kind must be one of {sorted(DEFAULTS)}, not {kind!r}")
    retired = [v for v in RETIRED_ENV if os.environ.get(v)]
    if retired:
        log.warning("%s no longer choose the default bundles: pass the bundle (a name or a path) to the loader, "
                    "or set %s to a folder of bundles", ", ".join(retired), WEIGHTS_ENV)
    return weights_dir() / SHIPPED[DEFAULTS[kind]].folder


def shipped_bundles() -> list[str]:
    """Names of the bundles (and learner sets) present in `weights_dir`."""
    root = weights_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def resolve_bundle(path: str | os.PathLike, what: str = "bundle") -> Path:
    """The folder ``path`` names, wherever the program runs.

    An existing path is used as it is. Otherwise a registered name (``lite``), a bare folder
    name (``segmenter-unet-lite0``, ``learners-lite/resnet18``) or a relative
    ``weights/<name>`` (also ``../weights/<name>``...) resolves in `weights_dir`.

    Raises:
        WeightsError: neither; the message lists the shipped bundles.
    """
    p = Path(path)
    if p.exists():
        return p
    root = weights_dir()
    if not p.is_absolute():
        if str(path) in SHIPPED:
            p_named = root / SHIPPED[str(path)].folder
            if p_named.exists():
                return p_named
        parts = list(p.parts)
        lead = 0
        while lead < len(parts) and parts[lead] in (".", ".."):
            lead += 1
        rest = parts[lead:]
        if rest and rest[0] == "weights":
            rest = rest[1:]
        elif lead:
            rest = []  # ../<name> is a path of the caller's, not a shipped name
        if rest and ".." not in rest:
            candidate = root.joinpath(*rest)
            if candidate.exists():
                return candidate
    names = ", ".join(shipped_bundles()) or "none"
    raise WeightsError(f"{what} not found at {p} (resolved from {Path.cwd()}): pass an existing folder, or the name "
                       f"of a bundle shipped in {root} ({names}; set {WEIGHTS_ENV} to use another folder)")
