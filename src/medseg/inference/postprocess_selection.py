"""Choose postprocessing on validation folds (as nnU-Net does) and apply it at prediction time.

Each option is tried class by class on the cross-validation predictions and kept
only when it raises that class's mean Dice over the validation cases:

1. a probability threshold per class (candidates from
   :func:`medseg.inference.postprocess.tune_threshold`),
2. keeping the largest connected component,
3. removing components smaller than a volume in mm^3 (candidates are fractions
   of the smallest reference component of that class),
4. filling enclosed holes.

The result is ``postprocessing.json`` in the model folder; :class:`Predictor`
reads it and applies it to every prediction (``--no-postprocess`` turns it off).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.imaging.components import (
    component_sizes,
    keep_largest_components,
    label_components,
    remove_small_components,
)
from medseg.imaging.morphology import fill_holes
from medseg.imaging.overlap import dice
from medseg.inference.postprocess import FILENAME, PostprocessConfig, tune_threshold
from medseg.inference.predictor import Predictor, resample_to, restore_geometry, uncrop
from medseg.io.dataset import DatasetSpec, read_case_image, read_case_label
from medseg.model_folder import ModelFolder
from medseg.preprocessing.preprocess import CaseGeometry
from medseg.progress import progress
from medseg.serialization import write_json_atomic
from medseg.training.splits import read_splits

MIN_GAIN = 1e-4  # a Dice change smaller than this is noise, not an improvement


def _mean_dice(labels: list[np.ndarray], refs: list[np.ndarray], c: int) -> float:
    values = [dice(lab == c, ref == c) for lab, ref in zip(labels, refs, strict=True)]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _labels_from_probs(probs: np.ndarray, thresholds: dict[int, float]) -> np.ndarray:
    shape = probs.shape[1:]
    geometry = CaseGeometry(
        shape, (1.0,) * len(shape), (0.0,) * len(shape), (), tuple((0, n) for n in shape), shape
    )
    return restore_geometry(torch.from_numpy(probs), geometry, thresholds=thresholds)


def _smallest_component_mm3(refs: list[np.ndarray], spacings: list, c: int) -> float | None:
    smallest = None
    for ref, spacing in zip(refs, spacings, strict=True):
        mask = ref == c
        if not mask.any():
            continue
        sizes = component_sizes(label_components(mask))[1:]
        sizes = sizes[sizes > 0]
        if sizes.size:
            v = float(sizes.min()) * float(np.prod(spacing))
            smallest = v if smallest is None else min(smallest, v)
    return smallest


def choose_postprocessing(
    references: list[np.ndarray],
    *,
    num_classes: int,
    probabilities: list[np.ndarray] | None = None,
    labels: list[np.ndarray] | None = None,
    spacings: list[tuple[float, ...]] | None = None,
) -> PostprocessConfig:
    """Greedy per-class selection of postprocessing that raises validation Dice.

    Parameters
    ----------
    references
        Reference label maps of the validation cases.
    num_classes
        Number of classes, background included.
    probabilities
        ``(K, *S)`` class probabilities of each case on the reference grid; needed
        for threshold tuning (without them thresholds are not tried).
    labels
        Predicted label maps (default: the argmax of ``probabilities``).
    spacings
        Voxel sizes (mm) per case, for the component volumes.

    Returns
    -------
    PostprocessConfig
        The accepted operations; ``selection`` holds every trial's Dice before/after.
    """
    if not references:
        raise MedsegError("no validation cases to choose postprocessing on")
    if labels is None:
        if probabilities is None:
            raise MedsegError("choose_postprocessing needs probabilities or labels")
        labels = [_labels_from_probs(p, {}) for p in probabilities]
    spacings = spacings or [(1.0,) * references[0].ndim] * len(references)
    classes = range(1, num_classes)
    before = {c: _mean_dice(labels, references, c) for c in classes}
    trials: list[dict] = []
    current = list(labels)

    def trial(op: str, c: int, candidate: list[np.ndarray], value=None) -> bool:
        old, new = _mean_dice(current, references, c), _mean_dice(candidate, references, c)
        ok = bool(np.isfinite(new) and np.isfinite(old) and new > old + MIN_GAIN)
        trials.append(
            {
                "operation": op,
                "class": c,
                "value": value,
                "dice_before": old,
                "dice_after": new,
                "accepted": ok,
            }
        )
        if ok:
            current[:] = candidate
        return ok

    thresholds: dict[int, float] = {}
    if probabilities is not None:
        for c in classes:
            t, _ = tune_threshold([p[c] for p in probabilities], [r == c for r in references])
            candidate = [_labels_from_probs(p, {**thresholds, c: t}) for p in probabilities]
            if trial("threshold", c, candidate, t):
                thresholds[c] = t
    largest: list[int] = []
    min_volume: dict[int, float] = {}
    holes: list[int] = []
    for c in classes:
        candidate = [keep_largest_components(lab, k=1, classes=[c]) for lab in current]
        if trial("largest_component", c, candidate):
            largest.append(c)
            continue  # nothing small is left to remove
        smallest = _smallest_component_mm3(references, spacings, c)
        if smallest is None:
            continue
        best: tuple[float, list[np.ndarray]] | None = None
        best_dice = _mean_dice(current, references, c)
        for fraction in (0.05, 0.1, 0.25, 0.5):
            volume = round(fraction * smallest, 3)
            candidate = [
                remove_small_components(lab, min_volume_mm3=volume, spacing=s, classes=[c])
                for lab, s in zip(current, spacings, strict=True)
            ]
            d = _mean_dice(candidate, references, c)
            if np.isfinite(d) and d > best_dice:
                best, best_dice = (volume, candidate), d
        if best is not None and trial("min_volume_mm3", c, best[1], best[0]):
            min_volume[c] = best[0]
    for c in classes:
        if trial("fill_holes", c, [fill_holes(lab, classes=[c]) for lab in current]):
            holes.append(c)
    after = {c: _mean_dice(current, references, c) for c in classes}
    return PostprocessConfig(
        thresholds=thresholds,
        largest_component=tuple(largest),
        min_volume_mm3=min_volume,
        fill_holes=tuple(holes),
        selection={
            "cases": len(references),
            "dice_before": {str(c): v for c, v in before.items()},
            "dice_after": {str(c): v for c, v in after.items()},
            "trials": trials,
        },
    )


def select_postprocessing(
    model_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror_axes: tuple[int, ...] = (),
    device: str = "auto",
    max_cases: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> PostprocessConfig:
    """Predict each fold's validation cases with that fold and record the best postprocessing.

    Needs the model folder's ``splits.json`` and ``dataset.json`` (written by
    ``medseg train``). Writes ``postprocessing.json`` there (refuses to replace one
    without ``overwrite``).
    """
    model_dir = Path(model_dir)
    out = model_dir / FILENAME
    if out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists (use --overwrite to choose again)")
    for name in ("splits.json", "dataset.json"):
        if not (model_dir / name).exists():
            raise MedsegError(f"{model_dir / name}: missing (train the model with medseg first)")
    spec = DatasetSpec.from_json(json.loads((model_dir / "dataset.json").read_text()))
    splits = read_splits(model_dir / "splits.json")
    folds = ModelFolder.open(model_dir).select_folds(folds)
    probabilities, references, spacings = [], [], []
    for fold in folds:
        predictor = Predictor(model_dir, folds=[fold], device=device)
        predictor.postprocessing = None  # choose from the raw network output
        val_ids = splits[fold]["val"][:max_cases] if max_cases else splits[fold]["val"]
        for case_id in progress(val_ids, desc=f"validation fold {fold}", enabled=show_progress):
            case = spec.case(case_id)
            channels = read_case_image(spec, case)
            data, geometry = predictor.prepare(channels)
            probs = predictor.probabilities(data, mirror_axes=mirror_axes)
            full = np.zeros((probs.shape[0], *geometry.shape), dtype=np.float32)
            full[0] = 1.0  # outside the crop is background
            for c in range(probs.shape[0]):
                full[c] = uncrop(resample_to(probs[c].float(), geometry), geometry)
                if c == 0:
                    inside = np.zeros(geometry.shape, dtype=bool)
                    inside[tuple(slice(a, b) for a, b in geometry.bbox)] = True
                    full[0][~inside] = 1.0
            probabilities.append(full)
            references.append(read_case_label(spec, case).array)
            spacings.append(channels[0].spacing)
    config = choose_postprocessing(
        references,
        num_classes=predictor.plan.num_classes,
        probabilities=probabilities,
        spacings=spacings,
    )
    config = PostprocessConfig(
        **{
            **config.__dict__,
            "selection": {
                **config.selection,
                "folds": list(folds),
                "mirror_axes": list(mirror_axes),
            },
        }
    )
    write_json_atomic(config.to_json(), out)
    return config
