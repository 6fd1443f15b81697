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
    "atlas_segment",
    "check",
    "compute_metrics",
    "deidentify",
    "demo",
    "distill",
    "ensemble",
    "evaluate",
    "evaluate_cross_validation",
    "export",
    "filter_images",
    "fingerprint",
    "link_cases",
    "load_plan",
    "plan",
    "predict",
    "preprocess",
    "prune",
    "read_dicom",
    "register",
    "run",
    "segment_classical",
    "segment_dicom",
    "select_ensemble",
    "select_postprocessing",
    "serve_app",
    "train",
    "train_registration",
    "tune",
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
    mirror_axes: tuple[int, ...] | None = None,
    backend: str = "torch",
    num_workers: int = 2,
    uncertainty: bool = False,
    postprocess: bool = True,
    precision: str = "auto",
) -> list[Prediction]:
    """Predict a file, a folder of files or a DICOM series; outputs keep the input geometry.

    ``mirror`` averages all flips (TTA); ``mirror_axes`` picks a subset of axes
    instead. ``backend`` "onnx", "onnx-int8" or "onnx-int8-static" runs a model
    exported by :func:`export` with onnxruntime. ``uncertainty`` also writes
    ``<case>_entropy.nii.gz``; ``postprocess`` applies the model folder's
    ``postprocessing.json`` (see :func:`select_postprocessing`). ``precision``
    "bf16" runs PyTorch on CPU under bfloat16 autocast; "auto" (default) does so
    where the CPU has native bfloat16 (AMX/AVX512-BF16), "fp32" never. Reading, the
    network and writing overlap (``num_workers`` reader threads); finished cases
    are skipped, so a killed run resumes.
    """
    model_dir = _model_folder(model_dir)
    the_plan = read_plan(model_dir)
    if mirror_axes is None:
        mirror_axes = tuple(range(the_plan.ndim)) if mirror else ()
    return predict_to_folder(
        model_dir,
        input_path,
        output_dir,
        folds=folds,
        mirror_axes=tuple(mirror_axes),
        largest_component=largest_component,
        fill=fill_holes,
        overwrite=overwrite,
        device=device,
        backend=backend,
        postprocess=postprocess,
        uncertainty=uncertainty,
        num_workers=num_workers,
        precision=precision,
        show_progress=show_progress,
    )


