"""The Python API: one function per pipeline step. The CLI and the service call only these.

Work folder layout (``work_dir``)::

    dataset.json       what was found in the dataset folder (DatasetSpec)
    fingerprint.json   dataset statistics
    plan.json          the editable plan; ``train`` reads it back
    preprocessed/      cached preprocessed cases, one folder per plan
    model/             plan.json, splits.json, fold_<k>/ (checkpoints, logs, curves)
    validation/        predictions of each fold's validation cases, original geometry
    evaluation/        metrics.csv, summary.json, report.html per fold (and the test set)
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from medseg.errors import MedsegError
from medseg.evaluation import (
    EvaluationReport,
    evaluate_folders,
)
from medseg.inference import Prediction, predict_to_folder
from medseg.io.check import CheckReport, check_dataset
from medseg.io.dataset import DatasetSpec, load_dataset
from medseg.io.files import strip_suffix
from medseg.planning import Fingerprint, Plan, compute_fingerprint, make_plan, read_plan
from medseg.preprocessing import preprocess_dataset
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training import (
    TrainConfig,
    TrainResult,
    make_folds,
    read_splits,
    train_fold,
    write_splits,
)

__all__ = [
    "check",
    "demo",
    "evaluate",
    "fingerprint",
    "plan",
    "predict",
    "preprocess",
    "run",
    "train",
]


def check(dataset: str | os.PathLike, *, num_workers: int = 2) -> CheckReport:
    """List every problem of a dataset folder (see :func:`medseg.io.check.check_dataset`)."""
    return check_dataset(dataset, workers=num_workers)


def _require_clean(dataset: str | os.PathLike) -> DatasetSpec:
    report = check_dataset(dataset)
    if not report.ok:
        first = report.errors[0]
        more = (
            f" (and {len(report.errors) - 1} more; run `medseg check {dataset}`)"
            if len(report.errors) > 1
            else ""
        )
        raise MedsegError(f"{first.path}: {first.message}{more}")
    return load_dataset(dataset)


def fingerprint(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Fingerprint:
    """Compute and save ``work_dir/fingerprint.json``."""
    spec = _require_clean(dataset)
    return _fingerprint(spec, work_dir, num_workers=num_workers, show_progress=show_progress)


def _fingerprint(
    spec: DatasetSpec, work_dir: str | os.PathLike, *, num_workers: int, show_progress: bool
) -> Fingerprint:
    work = Path(work_dir)
    write_json_atomic(spec.to_json(), work / "dataset.json")
    fp = compute_fingerprint(spec, num_workers=num_workers, show_progress=show_progress)
    write_json_atomic(fp, work / "fingerprint.json")
    return fp


def plan(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    gpu: bool | None = None,
    overwrite: bool = False,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Plan:
    """Fingerprint the dataset and write ``work_dir/plan.json`` (refuses to replace an edited plan)."""
    path = Path(work_dir) / "plan.json"
    if path.exists() and not overwrite:
        raise MedsegError(f"{path}: already exists (use --overwrite to re-plan)")
    spec = _require_clean(dataset)
    return _plan(spec, work_dir, gpu=gpu, num_workers=num_workers, show_progress=show_progress)


def _plan(
    spec: DatasetSpec,
    work_dir: str | os.PathLike,
    *,
    gpu: bool | None,
    num_workers: int,
    show_progress: bool,
) -> Plan:
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    fp = _fingerprint(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
    result = make_plan(fp, gpu=gpu)
    write_json_atomic(result, Path(work_dir) / "plan.json")
    return result


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a (possibly hand-edited) plan JSON, or the one in a work or model folder."""
    return read_plan(path)


def _plan_for(
    spec: DatasetSpec, work_dir: str | os.PathLike, *, num_workers: int, show_progress: bool
) -> Plan:
    """The work folder's plan (possibly hand-edited), or a new one."""
    path = Path(work_dir) / "plan.json"
    if path.exists():
        return load_plan(path)
    return _plan(spec, work_dir, gpu=None, num_workers=num_workers, show_progress=show_progress)


