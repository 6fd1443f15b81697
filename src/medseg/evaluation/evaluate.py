"""Evaluation of predicted label maps against references: per-case rows and a summary.

Background (label 0) is never scored. Every row holds overlap metrics (Dice,
IoU, precision, recall, specificity, volume similarity and differences) and,
unless ``distances=False``, surface metrics in mm (HD, HD95, ASSD, MASD, NSD,
boundary IoU; see :mod:`medseg.evaluation.distances`). Empty masks follow the
policy chosen with ``empty=`` (``"nan"``, nnU-Net's, by default; or
``"penalty"``, BraTS-style; see :mod:`medseg.evaluation.metrics`) and every
row says so with ``empty_reference`` and ``empty_prediction``; summaries
ignore NaN values but count the empty cases.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluation.metrics import (
    DISTANCE_METRICS,
    OVERLAP_METRICS,
    check_empty_policy,
    compute_metrics,
    distance_scores,
    lesion_counts,
    overlap_scores,
    present_values,
)
from medseg.io.dataset import _parse_labels
from medseg.io.files import image_suffix, read_image, read_image_channels, strip_suffix
from medseg.io.image import Image
from medseg.progress import progress
from medseg.serialization import write_json_atomic

LabelsArg = Mapping[int, str] | Sequence[tuple[int, str]]

GEOMETRY_TOLERANCE = 1e-3
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
STATISTICS = ("mean", "std", "median", "p5", "p25", "p75", "p95", "min", "max")
LESION_FIELDS = (
    "n_reference_lesions",
    "n_predicted_lesions",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
    "lesion_f1",
)
_MAX_NAMED = 20  # case names listed in one error or warning line


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


_SCORE_FIELDS = (*OVERLAP_METRICS, *DISTANCE_METRICS, *LESION_FIELDS)
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


@dataclass(frozen=True)
class _CaseCounts:
    case_id: str
    scores: dict[int, dict]  # value -> compute_metrics row (+ counts) for values present
    voxel_volume: float
    n_voxels: int
    ndim: int
    max_distance_mm: float


def normalize_labels(labels: LabelsArg) -> tuple[tuple[int, str], ...]:
    """Scored labels as sorted ``(value, name)`` pairs, background (0) left out.

    Parameters
    ----------
    labels
        ``{value: name}`` (keys may be digit strings) or ``{name: value}``,
        ``(value, name)`` pairs, or bare values (named ``label_<v>``).
    """
    if isinstance(labels, Mapping):  # {value: name} or nnU-Net v2's {name: value}
        labels = _parse_labels(dict(labels), Path("labels"))
    pairs: dict[int, str] = {}
    for item in labels:
        value, name = (item, None) if isinstance(item, (int, np.integer)) else item
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise MedsegError(f"label value {value!r} is not an integer") from None
        if value in pairs:
            raise MedsegError(f"label {value} is given twice")
        pairs[value] = str(name) if name is not None else f"label_{value}"
    scored = tuple(sorted((v, n) for v, n in pairs.items() if v != 0))
    if not scored:
        raise MedsegError("no foreground labels to evaluate (only background was given)")
    return scored


def labels_from_dataset_json(path: str | os.PathLike) -> tuple[tuple[int, str], ...]:
    """Scored labels from a dataset.json (MSD or nnU-Net v2 style), background left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise MedsegError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read dataset.json ({exc})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise MedsegError(f"{path}: missing 'labels'")
    return normalize_labels(_parse_labels(meta["labels"], path))


