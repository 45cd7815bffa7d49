"""Weights bundles: one folder with ``model.safetensors`` and ``config.json``.

config.json describes how to rebuild the network and how to feed it (preprocessing,
normalisation, thresholds, temperature...). It records two hashes:

* ``weights_sha256``: the SHA-256 of ``model.safetensors``;
* ``config_sha256``: the SHA-256 of the config itself (its canonical JSON, see
  `config_digest`, computed over every key but ``config_sha256``). It includes
  ``weights_sha256``, so this one hash covers the whole bundle.

Both are checked on load (`read_bundle`): a corrupt, swapped or edited file is
refused with a `WeightsError` naming the file, never
half-used. A bundle whose hashes are missing is refused too. After a deliberate edit,
`rehash_bundle` (or ``python -m patchflannel.bundle rehash FOLDER``) records the
new hash. Loading an unverified or edited bundle anyway needs an explicit opt-in: the
keyword ``verify=False`` of the loaders, or the environment variable
``PATCHFLANNEL_UNVERIFIED_BUNDLES=1`` (for the command-line tools); both log a warning.
The hashes guard against accidents (corruption, stray edits, half-copied folders), not
against someone who can rewrite the folder: only load bundles from sources you trust.

Weights load with safetensors only, so no pickled code can run. Nothing is downloaded:
architecture names that could reach a model hub are refused before anything is built
(see `patchflannel.pretrained.check_timm_name`).

Bundle paths and names: `patchflannel.hub.resolve_bundle`.
"""
from __future__ import annotations

import sys
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import WeightsError, run_command
from .files import atomic_write
from .hub import resolve_bundle, weights_dir

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "HASH_KEYS", "PIPELINE_FILE", "UNVERIFIED_ENV", "WEIGHTS_FILE",
           "build_from_config", "bundle_folders", "canonical_json", "check_config_hash",
           "check_format_version", "config_digest", "load_state", "main", "read_bundle", "read_config",
           "read_json", "read_pipeline_spec", "rehash_bundle", "sha256_file", "verification_skipped",
           "verify_bundle", "write_bundle", "write_pipeline_spec"]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PIPELINE_FILE = "pipeline.json"
#: The repository's folder of shipped bundles.
#: Set to ``1`` to load bundles whose hashes are missing or do not match (with a warning).
UNVERIFIED_ENV = "PATCHFLANNEL_UNVERIFIED_BUNDLES"
HASH_KEYS = ("weights_sha256", "config_sha256")
#: The version of the bundle format this library writes (``format_version`` in every config.json and
#: pipeline.json); a config without one predates it (version 0, read with the documented defaults).
FORMAT_VERSION = 1

_RESTORE_HINT = "restore the bundle from the repository (or re-save it)"
_REHASH_HINT = (f"{_RESTORE_HINT}; if you edited it on purpose, record "
                "the new hashes with patchflannel.bundle.rehash_bundle(folder), or load it unverified with "
                f"verify=False / {UNVERIFIED_ENV}=1")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(config: dict) -> str:
    """``config`` without ``config_sha256`` as canonical JSON (sorted keys, no whitespace)."""
    return json.dumps({k: v for k, v in config.items() if k != "config_sha256"}, sort_keys=True,
                      separators=(",", ":"))


