"""Patch-learner bundles: one folder per learner (``model.safetensors`` + ``config.json``), and
learner sets: a folder of such folders (e.g. ``weights/learners-lite/``).

Every bundle's config and weights hashes are checked on load (see
`patchflannel.bundle.read_bundle`; ``verify=False`` or
``PATCHFLANNEL_UNVERIFIED_BUNDLES=1`` opt out, with a warning), and a learner name that
could make timm download is refused before anything is built."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..bundle import CONFIG_FILE, build_from_config, load_state, read_bundle, write_bundle
from ..hub import default_bundle, resolve_bundle
from ..errors import WeightsError
from ..labels import CLASSES
from .registry import Normalization, PRESETS, create_learner

__all__ = ["DEFAULT_WORKING_SIZE", "config_record", "load_learner", "load_learner_set", "save_learner",
           "save_trained_learner"]



#: The side of the masked film on which a learner's ``patch_size`` has its meaning, for bundles
#: that predate the record (format 0): the segment job's and the pipeline's working size.
DEFAULT_WORKING_SIZE = 1024


def save_learner(folder: str | os.PathLike, model: torch.nn.Module, *, name: str, patch_size: int = 224,
                 working_size: int = DEFAULT_WORKING_SIZE, normalization: Normalization | None = None,
                 classes=CLASSES, extra: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    """Write a learner bundle. Its config carries the data contract: the classes of its outputs,
    ``patch_size`` px patches cut from the masked film at ``working_size`` px, one grey channel,
    the normalisation. Weights are stored as float16 by default (half the size; they are
    loaded back as float32, and predictions agree with the float32 model to ~1e-3)."""
    write_bundle(folder, model, {"task": "patch-classification", "learner": name, "classes": list(classes),
                                 "working_size": working_size, "patch_size": patch_size, "in_chans": 1,
                                 "normalization": (normalization or Normalization()).to_dict(), **(extra or {})}, dtype=dtype)


def load_learner(folder: str | os.PathLike, *, verify: bool = True) -> tuple[torch.nn.Module, dict]:
    """Build a learner from its bundle and load the verified weights (eval mode, CPU).

    ``verify=False`` (or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``) loads a bundle whose hashes
    are missing or do not match, with a warning.

    Raises:
        WeightsError: see `patchflannel.bundle.read_bundle`; also a learner name that is
            unknown or could download, or keys of the wrong type, naming the config file.
    """
    folder = resolve_bundle(folder, "learner bundle")
    state, config = read_bundle(folder, "learner", verify=verify,
                                required=("learner", "classes", "patch_size", "normalization"))
    config_path = folder / CONFIG_FILE
    classes, in_chans = config["classes"], config.get("in_chans", 1)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise WeightsError(f"{config_path}: 'classes' must be a non-empty list of names, not {classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise WeightsError(f"{config_path}: 'in_chans' must be a positive integer, not {in_chans!r}")
    model = build_from_config(lambda: create_learner(config["learner"], len(classes), in_chans=in_chans),
                              config_path, "learner")
    return load_state(model, state, folder).eval(), config


def _order(name: str) -> tuple:
    for rank, members in enumerate(PRESETS.values()):
        if name in members:
            return (rank, members.index(name), name)
    return (len(PRESETS), 0, name)


def load_learner_set(folder: str | os.PathLike | None = None, *,
                     verify: bool = True) -> tuple[dict[str, torch.nn.Module], dict]:
    """All learner bundles in the sub-folders of ``folder`` (default: the shipped
    ``learners-lite`` set), as ``{name: model}`` in preset order, and the shared settings
    (classes, patch size, normalisation) they must agree on.

    ``folder`` may name a shipped set from any working directory (``weights/learners-lite``
    or ``learners-lite``, see `patchflannel.hub.resolve_bundle`). ``verify=False``
    (or ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``) loads bundles whose hashes are missing or do
    not match, with a warning.

    Raises:
        WeightsError: no bundles, a bundle that fails its checks (see `load_learner`), or
            bundles that disagree on classes, patch size or normalisation.
    """
    folder = folder or default_bundle("learners")
    try:
        folder = resolve_bundle(folder, "learner set")
    except WeightsError as exc:
        raise WeightsError(f"no learner bundles under {folder}: {exc}") from None
    subfolders = sorted(p for p in folder.glob("*") if (p / CONFIG_FILE).is_file()) if folder.is_dir() else []
    if (folder / CONFIG_FILE).is_file():
        subfolders = [folder]
    if not subfolders:
        raise WeightsError(f"no learner bundles under {folder}: pass a folder of learner bundles "
                           "(each with config.json and model.safetensors), e.g. weights/learners-lite")
    loaded = [load_learner(p, verify=verify) for p in subfolders]
    for _, config in loaded:
        config.setdefault("working_size", config.get("film_size") or DEFAULT_WORKING_SIZE)
    # A Pipeline feeds each learner the masked film at its working size: any other input (whole
    # films, equalised films, a film size the working size does not record) would be silently wrong.
    other = [str(p) for p, (_, c) in zip(subfolders, loaded)
             if c.get("input", "patches") != "patches" or c.get("equalize")
             or (c.get("film_size") and c["film_size"] != c["working_size"])]
    if other:
        raise WeightsError(f"{other} hold whole-image or ablation models (trained on other inputs than the "
                           "masked film at their working size), not patch learners; keep them out of a learner set")
    # Named by folder (the shipped ones are named after their backbone), so one backbone can
    # serve at two scales; in preset order, then by scale.
    names = [c["learner"] if p == folder else p.name for p, (_, c) in zip(subfolders, loaded)]
    if len(set(names)) != len(names):
        raise WeightsError(f"learner bundles under {folder} share a name: {names}")
    named = sorted(zip(names, loaded),
                   key=lambda nl: (*_order(nl[1][1]["learner"]), -nl[1][1]["working_size"], nl[0]))
    shared_keys = ("classes", "patch_size", "normalization")
    shared = {k: named[0][1][1][k] for k in shared_keys}
    for _, (_, config) in named[1:]:
        if any(config[k] != shared[k] for k in shared_keys):
            raise WeightsError(f"learner bundles under {folder} disagree on {shared_keys}; "
                               "a set must share classes, patch size and normalisation")
    # Learners may look at the film at different scales: the pipeline segments on the largest grid.
    shared["configs"] = {name: config for name, (_, config) in named}
    shared["working_sizes"] = {name: config["working_size"] for name, (_, config) in named}
    shared["working_size"] = max(shared["working_sizes"].values())
    shared["folders"] = dict(zip(names, subfolders))
    return {name: model for name, (model, _) in named}, shared


def config_record(cfg) -> dict:
    """``cfg`` as saved with checkpoints, bundles and reports (not the split file's local path)."""
    return {k: v for k, v in asdict(cfg).items() if k != "split_file"}


def save_trained_learner(out_dir: Path, model: torch.nn.Module, cfg, record: dict, entry: dict,
                         working_size: int, classes) -> None:
    """The best model so far as ``out_dir/bundle``, with its training record."""
    save_learner(out_dir / "bundle", model, name=cfg.learner, patch_size=cfg.patch_size, working_size=working_size,
                 normalization=cfg.normalization, classes=classes,
                 extra={"input": cfg.input, "film_size": cfg.film_size, "equalize": cfg.equalize,
                        "training": {**record, "best_epoch": entry["best_epoch"],
                                     "val_macro_f1": entry["val_macro_f1"]}})