def _label_array(array: np.ndarray, what: str, keep_255: bool) -> np.ndarray:
    """Integer label map: booleans and integer-valued floats accepted, 0/255 masks made binary."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            bad = array[~(rounded == array)].flat[0]
            raise MedsegError(f"{what}: label values must be integers, found {bad}")
        low, high = (rounded.min(), rounded.max()) if rounded.size else (0, 0)
        dtype = np.uint8 if low >= 0 and high < 256 else np.int64
        array = rounded.astype(dtype)
    elif array.dtype.kind not in "iu":
        raise MedsegError(f"{what}: label maps need integer values, got dtype {array.dtype}")
    if not keep_255:
        values = present_values(array)
        if 255 in values and set(values.tolist()) <= {0, 255}:
            array = (array == 255).astype(np.uint8)
    return array


def _format_tuple(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _geometry_difference(pred: Image, ref: Image) -> str | None:
    for name in ("spacing", "origin", "direction"):
        a, b = getattr(pred, name), getattr(ref, name)
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE, rtol=0):
            return f"{name} {_format_tuple(a)} vs {_format_tuple(b)}"
    return None


def _resample_like(pred: Image, ref: Image) -> Image:
    """The prediction on the reference's grid (nearest neighbour, 0 outside)."""
    import SimpleITK as sitk

    from medseg.io.files import from_sitk, to_sitk

    if pred.ndim != ref.ndim:
        raise MedsegError(f"prediction is {pred.ndim}D, reference {ref.ndim}D: cannot resample")
    moved = sitk.Resample(
        to_sitk(pred), to_sitk(ref), sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    return ref.with_array(from_sitk(moved).array)


def _count_case(
    case_id: str,
    pred: Image,
    ref: Image,
    keep_255: bool,
    options: MetricOptions | None = None,
    resample: bool = False,
) -> _CaseCounts:
    options = options or MetricOptions()
    if resample and (pred.shape != ref.shape or _geometry_difference(pred, ref)):
        pred = _resample_like(pred, ref)
    if pred.shape != ref.shape:
        raise MedsegError(
            f"case {case_id}: prediction shape {pred.shape} differs from reference shape {ref.shape}"
        )
    difference = _geometry_difference(pred, ref)
    if difference:
        raise MedsegError(
            f"case {case_id}: prediction geometry differs from the reference ({difference})"
        )
    pred_array = _label_array(pred.array, f"case {case_id} prediction", keep_255)
    ref_array = _label_array(ref.array, f"case {case_id} reference", keep_255)
    values = set(present_values(pred_array).tolist()) | set(present_values(ref_array).tolist())
    values.discard(0)
    max_distance = options.max_distance_mm or float(
        np.linalg.norm(np.multiply(ref.shape, ref.spacing))
    )
    scores = compute_metrics(
        pred_array,
        ref_array,
        labels=sorted(values),
        spacing=ref.spacing,
        distances=options.distances,
        percentile=options.percentile,
        tolerance_mm=options.tolerance_mm,
        boundary_width_mm=options.boundary_width_mm,
        empty=options.empty,
        max_distance_mm=max_distance,
    )
    if options.lesions:
        for value in values:
            scores[value].update(
                lesion_counts(
                    pred_array == value, ref_array == value, connectivity=options.connectivity
                )
            )
    return _CaseCounts(
        case_id=case_id,
        scores=scores,
        voxel_volume=float(np.prod(ref.spacing)),
        n_voxels=int(ref_array.size),
        ndim=ref_array.ndim,
        max_distance_mm=max_distance,
    )


def _absent_scores(case: _CaseCounts, options: MetricOptions) -> dict:
    """Scores of a class absent from both masks, under the chosen empty policy."""
    row: dict = dict(overlap_scores(0, 0, 0, case.n_voxels, empty=options.empty))
    if options.distances:
        nothing = np.zeros((1,) * case.ndim, dtype=bool)
        row.update(
            distance_scores(
                nothing,
                nothing,
                spacing=(1.0,) * case.ndim,
                empty=options.empty,
                max_distance_mm=case.max_distance_mm,
            )
        )
    if options.lesions:
        row.update(
            lesion_counts(np.zeros((1,) * case.ndim, bool), np.zeros((1,) * case.ndim, bool))
        )
    row.update(empty_reference=True, empty_prediction=True, tp=0, fp=0, fn=0)
    return row


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


def _name_list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


def _build_report(
    counts: Sequence[_CaseCounts],
    labels: tuple[tuple[int, str], ...] | None,
    options: MetricOptions | None = None,
) -> EvaluationReport:
    options = options or MetricOptions()
    if labels is None:
        found = sorted({v for c in counts for v in c.scores})
        if not found:
            raise MedsegError("no foreground label found in any prediction or reference")
        labels = tuple((v, f"label_{v}") for v in found)
    label_values = {v for v, _ in labels}
    unknown: dict[int, list[str]] = {}
    rows = []
    for case in counts:
        for value in sorted(set(case.scores) - label_values):
            unknown.setdefault(value, []).append(case.case_id)
        for value, name in labels:
            scores = case.scores.get(value) or _absent_scores(case, options)
            tp, fp, fn = scores["tp"], scores["fp"], scores["fn"]
            predicted, reference = tp + fp, tp + fn
            rows.append(
                CaseMetrics(
                    case_id=case.case_id,
                    label=value,
                    label_name=name,
                    tp=tp,
                    fp=fp,
                    fn=fn,
                    reference_voxels=reference,
                    predicted_voxels=predicted,
                    reference_volume_mm3=reference * case.voxel_volume,
                    predicted_volume_mm3=predicted * case.voxel_volume,
                    empty_reference=reference == 0,
                    empty_prediction=predicted == 0,
                    **{k: scores[k] for k in _SCORE_FIELDS if k in scores},
                )
            )
    warnings = [
        f"value {value} is not one of the labels and was not scored (cases: {_name_list(ids)})"
        for value, ids in sorted(unknown.items())
    ]
    summary = summarize(rows, labels, warnings)
    summary["settings"] = options.describe()
    return EvaluationReport(labels=labels, cases=tuple(rows), summary=summary)


def evaluate_pairs(
    pairs: Sequence[tuple[str, Image, Image]],
    *,
    labels: LabelsArg,
    resample: bool = False,
    show_progress: bool = False,
    **options: Any,
) -> EvaluationReport:
    """Score ``(case_id, prediction, reference)`` pairs.

    Parameters
    ----------
    pairs
        Each prediction must have the reference's shape and geometry (spacing,
        origin, direction within 1e-3) unless ``resample`` is True: then it is
        resampled onto the reference's grid (nearest neighbour).
    labels
        ``{value: name}`` or ``(value, name)`` pairs; background (0) is not scored.
        Label maps that hold only 0 and 255 are read as binary (255 -> 1)
        unless 255 is one of the labels.
    show_progress
        A progress bar over cases.
    **options
        Keyword options of the metrics (see :class:`MetricOptions`): ``distances``
        (default True), ``percentile`` (95), ``tolerance_mm`` (2), ``boundary_width_mm``,
        ``empty`` (``"nan"`` or ``"penalty"``), ``max_distance_mm``, ``lesions``
        (False), ``connectivity``.
    Returns
    -------
    EvaluationReport
        Rows for every case and label (NaN scores where a class is absent from
        both masks), and their summary.

    Raises
    ------
    MedsegError
        Naming the case whose shape or geometry differs, or whose values are not integers.
    """
    metric_options = _metric_options(options)
    scored = normalize_labels(labels)
    keep_255 = any(v == 255 for v, _ in scored)
    case_ids = [case_id for case_id, _, _ in pairs]
    repeated = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if repeated:
        raise MedsegError(f"case ids repeat: {_name_list(repeated)}")
    counts = [
        _count_case(case_id, pred, ref, keep_255, metric_options, resample)
        for case_id, pred, ref in progress(
            pairs, total=len(pairs), desc="evaluate", enabled=show_progress
        )
    ]
    return _build_report(counts, scored, metric_options)


def _metric_options(options: Mapping[str, Any]) -> MetricOptions:
    known = {f.name for f in fields(MetricOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown metric option(s): {', '.join(unknown)}")
    return MetricOptions(**options)


def _list_cases(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedsegError(f"{folder}: {role} folder not found")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not image_suffix(path):
            continue
        case_id = strip_suffix(path)
        if case_id in cases:
            raise MedsegError(
                f"{folder}: two files for case {case_id}: {cases[case_id].name} and {path.name}"
            )
        cases[case_id] = path
    return cases


def _resolve_labels(
    labels: LabelsArg | str | os.PathLike | None, ref_dir: Path
) -> tuple[tuple[tuple[int, str], ...] | None, str]:
    if labels is None:
        for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
            if candidate.is_file():
                return labels_from_dataset_json(candidate), str(candidate)
        return None, "values found"
    if isinstance(labels, (str, os.PathLike)):
        return labels_from_dataset_json(labels), str(labels)
    return normalize_labels(labels), "given"


def _output_paths(output_dir: Path) -> list[Path]:
    return [output_dir / name for name in (METRICS_FILE, SUMMARY_FILE, REPORT_FILE)]


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise MedsegError(
            f"{existing[0]}: already exists (use --overwrite to replace it)"
            + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
        )


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    *,
    labels: LabelsArg | str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    images_dir: str | os.PathLike | None = None,
    curves_png: str | os.PathLike | None = None,
    title: str | None = None,
    groups: Mapping[str, Mapping[str, str] | str] | str | os.PathLike | None = None,
    resample: bool = False,
    allow_missing: bool = False,
    show_progress: bool = False,
    **options: Any,
) -> EvaluationReport:
    """Score every reference in ``ref_dir`` against the prediction of the same case name.

    Parameters
    ----------
    pred_dir, ref_dir
        Folders of label maps, matched by file name without its image suffix
        (a NIfTI prediction may score a PNG reference). Float maps with integer
        values are accepted; a file holding only 0 and 255 is read as binary.
    labels
        ``{value: name}``, ``(value, name)`` pairs, or the path of a dataset.json
        (or its folder). By default a dataset.json in ``ref_dir`` or its parent
        is used, else the union of the values found (named ``label_<v>``).
    output_dir
        When given, ``metrics.csv``, ``summary.json`` and ``report.html`` are
        written there.
    overwrite
        Replace existing output files instead of refusing.
    images_dir
        Images shown under the contours of the report's worst cases
        (``<case>.<ext>`` or ``<case>_0000.<ext>``).
    curves_png, title
        A training-curve image to embed in the report, and the report's title.
    groups
        Subgroups of cases (site, sex, scanner...): a CSV path (a case column
        ``case``/``case_id`` or the first one, then one column per grouping)
        or ``{grouping: {case: group}}`` (a flat ``{case: group}`` is the
        grouping ``group``). The summary gets ``groups``: per grouping and
        group the same statistics, and per class and metric the gap between
        the best and worst group means.
    resample
        Resample a prediction whose grid differs onto the reference's
        (nearest neighbour) instead of refusing it.
    allow_missing
        Score the references that have a prediction and warn about the others,
        instead of refusing.
    show_progress
        A progress bar over cases.
    **options
        Metric options, as for :func:`evaluate_pairs` (``distances``,
        ``percentile``, ``tolerance_mm``, ``boundary_width_mm``, ``empty``,
        ``max_distance_mm``, ``lesions``, ``connectivity``).

    Raises
    ------
    MedsegError
        Listing the reference cases without a prediction, or naming a case whose
        shape or geometry differs; predictions without a reference only add a
        warning to the summary.
    """
    metric_options = _metric_options(options)
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    references = _list_cases(ref_dir, "reference")
    predictions = _list_cases(pred_dir, "prediction")
    if not references:
        raise MedsegError(f"{ref_dir}: no reference images found")
    missing = sorted(set(references) - set(predictions))
    if missing and (not allow_missing or len(missing) == len(references)):
        raise MedsegError(
            f"{pred_dir}: no prediction for {len(missing)} reference case(s): {_name_list(missing)}"
        )
    extra = sorted(set(predictions) - set(references))
    scored, labels_source = _resolve_labels(labels, ref_dir)
    if groups is not None:
        from medseg.evaluation.groups import read_groups

        groups = read_groups(groups)  # fail early on a bad file
    if output_dir is not None:
        _refuse_existing(_output_paths(Path(output_dir)), overwrite)
    keep_255 = scored is not None and any(v == 255 for v, _ in scored)

    case_ids = sorted(set(references) - set(missing))
    counts = [
        _count_case(
            case_id,
            read_image(predictions[case_id]),
            read_image(references[case_id]),
            keep_255,
            metric_options,
            resample,
        )
        for case_id in progress(
            case_ids, total=len(case_ids), desc="evaluate", enabled=show_progress
        )
    ]
    report = _build_report(counts, scored, metric_options)
    warnings = list(report.summary["warnings"])
    if extra:
        warnings.insert(
            0, f"{len(extra)} prediction(s) without a reference, not scored: {_name_list(extra)}"
        )
    if missing:
        warnings.insert(
            0,
            f"{len(missing)} reference(s) without a prediction, not scored: {_name_list(missing)}",
        )
    summary = {
        **report.summary,
        "warnings": warnings,
        "extra_predictions": extra,
        "missing_predictions": missing,
        "labels_source": labels_source,
        "prediction_dir": str(pred_dir),
        "reference_dir": str(ref_dir),
    }
    report = EvaluationReport(labels=report.labels, cases=report.cases, summary=summary)
    if groups is not None:
        from medseg.evaluation.groups import with_group_summaries

        report = with_group_summaries(report, groups)

    if output_dir is not None:
        output_dir = Path(output_dir)
        write_evaluation(report, output_dir, overwrite=overwrite)
        _write_folder_report(
            report, output_dir, predictions, references, images_dir, keep_255, curves_png, title
        )
    return report


def _write_folder_report(
    report: EvaluationReport,
    output_dir: Path,
    predictions: Mapping[str, Path],
    references: Mapping[str, Path],
    images_dir: str | os.PathLike | None,
    keep_255: bool,
    curves_png: str | os.PathLike | None = None,
    title: str | None = None,
    image_files: Mapping[str, Path] | None = None,
) -> None:
    from medseg.evaluation.report import worst_cases, write_html_report

    if image_files is None:
        image_files = _list_cases(Path(images_dir), "image") if images_dir is not None else {}
    shown_predictions, shown_references, shown_images = {}, {}, {}
    for case_id in worst_cases(report):
        ref = read_image(references[case_id])
        pred = read_image(predictions[case_id])
        shown_references[case_id] = ref.with_array(_label_array(ref.array, case_id, keep_255))
        shown_predictions[case_id] = pred.with_array(_label_array(pred.array, case_id, keep_255))
        image_path = image_files.get(case_id) or image_files.get(f"{case_id}_0000")
        if image_path is not None:
            image = read_image_channels(image_path)[0]
            if image.shape == ref.shape:
                shown_images[case_id] = image
    write_html_report(
        report,
        output_dir / REPORT_FILE,
        images=shown_images,
        predictions=shown_predictions,
        references=shown_references,
        curves_png=str(curves_png) if curves_png else None,
        title=title or f"medseg evaluation: {Path(report.summary.get('prediction_dir', '')).name}",
    )


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def metrics_csv_text(report: EvaluationReport) -> str:
    """The per-case table as CSV text: one row per case per class, NaN written ``nan``."""
    names = [f.name for f in fields(CaseMetrics)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in report.cases:
        writer.writerow([_csv_value(getattr(row, name)) for name in names])
    return buffer.getvalue()


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to a temporary file beside ``path`` (umask permissions), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_evaluation(
    report: EvaluationReport, output_dir: str | os.PathLike, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``metrics.csv`` and ``summary.json`` atomically.

    Raises
    ------
    MedsegError
        When either file exists and ``overwrite`` is False (nothing is written then).

    Returns
    -------
    tuple of Path
        The CSV and JSON paths.
    """
    output_dir = Path(output_dir)
    csv_path, json_path = output_dir / METRICS_FILE, output_dir / SUMMARY_FILE
    _refuse_existing([csv_path, json_path], overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(metrics_csv_text(report).encode("utf-8"), csv_path)
    write_json_atomic(report.summary, json_path)
    return csv_path, json_path