def _model_folder(model_dir: str | os.PathLike) -> Path:
    """A model folder, or the ``model/`` folder of a work folder."""
    model_dir = Path(model_dir)
    if (model_dir / "model" / "plan.json").exists():  # a work folder was given
        model_dir = model_dir / "model"
    return model_dir


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
    groups: str | os.PathLike | dict | None = None,
    resample: bool = False,
    allow_missing: bool = False,
    show_progress: bool = False,
    **metric_options,
) -> EvaluationReport:
    """Overlap and surface-distance metrics per case and class.

    With ``output_dir``: metrics.csv, summary.json, report.html. ``groups``
    (a CSV or ``{grouping: {case: group}}``) adds per-subgroup summaries and
    gaps; ``metric_options`` are those of :func:`medseg.evaluation.evaluate_pairs`
    (``distances``, ``percentile``, ``tolerance_mm``, ``empty``, ``lesions``...).
    """
    return evaluate_folders(
        pred_dir,
        ref_dir,
        labels=labels,
        output_dir=output_dir,
        overwrite=overwrite,
        images_dir=images_dir,
        curves_png=curves_png,
        title=title,
        groups=groups,
        resample=resample,
        allow_missing=allow_missing,
        show_progress=show_progress,
        **metric_options,
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
    # The time budget makes the optimizer AdamW at 3e-3 ("auto"), which learns the small
    # phantom class in about half the iterations SGD needs (3 min on a 2-core AMD EPYC:
    # held-out Dice 0.93 vs 0.88), so the demo reaches its goal on slower CPUs too.
    config = TrainConfig(time_budget_minutes=time_budget_minutes, iterations_per_epoch=25)
    summary = run(dataset, work, config=config, overwrite=True, show_progress=show_progress)
    summary["report"] = str(
        work / "evaluation" / ("test" if "test" in summary else "fold_0") / "report.html"
    )
    write_json_atomic(summary, work / "run_summary.json")
    return summary


# --- metrics and evaluation (issue 3) ---


def evaluate_cross_validation(
    work_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    labels: dict[int, str] | str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    **metric_options,
) -> EvaluationReport:
    """Evaluate every fold's validation predictions of a ``run`` work folder at once.

    The report pools all cases; ``summary["folds"]`` holds each fold's summary
    and ``summary["groups"]["fold"]`` the spread between folds.
    """
    from medseg.evaluation.crossval import evaluate_cross_validation as evaluate_cv

    return evaluate_cv(
        work_dir,
        output_dir=output_dir,
        labels=labels,
        overwrite=overwrite,
        show_progress=show_progress,
        **metric_options,
    )


def compute_metrics(pred, ref, *, labels, spacing=None, **metric_options) -> dict:
    """Every overlap and distance metric of two label arrays (see medseg.evaluation.compute_metrics)."""
    from medseg.evaluation.metrics import compute_metrics as compute

    return compute(pred, ref, labels=labels, spacing=spacing, **metric_options)


# --- classical methods and filters (issue 4) ---


def _image_options(options: dict | None, keys: tuple[str, ...]) -> dict:
    """Options with image file paths (mask, markers, ...) read into images."""
    from medseg.io.files import read_image

    options = dict(options or {})
    for key in keys:
        if isinstance(options.get(key), str | os.PathLike):
            options[key] = read_image(options[key])
    return options


def segment_classical(
    method: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    options: dict | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> list[Path]:
    """Segment an image file or a folder with a classical method of :data:`medseg.classical.METHODS`.

    ``options`` are the method's keyword options; ``mask``, ``markers`` and
    ``init`` may be image file paths. Outputs keep the input geometry.
    """
    from medseg.classical import run_method
    from medseg.classical.batch import map_images

    options = _image_options(options, ("mask", "markers", "init"))
    return map_images(
        lambda image: run_method(image, method, **options),
        input_path,
        output,
        overwrite=overwrite,
        show_progress=show_progress,
        desc=method,
    )


def filter_images(
    name: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    options: dict | None = None,
    output_dtype: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> list[Path]:
    """Apply a filter of :data:`medseg.filters.FILTERS` to an image file or a folder.

    ``reference`` (histogram matching) and ``mask`` may be image file paths;
    ``output_dtype`` rounds and casts the float32 result (e.g. ``uint8`` for PNG).
    """
    from medseg.classical.batch import map_images
    from medseg.filters import apply_filter

    options = _image_options(options, ("reference", "mask"))
    return map_images(
        lambda image: apply_filter(image, name, **options),
        input_path,
        output,
        overwrite=overwrite,
        output_dtype=output_dtype,
        show_progress=show_progress,
        desc=name,
    )


# --- registration (issue 5) ---


def register(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    method: str = "affine",
    metric: str = "mattes",
    init: str = "geometry",
    labels: str | os.PathLike | None = None,
    fixed_labels: str | os.PathLike | None = None,
    label_mode: str = "nearest",
    fixed_mask: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    precision: str = "fp32",
    report: bool = True,
    overwrite: bool = False,
) -> dict:
    """Register ``moving`` to ``fixed``; write the transform, warped image/labels, quality and report.

    See :func:`medseg.registration.pipeline.register_files`.
    """
    from medseg.registration.pipeline import register_files

    return register_files(
        fixed,
        moving,
        output_dir,
        method=method,
        metric=metric,
        init=init,
        labels=labels,
        fixed_labels=fixed_labels,
        label_mode=label_mode,
        fixed_mask=fixed_mask,
        moving_mask=moving_mask,
        model=model,
        precision=precision,
        report=report,
        overwrite=overwrite,
    )


def train_registration(
    dataset: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    config=None,
    resume: bool = True,
    show_progress: bool = True,
):
    """Train a learned (VoxelMorph-style) registration model on pairs of a dataset folder's cases."""
    from medseg.registration.pipeline import train_registration_dataset

    return train_registration_dataset(
        dataset, model_dir, config=config, resume=resume, show_progress=show_progress
    )


def atlas_segment(
    target: str | os.PathLike,
    atlases: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "demons",
    metric: str = "mattes",
    fusion: str = "majority",
    max_atlases: int | None = None,
    model: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Segment ``target`` by registering the labelled cases of ``atlases`` and fusing their labels."""
    from medseg.registration.pipeline import atlas_segment_files

    return atlas_segment_files(
        target,
        atlases,
        output,
        method=method,
        metric=metric,
        fusion=fusion,
        max_atlases=max_atlases,
        model=model,
        overwrite=overwrite,
        show_progress=show_progress,
    )


# --- fast inference and export (issue 6) ---


def export(
    model_dir: str | os.PathLike,
    *,
    fmt: str = "onnx",
    int8: tuple[str, ...] = (),
    folds: list[int] | None = None,
    overwrite: bool = False,
):
    """Export a model folder to ``model/export/`` (ONNX fp32 + int8, or TorchScript), checked
    against PyTorch (see :func:`medseg.export.export_model`)."""
    from medseg.export import export_model

    return export_model(
        _model_folder(model_dir), fmt=fmt, int8=int8, folds=folds, overwrite=overwrite
    )


def prune(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    keep: float = 0.5,
    overwrite: bool = False,
) -> dict:
    """Structured pruning: a new model folder whose U-Net keeps ``keep`` of every stage's
    channels (largest filter L1 norms). Fine-tune it with :func:`train` and
    ``TrainConfig(init_from=output_dir)`` on its ``plan.json`` (see
    :mod:`medseg.export.prune`)."""
    from medseg.export.prune import prune_model_dir

    return prune_model_dir(_model_folder(model_dir), output_dir, keep=keep, overwrite=overwrite)


def select_postprocessing(
    model_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror: bool = False,
    max_cases: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
):
    """Choose thresholds, component and hole filling per class on the validation folds and
    record them in ``postprocessing.json`` (applied by :func:`predict` from then on)."""
    from medseg.inference.postprocess_selection import select_postprocessing as select

    model_dir = _model_folder(model_dir)
    ndim = read_plan(model_dir).ndim
    return select(
        model_dir,
        folds=folds,
        mirror_axes=tuple(range(ndim)) if mirror else (),
        max_cases=max_cases,
        device=device,
        overwrite=overwrite,
        show_progress=show_progress,
    )


# --- DICOM, PACS and the REST service (issue 7) ---


def read_dicom(
    path: str | os.PathLike, *, series_uid: str | None = None, modality: str | None = None
):
    """Read and check one DICOM series from a folder or zip (see :func:`medseg.dicom.read_series`)."""
    from medseg.dicom import read_series

    return read_series(path, series_uid=series_uid, modality=modality)


def deidentify(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    seed: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """De-identify DICOM files (PS3.15 basic profile, UIDs consistent within the study)."""
    from medseg.dicom import deidentify_folder

    return deidentify_folder(source, output_dir, seed=seed, overwrite=overwrite)


def segment_dicom(
    model_dir: str | os.PathLike,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    code_table: str | os.PathLike | None = None,
    model_name: str | None = None,
    rtstruct: bool = False,
    overwrite: bool = False,
    device: str = "auto",
):
    """Segment a DICOM series: ``image.nii.gz``, ``label.nii.gz``, DICOM SEG ``seg.dcm``
    (and ``rtstruct.dcm`` with ``rtstruct``)."""
    from medseg.pacs import load_predictor
    from medseg.pacs import segment_dicom as _segment

    out = Path(output_dir)
    if (out / "seg.dcm").exists() and not overwrite:
        raise MedsegError(f"{out / 'seg.dcm'}: already exists (use --overwrite)")
    return _segment(
        load_predictor(model_dir, device=device),
        source,
        out,
        series_uid=series_uid,
        modality=modality,
        code_table=code_table,
        model_name=model_name,
        rtstruct=rtstruct,
        overwrite=overwrite,
    )


def serve_app(model_dir: str | os.PathLike, **options):
    """The FastAPI application of ``medseg serve`` (options: :func:`medseg.serve.create_app`)."""
    from medseg.serve import create_app

    return create_app(model_dir, **options)


# --- model zoo, tuning, distillation, ensembling (issue 8) ---


def ensemble(
    models: list[str | os.PathLike],
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    method: str = "mean",
    weights: list[float] | None = None,
    folds: list[int] | None = None,
    mirror: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    show_progress: bool = True,
) -> list[Path]:
    """Predict with several trained models combined by "mean" probability, "weighted" mean
    or majority "vote"; outputs keep the input geometry (see :mod:`medseg.ensembling`)."""
    from medseg.ensembling import ensemble_predict_folder

    return ensemble_predict_folder(
        models,
        input_path,
        output_dir,
        method=method,
        weights=weights,
        folds=folds,
        mirror=mirror,
        overwrite=overwrite,
        device=device,
        show_progress=show_progress,
    )


def select_ensemble(
    models: list[str | os.PathLike],
    output_json: str | os.PathLike,
    *,
    methods: tuple[str, ...] = ("mean", "weighted", "vote"),
    max_members: int = 3,
    folds: list[int] | None = None,
    mirror: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    show_progress: bool = True,
) -> Path:
    """Score every model and combination on out-of-fold validation cases; write the ranking
    (best first) to ``output_json``, as nnU-Net's find_best_configuration does."""
    from medseg.ensembling import select_best

    out = Path(output_json)
    if out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists (use --overwrite)")
    selection = select_best(
        models,
        folds=folds,
        methods=methods,
        max_members=max_members,
        mirror=mirror,
        device=device,
        show_progress=show_progress,
    )
    return write_json_atomic(selection, out)


def distill(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    teachers: list[str | os.PathLike],
    student: str = "mobile_unet",
    temperature: float = 2.0,
    weight: float = 0.5,
    feature_weight: float = 0.0,
    config: TrainConfig | None = None,
    folds: list[int] | None = None,
    split_file: str | os.PathLike | None = None,
    num_workers: int = 2,
    show_progress: bool = True,
) -> list[TrainResult]:
    """Train ``student`` in ``work_dir`` on soft labels of ``teachers`` (model folders; all
    their folds are averaged) plus the supervised loss. The student uses the first
    teacher's plan unless ``work_dir`` has one, so both see the same inputs.
    ``feature_weight > 0`` adds feature distillation on every decoder level (U-Net-style
    student and teachers; see :class:`medseg.training.config.DistillConfig`).
    ``work_dir/model/distill_report.json`` compares student and teacher (Dice, speed)."""
    from medseg.distillation import distill_config_for
    from medseg.training.finetune import check_train_config

    work = Path(work_dir)
    spec = _require_clean(dataset)
    config, the_plan = distill_config_for(
        work,
        teachers,
        student=student,
        temperature=temperature,
        weight=weight,
        feature_weight=feature_weight,
        config=config,
        labels=spec.labels,
    )
    check_train_config(config, the_plan)  # before preprocessing: bad teachers fail fast
    results = _train(
        spec,
        work,
        folds=folds,
        config=config,
        split_file=split_file,
        resume=True,
        num_workers=num_workers,
        show_progress=show_progress,
        started=time.perf_counter(),
    )
    from medseg.distillation import distillation_report

    report = distillation_report(config.distill.teachers, work / "model")
    write_json_atomic(report, work / "model" / "distill_report.json")
    return results


def tune(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    space: str | os.PathLike | dict,
    trials: int = 20,
    time_budget_minutes: float | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    config: TrainConfig | None = None,
    fold: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    parallel: int = 1,
    show_progress: bool = True,
):
    """Optuna search over plan and training options (see :mod:`medseg.tuning`); the study
    lives in ``work_dir/tuning/study.db`` (a killed search resumes) and the best plan is
    written to ``work_dir/tuning/best_plan.json``."""
    from medseg.tuning import run_study

    return run_study(
        dataset,
        work_dir,
        space=space,
        trials=trials,
        time_budget_minutes=time_budget_minutes,
        sampler=sampler,
        pruner=pruner,
        config=config,
        fold=fold,
        seed=seed,
        num_workers=num_workers,
        parallel=parallel,
        show_progress=show_progress,
    )
