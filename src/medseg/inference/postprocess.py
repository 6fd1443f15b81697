"""Postprocessing of predicted label maps: probability thresholds and the choice recorded in a
model folder (``postprocessing.json``, chosen by :mod:`medseg.inference.postprocess_selection`).

The operations themselves (components, holes, morphology) are in :mod:`medseg.imaging`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.imaging.components import keep_largest_components, remove_small_components
from medseg.imaging.morphology import fill_holes

FILENAME = "postprocessing.json"


@dataclass(frozen=True)
class PostprocessConfig:
    """Postprocessing recorded in a model folder (classes are label values)."""

    thresholds: dict[int, float] = field(default_factory=dict)
    largest_component: tuple[int, ...] = ()
    min_volume_mm3: dict[int, float] = field(default_factory=dict)
    fill_holes: tuple[int, ...] = ()
    selection: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.thresholds or self.largest_component or self.min_volume_mm3 or self.fill_holes
        )

    def to_json(self) -> dict:
        return {
            "thresholds": {str(k): v for k, v in self.thresholds.items()},
            "largest_component": list(self.largest_component),
            "min_volume_mm3": {str(k): v for k, v in self.min_volume_mm3.items()},
            "fill_holes": list(self.fill_holes),
            "selection": self.selection,
        }

    @classmethod
    def from_json(cls, data: dict) -> PostprocessConfig:
        return cls(
            thresholds={int(k): float(v) for k, v in data.get("thresholds", {}).items()},
            largest_component=tuple(int(c) for c in data.get("largest_component", ())),
            min_volume_mm3={int(k): float(v) for k, v in data.get("min_volume_mm3", {}).items()},
            fill_holes=tuple(int(c) for c in data.get("fill_holes", ())),
            selection=dict(data.get("selection", {})),
        )


def read_postprocessing(model_dir: str | os.PathLike) -> PostprocessConfig | None:
    """The model folder's ``postprocessing.json``, or None when there is none."""
    path = Path(model_dir) / FILENAME
    if not path.exists():
        return None
    try:
        return PostprocessConfig.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as exc:
        raise MedsegError(f"{path}: not a valid postprocessing file ({exc})") from None


def apply_postprocessing(
    label: np.ndarray, config: PostprocessConfig, *, spacing: tuple[float, ...] | None = None
) -> np.ndarray:
    """Components and holes of ``config`` (thresholds act earlier, on probabilities)."""
    if config.largest_component:
        label = keep_largest_components(label, k=1, classes=config.largest_component)
    for c, volume in sorted(config.min_volume_mm3.items()):
        label = remove_small_components(label, min_volume_mm3=volume, spacing=spacing, classes=[c])
    if config.fill_holes:
        label = fill_holes(label, classes=config.fill_holes)
    return label


def threshold_probabilities(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary mask (uint8) of ``probability >= threshold``."""
    return (np.asarray(probability) >= threshold).astype(np.uint8)


def tune_threshold(
    probabilities: Iterable[np.ndarray],
    references: Iterable[np.ndarray],
    *,
    thresholds: Iterable[float] | None = None,
) -> tuple[float, dict[float, float]]:
    """The probability threshold that maximizes the pooled Dice over validation cases.

    Parameters
    ----------
    probabilities
        Foreground probability maps, one per case.
    references
        Binary reference masks of the same shapes.
    thresholds
        Candidates (default 0.05, 0.10, ..., 0.95).

    Returns
    -------
    best, scores
        The best threshold (the smallest one on ties) and the Dice of each candidate,
        computed from true/false positives summed over all cases.
    """
    candidates = sorted(
        float(t) for t in (thresholds if thresholds is not None else np.arange(1, 20) / 20)
    )
    if not candidates:
        raise MedsegError("no candidate thresholds given")
    tp = np.zeros(len(candidates))
    fp = np.zeros(len(candidates))
    fn = np.zeros(len(candidates))
    n = 0
    for prob, ref in zip(probabilities, references, strict=True):
        prob, ref = np.asarray(prob, dtype=float), np.asarray(ref) > 0
        if prob.shape != ref.shape:
            raise MedsegError(
                f"probability map shape {prob.shape} differs from reference {ref.shape}"
            )
        n += 1
        for i, t in enumerate(candidates):
            pred = prob >= t
            tp[i] += np.count_nonzero(pred & ref)
            fp[i] += np.count_nonzero(pred & ~ref)
            fn[i] += np.count_nonzero(~pred & ref)
    if n == 0:
        raise MedsegError("no cases given to tune the threshold on")
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
    scores = {t: float(d) for t, d in zip(candidates, dice, strict=True)}
    return candidates[int(np.argmax(dice))], scores
