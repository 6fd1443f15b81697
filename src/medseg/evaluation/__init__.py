"""Evaluation: overlap and surface-distance metrics, summaries, groups, CSV/JSON output and an HTML report."""

from medseg.evaluation.crossval import evaluate_cross_validation, find_folds
from medseg.evaluation.distances import SurfaceDistances, compute_surface_distances
from medseg.evaluation.evaluate import (
    evaluate_folders,
    evaluate_pairs,
    labels_from_dataset_json,
    write_evaluation,
)
from medseg.evaluation.groups import group_summaries, read_groups
from medseg.evaluation.metrics import (
    EMPTY_POLICIES,
    compute_assd,
    compute_boundary_iou,
    compute_dice,
    compute_hausdorff,
    compute_hd95,
    compute_iou,
    compute_masd,
    compute_metrics,
    compute_nsd,
    compute_overlap,
    confusion_counts,
    lesion_counts,
)
from medseg.evaluation.records import CaseMetrics, EvaluationReport, MetricOptions, summarize
from medseg.evaluation.report import (
    render_overlay_png,
    save_overlay_png,
    volume_agreement,
    worst_cases,
    write_html_report,
)

__all__ = [
    "EMPTY_POLICIES",
    "CaseMetrics",
    "EvaluationReport",
    "MetricOptions",
    "SurfaceDistances",
    "compute_assd",
    "compute_boundary_iou",
    "compute_dice",
    "compute_hausdorff",
    "compute_hd95",
    "compute_iou",
    "compute_masd",
    "compute_metrics",
    "compute_nsd",
    "compute_overlap",
    "compute_surface_distances",
    "confusion_counts",
    "evaluate_cross_validation",
    "evaluate_folders",
    "evaluate_pairs",
    "find_folds",
    "group_summaries",
    "labels_from_dataset_json",
    "lesion_counts",
    "read_groups",
    "render_overlay_png",
    "save_overlay_png",
    "summarize",
    "volume_agreement",
    "worst_cases",
    "write_evaluation",
    "write_html_report",
]
