"""The records of an evaluation: per-case rows, metric options, the report and its summary.

These are the types that :mod:`medseg.evaluation.evaluate` produces and that the group
summaries (:mod:`medseg.evaluation.groups`) and the HTML report
(:mod:`medseg.evaluation.report`) read, so that neither needs the evaluator itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluation.metrics import DISTANCE_METRICS, OVERLAP_METRICS, check_empty_policy

LabelsArg = Mapping[int, str] | Sequence[tuple[int, str]]

STATISTICS = ("mean", "std", "median", "p5", "p25", "p75", "p95", "min", "max")
LESION_FIELDS = (
    "n_reference_lesions",
    "n_predicted_lesions",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
    "lesion_f1",
)


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


@dataclass(frozen=True, eq=False)
class CaseMetrics:
    """Scores of one class in one case (volumes in mm^3, mm^2 for 2D images; distances in mm).

    Equality treats NaN as equal to NaN (an undefined score matches itself).
    """

    case_id: str
    label: int
    label_name: str
    dice: float
    iou: float
    tp: int
    fp: int
    fn: int
    reference_voxels: int
    predicted_voxels: int
    reference_volume_mm3: float
    predicted_volume_mm3: float
    empty_reference: bool
    empty_prediction: bool
    precision: float = math.nan
    recall: float = math.nan
    specificity: float = math.nan
    volume_similarity: float = math.nan
    abs_volume_difference_mm3: float = math.nan
    rel_volume_difference: float = math.nan
    hd: float = math.nan
    hd95: float = math.nan
    assd: float = math.nan
    masd: float = math.nan
    nsd: float = math.nan
    boundary_iou: float = math.nan
    n_reference_lesions: int | None = None
    n_predicted_lesions: int | None = None
    lesion_tp: int | None = None
    lesion_fp: int | None = None
    lesion_fn: int | None = None
    lesion_f1: float | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CaseMetrics):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    def __hash__(self) -> int:
        return hash((self.case_id, self.label))


SCORE_FIELDS = (*OVERLAP_METRICS, *DISTANCE_METRICS, *LESION_FIELDS)
# The per-row scores that summaries describe, in table order.
SCORED_METRICS = tuple(
    m for m in (*OVERLAP_METRICS, *DISTANCE_METRICS, "lesion_f1") if m != "specificity"
) + ("specificity",)
_FLOAT_FIELDS = (*OVERLAP_METRICS, *DISTANCE_METRICS, "lesion_f1")


@dataclass(frozen=True)
class MetricOptions:
    """How the metrics of a case are computed (see :func:`evaluate_pairs`)."""

    distances: bool = True
    percentile: float = 95.0
    tolerance_mm: float = 2.0
    boundary_width_mm: float | None = None
    empty: str = "nan"
    max_distance_mm: float | None = None
    lesions: bool = False
    connectivity: int | None = None

    def __post_init__(self) -> None:
        check_empty_policy(self.empty)
        if not 0 < self.percentile <= 100:
            raise MedsegError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.tolerance_mm < 0:
            raise MedsegError(f"NSD tolerance must be >= 0 mm, got {self.tolerance_mm}")

    def describe(self) -> dict:
        """The options as written into summaries."""
        return {
            "empty_policy": self.empty,
            "distances": self.distances,
            "hd_percentile": self.percentile,
            "nsd_tolerance_mm": self.tolerance_mm,
            "boundary_width_mm": (
                self.tolerance_mm if self.boundary_width_mm is None else self.boundary_width_mm
            ),
            "max_distance_mm": self.max_distance_mm or "image diagonal",
            "lesions": self.lesions,
            "surface_definition": "surface-distance (DeepMind): marching-cubes surfels, area-weighted",
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Per-case metrics of the scored (foreground) labels and their summary.

    ``summary`` is JSON-ready: undefined statistics are ``None``.
    """

    labels: tuple[tuple[int, str], ...]
    cases: tuple[CaseMetrics, ...]
    summary: dict

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Case ids in the order of the rows."""
        return tuple(dict.fromkeys(row.case_id for row in self.cases))

    def mean_dice_per_case(self) -> dict[str, float]:
        """Mean Dice over classes per case, NaN where every class is empty in both masks."""
        scores: dict[str, list[float]] = {case_id: [] for case_id in self.case_ids}
        for row in self.cases:
            if not math.isnan(row.dice):
                scores[row.case_id].append(row.dice)
        return {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}

    def to_json(self) -> dict:
        """Strict-JSON dict (NaN scores become ``None``)."""
        rows = []
        for row in self.cases:
            data = {f.name: getattr(row, f.name) for f in fields(CaseMetrics)}
            for key in _FLOAT_FIELDS:
                value = data[key]
                data[key] = None if value is None or not math.isfinite(value) else value
            rows.append(data)
        return {
            "labels": [[value, name] for value, name in self.labels],
            "cases": rows,
            "summary": json.loads(json.dumps(self.summary)),
        }

    @classmethod
    def from_json(cls, data: dict) -> EvaluationReport:
        """Inverse of :meth:`to_json`."""
        rows = []
        for raw in data["cases"]:
            row = dict(raw)
            for key in _FLOAT_FIELDS:
                if key in row and not (key == "lesion_f1" and row.get("lesion_tp") is None):
                    row[key] = float("nan") if row[key] is None else float(row[key])
            rows.append(CaseMetrics(**row))
        return cls(
            labels=tuple((int(v), str(n)) for v, n in data["labels"]),
            cases=tuple(rows),
            summary=dict(data["summary"]),
        )


def _statistics(values: Sequence[float | None]) -> dict[str, float | None]:
    finite = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return dict.fromkeys(STATISTICS)
    p5, p25, p75, p95 = np.percentile(finite, [5, 25, 75, 95])
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "median": float(np.median(finite)),
        "p5": float(p5),
        "p25": float(p25),
        "p75": float(p75),
        "p95": float(p95),
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


def _class_summary(rows: Sequence[CaseMetrics], name: str) -> dict:
    summary = {
        "name": name,
        "n_cases": len(rows),
        "n_scored": sum(not math.isnan(row.dice) for row in rows),
        "n_empty_reference": sum(row.empty_reference for row in rows),
        "n_empty_prediction": sum(row.empty_prediction for row in rows),
        "n_both_empty": sum(row.empty_reference and row.empty_prediction for row in rows),
    }
    for metric in SCORED_METRICS:
        values = [getattr(row, metric) for row in rows]
        if any(v is not None and not math.isnan(v) for v in values) or metric in ("dice", "iou"):
            summary[metric] = _statistics(values)
    if any(row.lesion_tp is not None for row in rows):
        for key in ("lesion_tp", "lesion_fp", "lesion_fn"):
            summary[f"total_{key}"] = int(sum(getattr(row, key) or 0 for row in rows))
    return summary


def summarize(
    cases: Sequence[CaseMetrics], labels: Sequence[tuple[int, str]], warnings: Sequence[str] = ()
) -> dict:
    """Per-class statistics of every metric over cases (NaN ignored, empty cases counted).

    Statistics are ``mean, std`` (population), ``median, p5, p25, p75, p95,
    min, max``; ``mean_foreground_dice`` is the mean over classes of the
    per-class means (``mean_over_classes`` gives it for every metric);
    ``n_empty`` counts the (case, class) rows with an empty mask.
    """
    n_cases = len({row.case_id for row in cases})
    per_class = {
        str(value): _class_summary([row for row in cases if row.label == value], name)
        for value, name in labels
    }

    def mean_of_means(metric: str) -> float | None:
        means = [
            c[metric]["mean"]
            for c in per_class.values()
            if metric in c and c[metric]["mean"] is not None
        ]
        return float(np.mean(means)) if means else None

    metrics = [m for m in SCORED_METRICS if any(m in c for c in per_class.values())]
    return {
        "n_cases": n_cases,
        "labels": {str(value): name for value, name in labels},
        "per_class": per_class,
        "mean_foreground_dice": mean_of_means("dice"),
        "mean_foreground_iou": mean_of_means("iou"),
        "mean_over_classes": {m: mean_of_means(m) for m in metrics},
        "n_empty": {
            "reference": sum(row.empty_reference for row in cases),
            "prediction": sum(row.empty_prediction for row in cases),
            "both": sum(row.empty_reference and row.empty_prediction for row in cases),
        },
        "warnings": list(warnings),
    }
