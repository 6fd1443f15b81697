"""Calibration of predicted probabilities: expected calibration error and reliability diagrams.

The ECE is the top-label one of Guo et al. (2017): voxels are binned by the probability of
their predicted class (confidence) into 15 equal-width bins on [0, 1]; ECE is the mean, over
voxels, of |accuracy - confidence| of their bin. It is reported twice:

* ``whole``: every voxel of the image (dominated by easy background voxels);
* ``bbox``: the voxels inside the bounding box of the reference foreground (all classes but
  background; the prediction's foreground when the reference has none), where the errors are.

Evaluating a prediction folder that holds ``<case>_probabilities.nii.gz`` or ``.npz``
(``medseg predict --probabilities``) adds both to the summary and a reliability diagram to
the HTML report.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.inference.uncertainty import read_probabilities

ECE_BINS = 15
REGIONS = ("whole", "bbox")
PROBABILITY_SUFFIXES = ("_probabilities.nii.gz", "_probabilities.npz")


@dataclass
class Reliability:
    """Per-bin voxel counts, summed confidence and summed accuracy; add cases with :meth:`add`."""

    bins: int = ECE_BINS
    counts: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.confidence = np.zeros(self.bins, dtype=np.float64)
        self.correct = np.zeros(self.bins, dtype=np.float64)

    def add_confidences(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Add voxels by their confidence (probability of the predicted class) and correctness."""
        confidence = np.asarray(confidence, dtype=np.float64).ravel()
        correct = np.asarray(correct, dtype=np.float64).ravel()
        # bin i holds (i/B, (i+1)/B]; confidence 0 goes to the first bin
        index = np.clip(np.ceil(confidence * self.bins).astype(np.int64) - 1, 0, self.bins - 1)
        self.counts += np.bincount(index, minlength=self.bins)
        self.confidence += np.bincount(index, weights=confidence, minlength=self.bins)
        self.correct += np.bincount(index, weights=correct, minlength=self.bins)

    def add(self, probs: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the voxels of ``(K, *S)`` probabilities against a label map (inside ``mask``)."""
        predicted = np.argmax(probs, axis=0)
        confidence = np.take_along_axis(probs, predicted[None], axis=0)[0]
        correct = predicted == reference
        if mask is not None:
            confidence, correct = confidence[mask], correct[mask]
        self.add_confidences(confidence, correct)

    def merge(self, other: Reliability) -> None:
        self.counts += other.counts
        self.confidence += other.confidence
        self.correct += other.correct

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def ece(self) -> float:
        """Expected calibration error (NaN without voxels)."""
        if self.total == 0:
            return float("nan")
        gap = np.abs(self.correct - self.confidence)  # = n_b * |acc_b - conf_b|
        return float(gap.sum() / self.total)

    def curve(self) -> list[dict[str, float | int]]:
        """Per bin: its range, voxel count, mean confidence and accuracy (None when empty)."""
        rows = []
        for b in range(self.bins):
            n = int(self.counts[b])
            rows.append(
                {
                    "low": b / self.bins,
                    "high": (b + 1) / self.bins,
                    "count": n,
                    "confidence": float(self.confidence[b] / n) if n else None,
                    "accuracy": float(self.correct[b] / n) if n else None,
                }
            )
        return rows


def expected_calibration_error(
    probs: np.ndarray,
    reference: np.ndarray,
    *,
    bins: int = ECE_BINS,
    mask: np.ndarray | None = None,
) -> float:
    """Top-label ECE of ``(K, *S)`` probabilities against a label map, in ``bins`` bins."""
    rel = Reliability(bins)
    rel.add(probs, reference, mask)
    return rel.ece()


def foreground_bbox_mask(reference: np.ndarray, prediction: np.ndarray | None = None) -> np.ndarray:
    """Mask of the bounding box of the reference foreground (else the prediction's; else all)."""
    fg = reference > 0
    if not fg.any() and prediction is not None:
        fg = prediction > 0
    mask = np.zeros(reference.shape, dtype=bool)
    if not fg.any():
        mask[...] = True
        return mask
    where = np.nonzero(fg)
    mask[tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)] = True
    return mask


def case_calibration(
    probs: np.ndarray, reference: np.ndarray, *, bins: int = ECE_BINS
) -> dict[str, Reliability]:
    """``{"whole": ..., "bbox": ...}`` reliability of one case."""
    whole, box = Reliability(bins), Reliability(bins)
    whole.add(probs, reference)
    box.add(probs, reference, foreground_bbox_mask(reference, np.argmax(probs, axis=0)))
    return {"whole": whole, "bbox": box}


def probability_files(pred_dir: str | os.PathLike) -> dict[str, Path]:
    """``<case>_probabilities.nii.gz`` / ``.npz`` files of a prediction folder, by case id."""
    found = {}
    for path in sorted(Path(pred_dir).iterdir()):
        for suffix in PROBABILITY_SUFFIXES:
            if path.name.endswith(suffix) and not path.name.startswith("."):
                found[path.name[: -len(suffix)]] = path
    return found


def folder_calibration(
    probability_paths: Mapping[str, Path],
    references: Mapping[str, np.ndarray],
    *,
    bins: int = ECE_BINS,
) -> tuple[dict, dict[str, Reliability]]:
    """Pooled and per-case ECE of probability files against reference label arrays.

    Returns
    -------
    tuple
        ``(summary, pooled)``: the summary (``bins``, pooled ``ece_whole`` and ``ece_bbox``,
        their per-case means, ``cases``) and the pooled :class:`Reliability` per region.
    """
    pooled = {r: Reliability(bins) for r in REGIONS}
    per_case = {}
    for case_id in sorted(set(probability_paths) & set(references)):
        probs = read_probabilities(probability_paths[case_id])
        ref = references[case_id]
        if probs.shape[1:] != ref.shape:
            continue
        rel = case_calibration(probs, ref, bins=bins)
        for r in REGIONS:
            pooled[r].merge(rel[r])
        per_case[case_id] = {f"ece_{r}": rel[r].ece() for r in REGIONS}
    summary = {
        "bins": bins,
        "cases": len(per_case),
        "ece_whole": pooled["whole"].ece(),
        "ece_bbox": pooled["bbox"].ece(),
        "mean_case_ece_whole": _mean([v["ece_whole"] for v in per_case.values()]),
        "mean_case_ece_bbox": _mean([v["ece_bbox"] for v in per_case.values()]),
        "regions": {
            "whole": "every voxel of the image",
            "bbox": "inside the bounding box of the reference foreground",
        },
        "per_case": per_case,
        "reliability": {r: pooled[r].curve() for r in REGIONS},
    }
    return summary, pooled


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else None


def reliability_diagram_png(curves: Mapping[str, Reliability], *, title: str = "") -> bytes:
    """Reliability diagram: accuracy against confidence per bin, one line per named curve."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6, 4.2), dpi=100)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for name, rel in curves.items():
        x = [r["confidence"] for r in rel.curve() if r["count"]]
        y = [r["accuracy"] for r in rel.curve() if r["count"]]
        ax.plot(x, y, marker="o", markersize=3, label=f"{name} (ECE {rel.ece():.4f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def calibration_section_html(summary: Mapping, pooled: Mapping[str, Reliability]) -> str:
    """An HTML section (ECE table and reliability diagram) for the evaluation report."""
    import base64

    png = reliability_diagram_png(
        {f"{r} ({summary['regions'][r]})": pooled[r] for r in REGIONS},
        title=f"{summary['cases']} cases, {summary['bins']} bins",
    )
    rows = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{html.escape(summary['regions'][r])}</td>"
        f"<td>{_fmt(summary[f'ece_{r}'])}</td><td>{_fmt(summary[f'mean_case_ece_{r}'])}</td></tr>"
        for r in REGIONS
    )
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<p>Top-label expected calibration error, {summary['bins']} equal-width bins, "
        f"over {summary['cases']} cases with probability files.</p>"
        "<table><tr><th>region</th><th>voxels</th><th>ECE (pooled)</th>"
        f"<th>ECE (mean of cases)</th></tr>{rows}</table>"
        f"<img alt='reliability diagram' src='data:image/png;base64,{data}'>"
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4f}"
