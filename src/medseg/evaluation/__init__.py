"""Evaluation: Dice/IoU per case and class, summaries, CSV/JSON output and an HTML report."""

from medseg.evaluation.evaluate import (
    CaseMetrics,
    EvaluationReport,
    evaluate_folders,
    evaluate_pairs,
    labels_from_dataset_json,
    summarize,
    write_evaluation,
)
from medseg.evaluation.metrics import compute_dice, compute_iou, confusion_counts
from medseg.evaluation.report import (
    render_overlay_png,
    save_overlay_png,
    worst_cases,
    write_html_report,
)

__all__ = [
    "CaseMetrics",
    "EvaluationReport",
    "compute_dice",
    "compute_iou",
    "confusion_counts",
    "evaluate_folders",
    "evaluate_pairs",
    "labels_from_dataset_json",
    "render_overlay_png",
    "save_overlay_png",
    "summarize",
    "worst_cases",
    "write_evaluation",
    "write_html_report",
]
