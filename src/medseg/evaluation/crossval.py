"""Cross-validation summary: evaluate the validation predictions of every fold of a work folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.evaluation.evaluate import (
    evaluate_folders,
    list_cases,
    normalize_labels,
    output_paths,
    refuse_existing,
    write_evaluation,
    write_folder_report,
)
from medseg.evaluation.groups import with_group_summaries
from medseg.evaluation.records import EvaluationReport, LabelsArg, summarize


def find_folds(work_dir: str | os.PathLike) -> dict[str, tuple[Path, Path, Path | None]]:
    """Validation folders of a work folder written by ``medseg run``.

    Returns
    -------
    dict
        ``{"fold_<k>": (predictions_dir, labels_dir, images_dir or None)}`` for
        every ``validation/fold_<k>`` that has ``predictions/`` and ``labels/``.

    Raises
    ------
    MedsegError
        When the work folder has no such fold.
    """
    work = Path(work_dir)
    root = work / "validation"
    folds = {}
    if root.is_dir():
        for fold in sorted(root.glob("fold_*"), key=lambda p: (len(p.name), p.name)):
            pred, refs, images = fold / "predictions", fold / "labels", fold / "images"
            if pred.is_dir() and refs.is_dir():
                folds[fold.name] = (pred, refs, images if images.is_dir() else None)
    if not folds:
        raise MedsegError(
            f"{work}: no validation/fold_<k>/predictions and labels folders "
            "(run `medseg run` or predict each fold's validation cases first)"
        )
    return folds


def _labels_of_work_dir(work: Path) -> LabelsArg | None:
    path = work / "dataset.json"
    try:
        data = json.loads(path.read_text())
        return normalize_labels(data["labels"]) if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError, TypeError, MedsegError):
        return None


def evaluate_cross_validation(
    work_dir: str | os.PathLike,
    *,
    output_dir: str | os.PathLike | None = None,
    labels: LabelsArg | str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    **options: Any,
) -> EvaluationReport:
    """Evaluate all folds of a trained work folder at once.

    Every fold's validation predictions are scored against its references;
    the report pools all cases (each case is validated in exactly one fold),
    and ``summary["folds"]`` holds each fold's own summary. The folds are
    also a grouping (``summary["groups"]["fold"]``), which gives the spread
    between folds.

    Parameters
    ----------
    work_dir
        A ``medseg run`` work folder (``validation/fold_<k>/{predictions,labels}``).
    output_dir
        Where to write ``metrics.csv``, ``summary.json`` and ``report.html``.
    labels
        As for :func:`medseg.evaluation.evaluate_folders`; by default the work
        folder's ``dataset.json`` labels, else the values found.
    overwrite, show_progress, **options
        As for :func:`medseg.evaluation.evaluate_folders`.
    """
    work = Path(work_dir)
    folds = find_folds(work)
    if labels is None:
        labels = _labels_of_work_dir(work)
    if output_dir is not None:
        refuse_existing(output_paths(Path(output_dir)), overwrite)
    reports = {
        name: evaluate_folders(pred, refs, labels=labels, show_progress=show_progress, **options)
        for name, (pred, refs, _) in folds.items()
    }
    label_sets = {r.labels for r in reports.values()}
    if len(label_sets) > 1:  # values found differ per fold: use their union
        union = sorted({pair for r in reports.values() for pair in r.labels})
        reports = {
            name: evaluate_folders(pred, refs, labels=union, **options)
            for name, (pred, refs, _) in folds.items()
        }
    scored = next(iter(reports.values())).labels
    seen: dict[str, str] = {}
    rows = []
    for name, report in reports.items():
        for case_id in report.case_ids:
            if case_id in seen:
                raise MedsegError(
                    f"{work}: case {case_id} is validated in both {seen[case_id]} and {name}"
                )
            seen[case_id] = name
        rows.extend(report.cases)
    warnings = [f"{name}: {w}" for name, r in reports.items() for w in r.summary["warnings"]]
    summary = summarize(rows, scored, warnings)
    summary["settings"] = next(iter(reports.values())).summary.get("settings")
    summary["folds"] = {name: r.summary for name, r in reports.items()}
    summary["work_dir"] = str(work)
    report = EvaluationReport(labels=scored, cases=tuple(rows), summary=summary)
    report = with_group_summaries(report, {"fold": dict(seen)})
    if output_dir is not None:
        out = Path(output_dir)
        write_evaluation(report, out, overwrite=overwrite)
        predictions, references, images = {}, {}, {}
        for pred, refs, image_dir in folds.values():
            predictions.update(list_cases(pred, "prediction"))
            references.update(list_cases(refs, "reference"))
            if image_dir is not None:
                images.update(list_cases(image_dir, "image"))
        write_folder_report(
            report,
            out,
            predictions,
            references,
            None,
            False,
            title=f"medseg cross-validation: {work.name}",
            image_files=images,
        )
    return report
