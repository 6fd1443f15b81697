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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.evaluation.calibration_metrics import (
    calibration_section_html,
    folder_calibration,
    probability_files,
)
from medseg.evaluation.groups import GroupsArg, read_groups, with_group_summaries
from medseg.evaluation.metrics import (
    compute_metrics,
    distance_scores,
    lesion_counts,
    overlap_scores,
    present_values,
)
from medseg.evaluation.records import (
    SCORE_FIELDS,
    CaseMetrics,
    EvaluationReport,
    LabelsArg,
    MetricOptions,
    summarize,
)
from medseg.evaluation.report import worst_cases, write_html_report
from medseg.imaging.atomic import write_bytes_atomic
from medseg.io.dataset import parse_labels
from medseg.io.files import (
    from_sitk,
    image_suffix,
    read_image,
    read_image_channels,
    strip_suffix,
    to_sitk,
)
from medseg.io.image import Image
from medseg.progress import progress
from medseg.serialization import write_json_atomic

GEOMETRY_TOLERANCE = 1e-3
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
_MAX_NAMED = 20  # case names listed in one error or warning line


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
        labels = parse_labels(dict(labels), Path("labels"))
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
    return normalize_labels(parse_labels(meta["labels"], path))


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
                    **{k: scores[k] for k in SCORE_FIELDS if k in scores},
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


def list_cases(folder: Path, role: str) -> dict[str, Path]:
    """Label or image files of ``folder`` by case id (file name without its image suffix)."""
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


def output_paths(output_dir: Path) -> list[Path]:
    """The files an evaluation writes into ``output_dir``."""
    return [output_dir / name for name in (METRICS_FILE, SUMMARY_FILE, REPORT_FILE)]


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Raise :class:`MedsegError` naming the first of ``paths`` that exists, unless ``overwrite``."""
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
    groups: GroupsArg | None = None,
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
    references = list_cases(ref_dir, "reference")
    predictions = list_cases(pred_dir, "prediction")
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
        groups = read_groups(groups)  # fail early on a bad file
    if output_dir is not None:
        refuse_existing(output_paths(Path(output_dir)), overwrite)
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
        report = with_group_summaries(report, groups)
    sections = []
    probability_paths = probability_files(pred_dir)  # ``predict --probabilities``: ECE, diagram
    if probability_paths:
        arrays = {c: read_image(references[c]).array for c in case_ids if c in probability_paths}
        calibration, pooled = folder_calibration(probability_paths, arrays)
        report.summary["calibration"] = calibration
        sections.append(("Calibration", calibration_section_html(calibration, pooled)))

    if output_dir is not None:
        output_dir = Path(output_dir)
        write_evaluation(report, output_dir, overwrite=overwrite)
        write_folder_report(
            report,
            output_dir,
            predictions,
            references,
            images_dir,
            keep_255,
            curves_png,
            title,
            extra_sections=sections,
        )
    return report


def write_folder_report(
    report: EvaluationReport,
    output_dir: Path,
    predictions: Mapping[str, Path],
    references: Mapping[str, Path],
    images_dir: str | os.PathLike | None,
    keep_255: bool,
    curves_png: str | os.PathLike | None = None,
    title: str | None = None,
    image_files: Mapping[str, Path] | None = None,
    extra_sections: Sequence[tuple[str, str]] | None = None,
) -> None:
    """``report.html`` in ``output_dir``, with contour overlays of the worst cases.

    ``extra_sections``: ``(heading, html)`` pairs added at the end (e.g. calibration).
    """
    if image_files is None:
        image_files = list_cases(Path(images_dir), "image") if images_dir is not None else {}
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
        extra_sections=extra_sections,
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
    refuse_existing([csv_path, json_path], overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(metrics_csv_text(report).encode("utf-8"), csv_path)
    write_json_atomic(report.summary, json_path)
    return csv_path, json_path
