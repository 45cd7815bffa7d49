"""The whole method in one object: decode -> lung mask -> K lung patches -> learners -> FLANNEL.

A pipeline bundle is a folder with ``pipeline.json`` naming its parts (segmenter, learner
set, optional FLANNEL weight module: each a bundle folder, given relative to the pipeline
folder) and the inference settings (K, seed). `Pipeline.save_pretrained` writes a
self-contained one; the shipped default ``weights/pipeline-lite`` points at its sibling
bundles in ``weights/``.

Examples:
    >>> from patchflannel import Pipeline
    >>> pipe = Pipeline.from_pretrained()                    # the shipped bundle, offline  # doctest: +SKIP
    >>> pred = pipe.predict("chest.png")                                                      # doctest: +SKIP
    >>> pred.label, pred.probabilities["covid"], pred.rejection                               # doctest: +SKIP
    ('normal', 0.03, None)
    >>> preds = pipe.predict(["a.png", "b.dcm", array])      # batched                        # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .bundle import read_pipeline_spec, write_pipeline_spec
from .evaluation.calibration import apply_temperature, uncertainty
from .errors import InvalidImageError, WeightsError
from .io import as_grey_float, check_size, load_image
from .hub import default_bundle, resolve_bundle
from .learners.bundle import load_learner_set
from .learners.engine import PatchEngine
from .labels import CLASSES, FLANNEL_ENSEMBLE, MEAN_OF_LEARNERS
from .learners.registry import Normalization
from .patches import DEFAULT_K, image_seed
from .runtime import resolve_backend
from .segment.segmenter import Segmenter

__all__ = ["Pipeline", "Prediction"]

log = logging.getLogger(__name__)



_ARRAY_FIELDS = ("packed_mask", "mask_shape", "centres", "heatmap", "learner_heatmaps", "working_image")


@dataclass
class Prediction:
    """One input's result.

    Attributes:
        source: the file path, or ``"array[i]"`` for arrays.
        label: the predicted class, ``None`` when rejected.
        probabilities: ``{class: p}`` of the combined prediction, temperature-calibrated
            (``None`` when rejected).
        combiner: ``"FLANNEL ensemble"`` or ``"mean of learners"`` (no weight module loaded).
        learners: per learner, ``{"probabilities": {...}, "votes": {...}, "label": ...}``: the
            mean softmax over the K patches, the fraction of patches voting each class and the
            majority vote.
        learner_weights: the weight module's weight per learner for this input.
        uncertainty: ``entropy``, ``vote_entropy``, ``learner_disagreement`` and ``margin``
            (see `patchflannel.evaluation.calibration.uncertainty`).
        rejection: why the input was not classified (unreadable file, no plausible lungs...).
        lung_fraction: fraction of the image covered by the lung mask.
        mask: the lung mask on the letterboxed working grid (not in `to_dict`; stored
            bit-packed in ``packed_mask``).
        patches: the patches it was classified from (K, or fewer when adaptive).
        centres: ``(patches, 2)`` patch centres on the working grid (not in `to_dict`).
        heatmap: with ``explain=True``, the ensemble's probabilistic Grad-CAM for ``label``,
            ``(W/4, W/4)`` float in [0, 1] on the working grid, zero outside the lung (not in
            `to_dict`); ``learner_heatmaps`` holds each learner's and ``working_image``
            the letterboxed grey film they lie on (`patchflannel.viz.explanation_figure`
            draws the three).
    """

    source: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    combiner: str | None = None
    learners: dict[str, dict] = field(default_factory=dict)
    learner_weights: dict[str, float] | None = None
    uncertainty: dict[str, float] | None = None
    rejection: str | None = None
    lung_fraction: float | None = None
    patches: int | None = None
    packed_mask: np.ndarray | None = field(default=None, repr=False)
    mask_shape: tuple[int, int] | None = field(default=None, repr=False)
    centres: np.ndarray | None = field(default=None, repr=False)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    learner_heatmaps: dict[str, np.ndarray] | None = field(default=None, repr=False)
    working_image: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.rejection is None

    @property
    def mask(self) -> np.ndarray | None:
        """The bool lung mask on the working grid (kept bit-packed: a list of predictions holds
        128 KB per film for it, not 1 MB)."""
        if self.packed_mask is None:
            return None
        h, w = self.mask_shape
        return np.unpackbits(self.packed_mask, count=h * w).reshape(h, w).astype(bool)

    @mask.setter
    def mask(self, value: np.ndarray | None) -> None:
        if value is None:
            self.packed_mask = self.mask_shape = None
        else:
            value = np.asarray(value, dtype=bool)
            self.packed_mask, self.mask_shape = np.packbits(value, axis=None), value.shape

    def to_dict(self) -> dict:
        """JSON-ready fields (no arrays)."""
        return {k: v for k, v in self.__dict__.items() if k not in _ARRAY_FIELDS}


class Pipeline:
    """Segmenter + patch learners + (optional) FLANNEL weight module, batched end to end.

    Args:
        segmenter: a `Segmenter` (its working size is the patch grid).
        learners: ``{name: module}`` patch learners sharing ``patch_size`` and ``normalization``.
        weight_module: a fitted `FlannelWeightModule` over the
            learners in this order; ``None`` combines by the plain mean of the learners.
        temperature: divides the log-probabilities of the combined prediction (calibration fitted
            with the weight module; 1 leaves them as they are).
        classes: the learners' output classes, in order (from their bundles); labels the outputs.
        scales: per learner, the side of the film its patches come from (its bundle's
            ``working_size``; default: the segmenter's working grid). One segmentation, the
            masked film resized once per scale (see `PatchEngine`).
        k: patches per image (default `DEFAULT_K`, the method's 100).
        seed: base seed of the per-image patch sampling (same input, same output).
        batch_size: images decoded, segmented and classified together.
        device: ``"auto"`` (cuda when present), ``"cpu"``, ...
        progress: show a progress bar over batches.
        explain_batch_size: patches per Grad-CAM backward pass (``explain=True``); bounds its memory.
        backend: ``"torch"`` (eager), ``"onnxruntime"`` (the networks exported to ONNX, checked
            against PyTorch, run by ONNX Runtime on the CPU) or ``"auto"`` (ONNX Runtime on a
            CPU when installed); see `patchflannel.runtime`. Grad-CAM always runs in PyTorch.
        adaptive: classify each film from as few of its K patches as settle its label (see
            `PatchEngine`, `patchflannel.learners.engine.settled`); K stays the cap.
        bundle_folders: ``{learner name or "segmenter": bundle folder}``, where exported graphs are
            cached (`patchflannel.runtime.cache_folder`); set by `from_bundles`.
    """

    def __init__(self, segmenter: Segmenter, learners: Mapping[str, torch.nn.Module], *, weight_module=None,
                 temperature: float = 1.0, patch_size: int = 224, normalization: Normalization | None = None,
                 classes: Sequence[str] = CLASSES, k: int = DEFAULT_K, seed: int = 0, batch_size: int = 8,
                 device="auto", amp: bool = True, progress: bool = False, explain_batch_size: int = 8,
                 scales: Mapping[str, int] | None = None, backend: str = "torch", adaptive: bool = False,
                 bundle_folders: Mapping[str, str | os.PathLike] | None = None):
        if weight_module is not None and weight_module.num_learners != len(learners):
            raise ValueError(f"weight module combines {weight_module.num_learners} learners, got {len(learners)}")
        if tuple(classes) != CLASSES:
            raise WeightsError(f"the learners predict {list(classes)}; this library's records, metrics and "
                               f"reports are for {list(CLASSES)}")
        self.classes = list(classes)
        self.segmenter = segmenter
        self.engine = PatchEngine(learners, k=k, patch_size=patch_size, normalization=normalization,
                                  device=segmenter.device if device == "auto" else device, amp=amp, seed=seed,
                                  scales=scales, adaptive=adaptive)
        self.weight_module = None if weight_module is None else weight_module.eval().cpu()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.batch_size, self.progress, self.explain_batch_size = batch_size, progress, explain_batch_size
        #: The weight module's bundle config when loaded from one (its fit K, training, calibration):
        #: kept so that :meth:`save_pretrained` writes it back.
        self.weight_module_record: dict | None = None
        #: Each learner's bundle config when loaded from bundles (its backbone, training record).
        self.learner_records: dict[str, dict] = {}
        folders = bundle_folders or {}
        self.backend = resolve_backend(backend, self.engine.device)
        self.engine.use_backend(self.backend, folders)
        self.segmenter.use_backend(self.backend, folders.get("segmenter"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device="auto", **kwargs) -> Pipeline:
        """Load a pipeline bundle by name (``"lite"``, the default; see `patchflannel.hub`)
        or by path. ``kwargs`` (``k``, ``seed``, ``batch_size``...) override
        the bundle's settings. Nothing is downloaded; missing or corrupt parts raise
        `WeightsError` saying which."""
        folder = resolve_bundle(path or default_bundle("pipeline"), "pipeline bundle")
        spec = read_pipeline_spec(folder)
        part = lambda key: None if spec.get(key) is None else folder / spec[key]
        settings = {k: spec[k] for k in ("k", "seed") if k in spec}
        return cls.from_bundles(part("segmenter"), part("learners"), part("ensemble"), device=device,
                                **{**settings, **kwargs})

    @classmethod
    def from_bundles(cls, segmenter: str | os.PathLike | None = None, learners: str | os.PathLike | None = None,
                     ensemble: str | os.PathLike | None = None, *, device="auto", **kwargs) -> Pipeline:
        """Build from separate bundle folders: a segmenter (default: the shipped one), a learner
        set (default: ``weights/learners-lite``) and a FLANNEL weight module (``None``: combine
        by the mean of the learners)."""
        from .ensemble.module import load_weight_module

        models, shared = load_learner_set(learners)
        # The data contract: a learner's patch size has its meaning on the film at its working
        # size, so that is the grid the segmenter writes.
        seg = Segmenter.from_bundle(segmenter, device=device, amp=kwargs.get("amp", True),
                                    working_size=shared["working_size"])
        module, temperature, module_config = None, 1.0, None
        if ensemble is not None:
            module, config = load_weight_module(ensemble)
            temperature, module_config = config.get("temperature", 1.0), config
            if config["learners"] != list(models):
                raise WeightsError(f"{ensemble} combines {config['learners']} but the learner set holds "
                                   f"{list(models)}; pass the learner folder it was fitted for")
            if config["classes"] != shared["classes"]:
                raise WeightsError(f"{ensemble} combines {config['classes']}, the learners predict {shared['classes']}")
            fit_k, k = config.get("fit_k") or (config.get("fitted_on") or {}).get("k"), kwargs.get("k", DEFAULT_K)
            if fit_k is not None and fit_k != k:
                log.warning("the weight module was fitted on %d patches per film and runs on %d: its inputs are "
                            "averages of another sharpness than it learned from", fit_k, k)
        kwargs.setdefault("temperature", temperature)
        folders = {**shared.get("folders", {}),
                   "segmenter": resolve_bundle(segmenter or default_bundle("segmenter"), "segmenter bundle")}
        pipe = cls(seg, models, weight_module=module, patch_size=shared["patch_size"], classes=shared["classes"],
                   scales=shared["working_sizes"], bundle_folders=folders,
                   normalization=Normalization(**shared["normalization"]), device=seg.device, **kwargs)
        pipe.weight_module_record, pipe.learner_records = module_config, shared["configs"]
        return pipe

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a self-contained pipeline bundle: ``segmenter/``, ``learners/<name>/``,
        ``ensemble/`` (when there is a weight module) and ``pipeline.json``."""
        from .bundle import write_bundle
        from .ensemble.module import save_weight_module
        from .learners.bundle import save_learner

        folder = Path(path)
        seg_config = {k: v for k, v in self.segmenter.config.items() if k not in ("weights_sha256", "weights_dtype")}
        write_bundle(folder / "segmenter", self.segmenter.torch_model, seg_config)
        for name, model, scale in zip(self.learner_names, self.engine.torch_models, self.engine.scales):
            record = self.learner_records.get(name, {})
            save_learner(folder / "learners" / name, getattr(model, "_orig_mod", model),
                         name=record.get("learner", name), patch_size=self.engine.patch_size,
                         working_size=scale or self.segmenter.working_size, normalization=self.engine.normalization,
                         extra={k: record[k] for k in ("input", "film_size", "training") if k in record})
        if self.weight_module is not None:
            record = self.weight_module_record or {}
            save_weight_module(folder / "ensemble", self.weight_module, learners=self.learner_names,
                               classes=self.classes, fit_k=record.get("fit_k"), temperature=self.temperature,
                               extra={k: record[k] for k in ("training", "fitted_on", "calibration") if k in record})
        spec = {"format": "patchflannel-pipeline", "segmenter": "segmenter", "learners": "learners",
                "ensemble": "ensemble" if self.weight_module is not None else None,
                "k": self.engine.k, "seed": self.engine.seed}
        write_pipeline_spec(folder, spec)

    @property
    def learner_names(self) -> list[str]:
        return self.engine.names

    def predict(self, inputs, *, explain: bool = False, progress: bool | None = None) -> Prediction | list[Prediction]:
        """Classify one input (path or grey/RGB array) or a sequence of them.

        Unreadable files and images without plausible lungs come back as predictions with a
        ``rejection`` (never an exception), so one bad input never stops a batch. With
        ``explain=True`` each accepted prediction carries Grad-CAM heatmaps (see
        `patchflannel.explain`; costs about three times the prediction itself).
        """
        single = isinstance(inputs, (str, os.PathLike, np.ndarray))
        items = [inputs] if single else list(inputs)
        out: list[Prediction] = []
        show = self.progress if progress is None else progress
        for start in tqdm(range(0, len(items), self.batch_size), desc="predicting", disable=not show, leave=False):
            out += self._predict_batch(items[start:start + self.batch_size], start, explain)
        return out[0] if single else out

    def _predict_batch(self, items: Sequence, offset: int, explain: bool = False) -> list[Prediction]:
        preds, images = [], []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"array[{offset + i}]"
            pred = Prediction(source=name)
            try:
                images.append(load_image(item) if isinstance(item, (str, os.PathLike))
                              else check_size(as_grey_float(item, name), name))
            except InvalidImageError as exc:
                pred.rejection = str(exc)
                images.append(None)
            preds.append(pred)
        readable = [i for i, im in enumerate(images) if im is not None]
        segs = self.segmenter.segment_batch([images[i] for i in readable], original_mask=False) if readable else []
        self._classify(preds, images, dict(zip(readable, segs)), explain)
        return preds

    def predict_segmented(self, images: Sequence[np.ndarray], segmentations: Sequence, *,
                          names: Sequence[str] | None = None, explain: bool = False) -> list[Prediction]:
        """Stage 2 only: classify decoded films (float grey, as `load_image`
        returns them) that this pipeline's segmenter has already segmented on its working grid
        (e.g. by the segment job, `patchflannel.segment.job.run_batch`), so nothing is
        segmented twice. Gives what `predict` gives for the same films."""
        if len(images) != len(segmentations):
            raise ValueError(f"{len(images)} images and {len(segmentations)} segmentations")
        names = list(names) if names is not None else [f"array[{i}]" for i in range(len(images))]
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            preds = [Prediction(source=names[i]) for i in chunk]
            self._classify(preds, [images[i] for i in chunk], {j: segmentations[i] for j, i in enumerate(chunk)},
                           explain)
            out += preds
        return out

    def _classify(self, preds: list[Prediction], images: list, segs: dict, explain: bool) -> None:
        """Fill ``preds`` from the segmentations ``segs`` (``{index: Segmentation}``) of ``images``."""
        todo = []
        for i, seg in segs.items():
            preds[i].lung_fraction, preds[i].mask = seg.lung_fraction, seg.working_mask
            if seg.rejection:
                preds[i].rejection = seg.rejection
            else:
                todo.append((i, seg))
        if not todo:
            return
        masked = np.stack([s.masked_working_image for _, s in todo])
        # Seeded by the decoded input, not the masked film: a mask pixel decided differently
        # (another device or precision) then moves only the centres that landed on it.
        seeds = [image_seed(images[i], self.engine.seed) for i, _ in todo]
        result = self.engine.predict(masked, np.stack([s.working_mask for _, s in todo]), seeds=seeds)
        probs = result.probs  # (n, L, C); NaN rows for images the engine rejected
        weights = combined = None
        if self.weight_module is not None:
            valid = ~torch.isnan(probs).flatten(1).any(1)
            combined = torch.full(probs[:, 0].shape, float("nan"))
            weights = torch.full(probs[:, :, 0].shape, float("nan"))
            combined[valid] = self.weight_module.predict_proba(probs[valid])
            with torch.no_grad():
                weights[valid] = self.weight_module.learner_weights(probs[valid])
        for j, (i, _) in enumerate(todo):
            pred = preds[i]
            if result.rejected[j]:
                pred.rejection = result.rejected[j]
                continue
            p = apply_temperature(combined[j] if combined is not None else probs[j].mean(0), self.temperature)
            pred.combiner = FLANNEL_ENSEMBLE if combined is not None else MEAN_OF_LEARNERS
            pred.probabilities = {c: round(float(v), 6) for c, v in zip(self.classes, p)}
            pred.label = self.classes[int(p.argmax())]
            pred.learners = {name: {"probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, probs[j, li])},
                                    "votes": {c: round(float(v), 4) for c, v in zip(self.classes, result.votes[j, li])},
                                    "label": self.classes[int(result.labels[j, li])]}
                             for li, name in enumerate(self.learner_names)}
            pred.uncertainty = uncertainty(p, probs[j], result.votes[j])
            if weights is not None:
                pred.learner_weights = {n: round(float(w), 6) for n, w in zip(self.learner_names, weights[j])}
            pred.patches = int(result.used[j])
            pred.centres = result.centres[j, :pred.patches].numpy()
            if explain:
                self._explain(pred, todo[j][1], masked[j])

    def _explain(self, pred: Prediction, seg, masked: np.ndarray) -> None:
        from .explain import lung_heatmap

        weights = list(pred.learner_weights.values()) if pred.learner_weights else None
        pred.heatmap, maps = lung_heatmap(self.engine.torch_models, self.engine.normalize, masked, seg.working_mask,
                                          pred.centres, self.classes.index(pred.label), patch_size=self.engine.patch_size,
                                          weights=weights, device=self.engine.device,
                                          batch_size=self.explain_batch_size, scales=self.engine.scales)
        pred.learner_heatmaps = dict(zip(self.learner_names, maps))
        pred.working_image = seg.working_image