def config_digest(config: dict) -> str:
    """The ``config_sha256`` of a config: SHA-256 of `canonical_json`."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _with_hash(config: dict) -> dict:
    """``config`` as it will read back from JSON, with its ``config_sha256`` (last)."""
    plain = json.loads(json.dumps({k: v for k, v in config.items() if k != "config_sha256"}, default=list))
    return {**plain, "config_sha256": config_digest(plain)}


def verification_skipped(verify: bool = True) -> bool:
    """Whether hashes are to be checked as warnings only: ``verify=False`` or ``$PATCHFLANNEL_UNVERIFIED_BUNDLES``."""
    return not verify or os.environ.get(UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def write_bundle(folder: str | os.PathLike, model: torch.nn.Module, config: dict, *,
                 dtype: torch.dtype = torch.float32) -> None:
    """Write ``model``'s state (floating tensors as ``dtype``) and ``config`` plus both hashes
    (``weights_sha256``, ``config_sha256``; any in ``config`` are replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    config = {k: v for k, v in config.items() if k not in (*HASH_KEYS, "weights_dtype")}
    config = _with_hash({"format_version": FORMAT_VERSION, **config, "weights_dtype": str(dtype).removeprefix("torch."),
                         "weights_sha256": sha256_file(folder / WEIGHTS_FILE)})
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


# --- reading -------------------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike, what: str = "config") -> dict:
    """A JSON object from ``path``; unreadable files, malformed JSON and non-objects raise
    `WeightsError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"cannot read {what} {path}: {exc}") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and absurd numbers
        raise WeightsError(f"{path} is not valid JSON ({exc}); {_RESTORE_HINT}") from exc
    if not isinstance(value, dict):
        raise WeightsError(f"{path} holds a JSON {type(value).__name__}, not an object; "
                           f"{_RESTORE_HINT}")
    return value


def check_config_hash(config: dict, path: str | os.PathLike, *, verify: bool = True) -> None:
    """Refuse (or, unverified, warn about) a config whose ``config_sha256`` is missing or wrong."""
    expected = config.get("config_sha256")
    if expected is None:
        problem = f"{path} records no config_sha256, so nothing vouches for it"
    elif expected != config_digest(config):
        problem = f"{path} does not match the config_sha256 it records: it was edited or is corrupt"
    else:
        return
    if not verification_skipped(verify):
        raise WeightsError(f"{problem}; {_REHASH_HINT}")
    log.warning("loading UNVERIFIED %s (verify=False or %s set): %s", path, UNVERIFIED_ENV, problem)


def read_config(folder: str | os.PathLike, what: str = "model", *, verify: bool = True,
                required: Iterable[str] = ()) -> dict:
    """The checked config.json of a bundle (``config_sha256`` verified; the weights file's hash
    is checked by `read_bundle`)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(f"{what} bundle {folder} lacks {CONFIG_FILE}; pass the folder that holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_json(config_path, f"{what} config")
    check_config_hash(config, config_path, verify=verify)
    check_format_version(config, config_path)
    missing = [k for k in required if k not in config]
    if missing:
        raise WeightsError(f"{config_path} lacks {missing}: not a {what} bundle config")
    return config


def check_format_version(config: dict, path: Path) -> int:
    """The config's ``format_version`` (0 when absent); a newer one than this library's is refused."""
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise WeightsError(f"{path}: 'format_version' must be a non-negative integer, not {version!r}")
    if version > FORMAT_VERSION:
        raise WeightsError(f"{path}: bundle format {version} is newer than this library's ({FORMAT_VERSION}); "
                           "upgrade patchflannel to load it")
    return version


def read_bundle(folder: str | os.PathLike, what: str = "model", *, verify: bool = True,
                required: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """The verified state dict (floating tensors as float32) and config of a bundle.

    Args:
        folder: the bundle folder (see `resolve_bundle` for shipped names).
        what: the kind of bundle, for messages.
        verify: ``True`` (default) refuses a bundle whose ``config_sha256`` or
            ``weights_sha256`` is missing or wrong. ``False`` (or the environment variable
            ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1``) loads it anyway, logging a warning.
        required: config keys the caller needs.

    Raises:
        WeightsError: missing or unreadable files, malformed JSON, missing keys, failed or
            missing hashes, a corrupt safetensors file; each naming the file.
    """
    folder = resolve_bundle(folder, f"{what} bundle")
    weights_path = folder / WEIGHTS_FILE
    config = read_config(folder, what, verify=verify, required=required)
    config_path = folder / CONFIG_FILE
    if not weights_path.is_file():
        raise WeightsError(f"{what} bundle {folder} lacks {WEIGHTS_FILE}; pass the folder that holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    expected = config.get("weights_sha256")
    try:
        actual = sha256_file(weights_path)
    except OSError as exc:
        raise WeightsError(f"cannot read {weights_path}: {exc}") from exc
    if expected is None or actual != expected:
        problem = (f"{config_path} records no weights_sha256 for {weights_path}" if expected is None else
                   f"{weights_path} does not match the SHA-256 recorded in {config_path}: the file is corrupt "
                   "or was replaced")
        if not verification_skipped(verify):
            raise WeightsError(f"{problem}; {_REHASH_HINT}")
        log.warning("loading UNVERIFIED %s (verify=False or %s set): %s", weights_path, UNVERIFIED_ENV, problem)
    try:
        tensors = load_file(weights_path)
    except Exception as exc:  # safetensors' SafetensorError (bad header), OSError, ...
        raise WeightsError(f"{weights_path} is not a readable safetensors file ({exc}); "
                           f"{_RESTORE_HINT}") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return state, config


def load_state(model: torch.nn.Module, state: dict, source: str | os.PathLike) -> torch.nn.Module:
    """``model.load_state_dict(state)``, a mismatch reported as ``WeightsError`` naming ``source``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{source}: the weights do not fit the architecture in its config.json: {exc}") from exc
    return model


def build_from_config(build, config_path: str | os.PathLike, what: str):
    """``build()``, a refused or broken architecture reported as ``WeightsError`` naming ``config_path``."""
    try:
        return build()
    except WeightsError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise WeightsError(f"{config_path}: cannot build the {what} it describes: {exc}") from exc


# --- pipeline specs ------------------------------------------------------------------------------------------

_PIPELINE_PARTS = ("segmenter", "learners", "ensemble")


def _check_pipeline_spec(spec: dict, path: Path) -> None:
    if spec.get("format", "patchflannel-pipeline") != "patchflannel-pipeline":
        raise WeightsError(f"{path}: format {spec.get('format')!r} is not 'patchflannel-pipeline'")
    for key in _PIPELINE_PARTS:
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or not value or Path(value).is_absolute()):
            raise WeightsError(f"{path}: {key!r} must be a folder relative to the pipeline folder or null, "
                               f"not {value!r}")
    k = spec.get("k", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise WeightsError(f"{path}: 'k' must be a positive integer, not {k!r}")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WeightsError(f"{path}: 'seed' must be an integer, not {seed!r}")


def read_pipeline_spec(folder: str | os.PathLike, *, verify: bool = True) -> dict:
    """The checked ``pipeline.json`` of a pipeline bundle folder (resolved with `resolve_bundle`).

    ``config_sha256`` is verified like a bundle config's (``verify=False`` or
    ``PATCHFLANNEL_UNVERIFIED_BUNDLES=1`` opt out, with a warning); the parts
    (``segmenter``, ``learners``, ``ensemble``) must be relative folder names or null,
    ``k`` a positive integer, ``seed`` an integer. The parts stay relative to the folder.

    Raises:
        WeightsError: no such folder or file, malformed JSON, a failed or missing hash, bad values.
    """
    folder = resolve_bundle(folder, "pipeline bundle")
    path = folder / PIPELINE_FILE
    if not path.is_file():
        raise WeightsError(f"no {PIPELINE_FILE} in {folder}: pass a pipeline bundle folder (one written by "
                           f"Pipeline.save_pretrained, or the repository's weights/pipeline-lite)")
    spec = read_json(path, "pipeline spec")
    check_config_hash(spec, path, verify=verify)
    check_format_version(spec, path)
    _check_pipeline_spec(spec, path)
    return spec


def write_pipeline_spec(folder: str | os.PathLike, spec: dict) -> None:
    """Write ``spec`` as ``folder/pipeline.json`` with its ``config_sha256``, atomically."""
    path = Path(folder) / PIPELINE_FILE
    spec = _with_hash({"format_version": FORMAT_VERSION, **spec})
    _check_pipeline_spec(spec, path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=2) + "\n"))


# --- re-hashing ----------------------------------------------------------------------------------------------


def rehash_bundle(folder: str | os.PathLike, *, weights: bool = False) -> dict:
    """Record the hashes of a bundle after a deliberate edit of its config.json (or of a
    pipeline folder's pipeline.json); returns the new config.

    The config keeps its key order and layout; ``config_sha256`` is recomputed. The weights
    file must still match its recorded ``weights_sha256`` (the edit was the config's) unless
    ``weights=True``, which records the current weights file's hash; a bundle that records
    none gets it recorded.

    Raises:
        WeightsError: no config, malformed JSON, or weights that changed without ``weights=True``.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() and (folder / PIPELINE_FILE).is_file():
        path = folder / PIPELINE_FILE
        spec = read_json(path, "pipeline spec")
        write_pipeline_spec(folder, spec)
        return read_json(path)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{folder} holds neither {CONFIG_FILE} nor {PIPELINE_FILE}")
    config = read_json(path)
    weights_path = folder / WEIGHTS_FILE
    if weights_path.is_file():
        actual = sha256_file(weights_path)
        recorded = config.get("weights_sha256")
        if recorded is not None and recorded != actual and not weights:
            raise WeightsError(f"{weights_path} no longer matches the weights_sha256 in {path}; pass weights=True "
                               "only if the new weights file is the one you mean")
        if recorded is None or weights:
            config["weights_sha256"] = actual
    elif "weights_sha256" not in config:
        raise WeightsError(f"{folder} lacks {WEIGHTS_FILE}: nothing to record a weights_sha256 for")
    config = _with_hash(config)
    trailing = "\n" if path.read_text(encoding="utf-8").endswith("\n") else ""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + trailing))
    return config


def bundle_folders(root: str | os.PathLike | None = None) -> list[Path]:
    """Every bundle (folder with config.json) and pipeline folder (pipeline.json) under ``root``
    (default: the shipped bundles' folder)."""
    root = Path(root) if root is not None else weights_dir()
    found = {p.parent for name in (CONFIG_FILE, PIPELINE_FILE) for p in root.rglob(name)}
    return sorted(found)


def verify_bundle(folder: str | os.PathLike) -> dict:
    """Check a bundle's (or pipeline folder's) hashes and readability without building a network; the config."""
    folder = resolve_bundle(folder)
    if not (folder / CONFIG_FILE).is_file() and (folder / PIPELINE_FILE).is_file():
        return read_pipeline_spec(folder)
    return read_bundle(folder)[1]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m patchflannel.bundle",
                                description="Verify bundles, or record their hashes after a deliberate edit.")
    p.add_argument("command", choices=("verify", "rehash"))
    p.add_argument("folders", nargs="*", type=Path, help="bundle folders (default for verify: all shipped ones)")
    p.add_argument("--weights", action="store_true", help="rehash: also record the current weights file's hash")
    args = p.parse_args(argv)
    if args.command == "rehash":
        if not args.folders:
            p.error("rehash needs the folders to rehash")
        for folder in args.folders:
            rehash_bundle(folder, weights=args.weights)
            print(f"rehashed {folder}")
        return 0
    failed = 0
    for folder in args.folders or bundle_folders():
        try:
            verify_bundle(folder)
            print(f"ok      {folder}")
        except WeightsError as exc:
            failed += 1
            print(f"FAILED  {folder}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