def preprocess(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Path:
    """Preprocess all labelled cases with the work folder's plan (cached)."""
    spec = _require_clean(dataset)
    the_plan = _plan_for(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
    return preprocess_dataset(
        spec, the_plan, work_dir, num_workers=num_workers, show_progress=show_progress
    )


def _folds(
    spec: DatasetSpec,
    model_dir: Path,
    *,
    num_folds: int,
    seed: int,
    split_file: str | os.PathLike | None,
) -> list[dict[str, list[str]]]:
    if split_file is not None:
        folds = read_splits(split_file)
    elif (model_dir / "splits.json").exists():
        folds = read_splits(model_dir / "splits.json")
    else:
        folds = make_folds(
            [c.case_id for c in spec.cases if c.label], num_folds=num_folds, seed=seed
        )
    known = {c.case_id for c in spec.cases}
    for i, fold in enumerate(folds):
        unknown = sorted(set(fold["train"] + fold["val"]) - known)
        if unknown:
            raise MedsegError(
                f"{split_file or model_dir / 'splits.json'}: fold {i} names unknown case(s) {', '.join(unknown[:5])}"
            )
    write_splits(folds, model_dir / "splits.json")
    return folds


def train(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    config: TrainConfig | None = None,
    split_file: str | os.PathLike | None = None,
    resume: bool = True,
    num_workers: int = 2,
    show_progress: bool = True,
) -> list[TrainResult]:
    """Plan (if needed), preprocess (cached) and train the given folds (default: fold 0).

    The plan is read back from ``work_dir/plan.json``, so hand edits take effect.
    ``config.time_budget_minutes`` is shared by all folds and counts the
    preprocessing too.
    """
    started = time.perf_counter()
    spec = _require_clean(dataset)
    return _train(
        spec,
        work_dir,
        folds=folds,
        config=config,
        split_file=split_file,
        resume=resume,
        num_workers=num_workers,
        show_progress=show_progress,
        started=started,
    )


def _train(
    spec: DatasetSpec,
    work_dir: str | os.PathLike,
    *,
    folds: list[int] | None,
    config: TrainConfig | None,
    split_file: str | os.PathLike | None,
    resume: bool,
    num_workers: int,
    show_progress: bool,
    started: float,
) -> list[TrainResult]:
    config = config or TrainConfig()
    the_plan = _plan_for(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
    pre = preprocess_dataset(
        spec, the_plan, work_dir, num_workers=num_workers, show_progress=show_progress
    )
    model_dir = Path(work_dir) / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(the_plan, model_dir / "plan.json")
    write_json_atomic(spec.to_json(), model_dir / "dataset.json")
    all_folds = _folds(
        spec, model_dir, num_folds=config.num_folds, seed=config.seed, split_file=split_file
    )
    folds = folds if folds is not None else [0]
    results = []
    for k, fold in enumerate(folds):
        if not 0 <= fold < len(all_folds):
            raise MedsegError(f"fold {fold} does not exist (the splits have {len(all_folds)})")
        fold_config = replace(config, fold=fold)
        if config.time_budget_minutes is not None:
            left = config.time_budget_minutes - (time.perf_counter() - started) / 60
            fold_config = replace(
                fold_config, time_budget_minutes=max(left / (len(folds) - k), 0.1)
            )
        results.append(
            train_fold(
                the_plan,
                pre,
                model_dir / f"fold_{fold}",
                fold_config,
                train_ids=all_folds[fold]["train"],
                val_ids=all_folds[fold]["val"],
                resume=resume,
                show_progress=show_progress,
            )
        )
    return results


def predict(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror: bool = False,
    largest_component: bool = False,
    fill_holes: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    show_progress: bool = True,
) -> list[Prediction]:
    """Predict a file, a folder of files or a DICOM series; outputs keep the input geometry."""
    model_dir = Path(model_dir)
    if (model_dir / "model" / "plan.json").exists():  # a work folder was given
        model_dir = model_dir / "model"
    the_plan = read_plan(model_dir)
    return predict_to_folder(
        model_dir,
        input_path,
        output_dir,
        folds=folds,
        mirror_axes=tuple(range(the_plan.ndim)) if mirror else (),
        largest_component=largest_component,
        fill=fill_holes,
        overwrite=overwrite,
        device=device,
        show_progress=show_progress,
    )


def evaluate(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    labels: dict[int, str] | None = None,
    images_dir: str | os.PathLike | None = None,
    curves_png: str | os.PathLike | None = None,
    title: str = "medseg evaluation",
    overwrite: bool = False,
) -> EvaluationReport:
    """Dice and IoU per case and class; with ``output_dir``: metrics.csv, summary.json, report.html."""
    return evaluate_folders(
        pred_dir,
        ref_dir,
        labels=labels,
        output_dir=output_dir,
        overwrite=overwrite,
        images_dir=images_dir,
        curves_png=curves_png,
        title=title,
    )


def link_cases(spec: DatasetSpec, case_ids: list[str], folder: Path) -> tuple[Path, Path]:
    """Symlink some cases' images and labels into ``folder/images`` and ``folder/labels``.

    The predictor and the evaluator read folders; links avoid copying the user's data.
    """
    images, labels = folder / "images", folder / "labels"
    for d in (images, labels):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for cid in case_ids:
        case = spec.case(cid)
        for i, src in enumerate(case.images):
            src_path = Path(src)
            suffix = src_path.name[len(strip_suffix(src_path)) :]
            name = (
                f"{cid}_{i:04d}{suffix}"
                if len(case.images) > 1 or spec.num_channels > 1
                else f"{cid}{suffix}"
            )
            os.symlink(src_path.resolve(), images / name)
        label = Path(case.label)
        os.symlink(label.resolve(), labels / f"{cid}{label.name[len(strip_suffix(label)) :]}")
    return images, labels


def run(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    config: TrainConfig | None = None,
    split_file: str | os.PathLike | None = None,
    mirror: bool = True,
    largest_component: bool = False,
    fill_holes: bool = False,
    overwrite: bool = False,
    num_workers: int = 2,
    show_progress: bool = True,
) -> dict:
    """Everything: check, plan, preprocess, train, predict the validation (and test) cases, evaluate."""
    work = Path(work_dir)
    if (work / "evaluation").exists() and not overwrite:
        raise MedsegError(
            f"{work / 'evaluation'}: already exists (use --overwrite, or another --work-dir)"
        )
    started = time.perf_counter()
    spec = _require_clean(dataset)
    results = _train(
        spec,
        work,
        folds=folds,
        config=config,
        split_file=split_file,
        resume=True,
        num_workers=num_workers,
        show_progress=show_progress,
        started=started,
    )
    model_dir = work / "model"
    all_folds = read_splits(model_dir / "splits.json")
    summary: dict = {"dataset": str(dataset), "work_dir": str(work), "folds": {}}
    labels = dict(spec.labels)
    for result in results:
        fold = int(Path(result.fold_dir).name.removeprefix("fold_"))
        val_ids = all_folds[fold]["val"]
        links = work / "validation" / f"fold_{fold}"
        images, refs = link_cases(spec, val_ids, links)
        pred_dir = links / "predictions"
        predict(
            model_dir,
            images,
            pred_dir,
            folds=[fold],
            mirror=mirror,
            largest_component=largest_component,
            fill_holes=fill_holes,
            overwrite=True,
            show_progress=show_progress,
        )
        out = work / "evaluation" / f"fold_{fold}"
        report = evaluate(
            pred_dir,
            refs,
            out,
            labels=labels,
            images_dir=images,
            curves_png=Path(result.fold_dir) / "curves.png",
            title=f"medseg: {spec.name}, fold {fold} validation",
            overwrite=True,
        )
        summary["folds"][str(fold)] = {"train": to_jsonable(result), "validation": report.summary}
    test_cases = [c for c in spec.test_cases if c.label]
    if test_cases:
        links = work / "test"
        images, refs = link_cases(
            replace(spec, cases=spec.cases + spec.test_cases),
            [c.case_id for c in test_cases],
            links,
        )
        pred_dir = links / "predictions"
        predict(
            model_dir,
            images,
            pred_dir,
            folds=[int(Path(r.fold_dir).name[5:]) for r in results],
            mirror=mirror,
            largest_component=largest_component,
            fill_holes=fill_holes,
            overwrite=True,
            show_progress=show_progress,
        )
        report = evaluate(
            pred_dir,
            refs,
            work / "evaluation" / "test",
            labels=labels,
            images_dir=images,
            curves_png=Path(results[0].fold_dir) / "curves.png",
            title=f"medseg: {spec.name}, held-out test cases",
            overwrite=True,
        )
        summary["test"] = report.summary
    write_json_atomic(summary, work / "run_summary.json")
    return summary


def demo(
    work_dir: str | os.PathLike = "medseg_demo",
    *,
    dataset: str | os.PathLike | None = None,
    time_budget_minutes: float = 3.0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Train and evaluate on built-in phantoms (or ``dataset``) within a few minutes on a CPU."""
    from medseg.io.phantoms import write_phantom_dataset

    work = Path(work_dir)
    if work.exists() and any(work.iterdir()):
        if not overwrite:
            raise MedsegError(f"{work}: already exists and is not empty (use --overwrite)")
        shutil.rmtree(work)
    if dataset is None:
        dataset = write_phantom_dataset(work / "phantoms")
    config = TrainConfig(time_budget_minutes=time_budget_minutes, iterations_per_epoch=25)
    summary = run(dataset, work, config=config, overwrite=True, show_progress=show_progress)
    summary["report"] = str(
        work / "evaluation" / ("test" if "test" in summary else "fold_0") / "report.html"
    )
    write_json_atomic(summary, work / "run_summary.json")
    return summary


# --- metrics and evaluation (issue 3) ---


# --- classical methods and filters (issue 4) ---


# --- registration (issue 5) ---


# --- fast inference and export (issue 6) ---


# --- DICOM, PACS and the REST service (issue 7) ---
