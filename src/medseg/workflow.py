"""Orchestration of the pipeline steps over a work folder: train folds, run, demo, distill.

:mod:`medseg.api` is the keyword-only facade over these functions and the stages; the
CLI calls the facade. Work folder layout (``work_dir``)::

    dataset.json       what was found in the dataset folder (DatasetSpec)
    fingerprint.json   dataset statistics
    plan.json          the editable plan; training reads it back
    preprocessed/      cached preprocessed cases, one folder per plan
    model/             plan.json, dataset.json, splits.json, fold_<k>/ (see medseg.model_folder)
    validation/        predictions of each fold's validation cases, original geometry
    evaluation/        metrics.csv, summary.json, report.html per fold (and the test set)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medseg.classical import run_method
from medseg.classical.batch import map_images
from medseg.distillation import distill_config_for, distillation_report, make_distillation_hook
from medseg.ensembling import select_best
from medseg.errors import MedsegError
from medseg.evaluation import evaluate_folders
from medseg.filters import apply_filter
from medseg.imaging.lock import holds_folder
from medseg.inference import Prediction, predict_to_folder
from medseg.inference.fanout import predict_fanout, raise_failures
from medseg.inference.postprocess import PostprocessConfig
from medseg.inference.postprocess_selection import select_postprocessing as select_on_folds
from medseg.io.check import require_clean
from medseg.io.dataset import DatasetSpec
from medseg.io.files import read_image, strip_suffix
from medseg.io.phantoms import write_phantom_dataset
from medseg.model_folder import ModelFolder
from medseg.planning.work_dir import plan_for
from medseg.preprocessing import preprocess_dataset
from medseg.preprocessing.coregister import coregister_dataset
from medseg.registration.coregister import channel_aligner
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training import (
    TrainConfig,
    TrainResult,
    make_folds,
    read_splits,
    train_fold,
    write_splits,
)
from medseg.training.distributed import (
    DataParallelHook,
    join_process_group,
    launch,
    main_first,
    peer_failures,
    rank_device,
    rank_env,
    threads_per_rank,
)
from medseg.training.finetune import check_train_config
from medseg.training.splits import labelled_subset

__all__ = [
    "coregister",
    "demo",
    "distill",
    "filter_images",
    "image_options",
    "link_cases",
    "make_splits",
    "predict",
    "run",
    "segment_classical",
    "select_ensemble",
    "select_postprocessing",
    "train",
    "train_folds",
]


def make_splits(
    spec: DatasetSpec,
    model_dir: Path,
    *,
    num_folds: int,
    seed: int,
    split_file: str | os.PathLike | None,
) -> list[dict[str, list[str]]]:
    """The folds of a model folder: ``split_file``, else its ``splits.json``, else k-fold.

    Every case named must be in ``spec``; the folds are (re)written to
    ``model_dir/splits.json``.
    """
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


def train_folds(
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
    data_parallel: bool = False,
) -> list[TrainResult]:
    """Plan (if needed), preprocess (cached) and train ``folds`` (default: fold 0) of a checked dataset.

    ``config.time_budget_minutes`` counts from ``started`` (a ``time.perf_counter()``
    value) and is shared by the remaining folds. ``config.distill`` attaches the
    distillation hook (a new one for every fold). ``data_parallel``: this process is one
    rank of a torchrun (or ``--nproc``) run (see :mod:`medseg.training.distributed`).
    """
    config = config or TrainConfig()
    env = rank_env() if data_parallel else None
    if env is not None:
        if config.freeze_epochs or config.distill is not None:  # parameters outside DDP
            raise MedsegError("--freeze-epochs and distillation run in one process (no --nproc)")
        join_process_group(env, device=config.device)
        threads, note = threads_per_rank(env, config.num_threads)
        config = replace(config, num_threads=threads, device=rank_device(env, config.device))
    with main_first(env):  # rank 0 plans and preprocesses; the other ranks read its cache
        the_plan = plan_for(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
        pre = preprocess_dataset(
            spec, the_plan, work_dir, num_workers=num_workers, show_progress=show_progress
        )
    model_dir = Path(work_dir) / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(the_plan, model_dir / "plan.json")
    write_json_atomic(spec.to_json(), model_dir / "dataset.json")
    all_folds = make_splits(
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
        # Distillation is an engine hook; a new one for every fold.
        hooks = [make_distillation_hook(config.distill, the_plan)] if config.distill else []
        if env is not None:
            hooks.append(DataParallelHook(env, threads=threads, note=note))
        train_ids = all_folds[fold]["train"]
        if config.labelled_fraction is not None or config.labelled_cases is not None:
            train_ids = labelled_subset(
                train_ids,
                fraction=config.labelled_fraction,
                cases=config.labelled_cases,
                seed=config.seed,
            )
            write_json_atomic(
                {
                    "fraction": config.labelled_fraction,
                    "cases": config.labelled_cases,
                    "seed": config.seed,
                    "of": len(all_folds[fold]["train"]),
                    "train": train_ids,
                },
                model_dir / f"fold_{fold}" / "labelled_subset.json",
            )
        results.append(
            train_fold(
                the_plan,
                pre,
                model_dir / f"fold_{fold}",
                fold_config,
                train_ids=train_ids,
                val_ids=all_folds[fold]["val"],
                resume=resume,
                show_progress=show_progress,
                hooks=hooks,
            )
        )
    return results


def _in_a_rank() -> bool:
    """A rank of a data-parallel run: its launcher holds the work folder's lock."""
    return rank_env() is not None


@holds_folder("train", "work_dir", unless=_in_a_rank)
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
    nproc: int = 1,
) -> list[TrainResult]:
    """Plan (if needed), preprocess (cached) and train the given folds (default: fold 0).

    The plan is read back from ``work_dir/plan.json``, so hand edits take effect.
    ``config.time_budget_minutes`` is shared by all folds and counts the
    preprocessing too. ``nproc`` > 1 trains data parallel in that many processes on
    this machine; under torchrun every process is a rank (``nproc`` is then ignored).
    """
    started = time.perf_counter()
    spec = require_clean(dataset)
    env = rank_env()
    if nproc > 1 and env is None:
        return train_ranks(
            dataset, work_dir, nproc=nproc, folds=folds, config=config, split_file=split_file,
            resume=resume, num_workers=num_workers, show_progress=show_progress,
            started=started,
        )  # fmt: skip
    with peer_failures(env):  # a dead rank: a one-line error here, not a hang
        return train_folds(
            spec,
            work_dir,
            folds=folds,
            config=config,
            split_file=split_file,
            resume=resume,
            num_workers=num_workers,
            show_progress=show_progress,
            started=started,
            data_parallel=env is not None,
        )


def train_ranks(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    nproc: int,
    folds: list[int] | None,
    config: TrainConfig | None,
    split_file: str | os.PathLike | None,
    resume: bool,
    num_workers: int,
    show_progress: bool,
    started: float,
) -> list[TrainResult]:
    """:func:`train` as ``nproc`` ranks on this machine: plan and preprocess here once,
    then start the ranks (each runs :func:`train`); rank 0's results are read back."""
    config = config or TrainConfig()
    spec = require_clean(dataset)
    the_plan = plan_for(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
    preprocess_dataset(
        spec, the_plan, work_dir, num_workers=num_workers, show_progress=show_progress
    )
    if config.time_budget_minutes is not None:  # the ranks' clocks start now
        left = config.time_budget_minutes - (time.perf_counter() - started) / 60
        config = replace(config, time_budget_minutes=max(left, 0.1))
    options = {"folds": folds, "config": config, "split_file": split_file, "resume": resume}
    launch(
        train,
        {"dataset": dataset, "work_dir": work_dir, "nproc": nproc, **options,
         "num_workers": num_workers, "show_progress": show_progress},
        nproc=nproc,
        threads=config.num_threads,
    )  # fmt: skip
    model_dir = Path(work_dir) / "model"
    return [
        TrainResult(**json.loads((model_dir / f"fold_{f}" / "train_result.json").read_text()))
        for f in (folds if folds is not None else [0])
    ]


@holds_folder("predict", "output_dir")
def predict(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror: bool = False,
    mirror_axes: tuple[int, ...] | None = None,
    largest_component: bool = False,
    fill_holes: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    backend: str = "torch",
    num_workers: int = 2,
    uncertainty: bool = False,
    postprocess: bool = True,
    precision: str = "auto",
    show_progress: bool = True,
    nan_policy: str = "refuse",
    missing: Sequence[str] = (),
    engine: str | None = None,
    address: str | None = None,
    probabilities: str | None = None,
    mc_samples: int = 0,
    qc: bool = False,
    calibrated: bool = True,
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
    are skipped, so a killed run resumes. ``nan_policy`` "refuse" (default) stops at an
    input with NaN or infinite voxels; "zero" sets them to 0 with a warning naming the file.
    ``engine`` "local" or "ray" fans the cases out over ``num_workers`` processes or Ray
    actors (``address``: a Ray cluster), see :mod:`medseg.inference.fanout`.
    The model folder's temperature (``medseg calibrate``) is applied unless ``calibrated``
    is False; ``probabilities`` "nifti"/"npz" writes calibrated class probabilities,
    ``mc_samples`` adds MC-dropout members, ``qc`` writes ``qc.csv`` (per-case uncertainty
    score and review flag), see :func:`medseg.inference.batch.predict_batch`.
    ``missing`` names channels to predict without (cases may also lack ``_XXXX`` channel
    files); it needs a model trained with modality dropout (docs/multimodal.md).
    """
    folder = ModelFolder.open(model_dir)
    if mirror_axes is None:
        mirror_axes = tuple(range(folder.plan.ndim)) if mirror else ()
    if engine is not None:  # fan-out: ``num_workers`` processes or Ray actors (issue 21)
        if missing:
            raise MedsegError("missing-modality prediction runs in one process (no --engine)")
        if probabilities or mc_samples or qc or not calibrated:
            raise MedsegError(
                "--probabilities, --mc-dropout, --qc and --no-calibration run in one process "
                "(no --engine)"
            )
        fanned = predict_fanout(
            folder.path, input_path, output_dir, engine=engine, workers=num_workers,
            address=address, folds=folds, mirror_axes=tuple(mirror_axes),
            largest_component=largest_component, fill=fill_holes, overwrite=overwrite,
            device=device, backend=backend, postprocess=postprocess, uncertainty=uncertainty,
            precision=precision, nan_policy=nan_policy, show_progress=show_progress,
        )  # fmt: skip
        raise_failures(fanned, output_dir)
        return fanned.predictions
    return predict_to_folder(
        folder.path,
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
        nan_policy=nan_policy,
        missing=missing,
        probabilities=probabilities,
        mc_samples=mc_samples,
        qc=qc,
        calibrated=calibrated,
    )


def coregister(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    method: str = "rigid",
    num_workers: int = 2,
    show_progress: bool = True,
) -> Path:
    """Put every channel of every case on its channel 0's grid: ``work_dir/coregistered``.

    ``method`` "rigid" or "affine" registers each channel to channel 0 first (Mattes
    mutual information from the header alignment; kept only where it improves the
    metric), "header" only resamples through the headers. The transforms are saved per
    case (``transforms/``). The result is a dataset folder in the nnU-Net v2 layout that
    passes ``medseg check``; plan, preprocess and train on it.
    """
    spec = require_clean(dataset, allow_channel_grids=True)
    return coregister_dataset(
        spec,
        Path(work_dir) / "coregistered",
        align=channel_aligner(method),
        method=method,
        num_workers=num_workers,
        show_progress=show_progress,
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


@holds_folder("run", "work_dir")
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
    spec = require_clean(dataset)
    results = train_folds(
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
        report = evaluate_folders(
            pred_dir,
            refs,
            labels=labels,
            output_dir=out,
            overwrite=True,
            images_dir=images,
            curves_png=Path(result.fold_dir) / "curves.png",
            title=f"medseg: {spec.name}, fold {fold} validation",
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
        report = evaluate_folders(
            pred_dir,
            refs,
            labels=labels,
            output_dir=work / "evaluation" / "test",
            overwrite=True,
            images_dir=images,
            curves_png=Path(results[0].fold_dir) / "curves.png",
            title=f"medseg: {spec.name}, held-out test cases",
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
    work = Path(work_dir)
    spec = require_clean(dataset)
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
    results = train_folds(
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
    report = distillation_report(config.distill.teachers, work / "model")
    write_json_atomic(report, work / "model" / "distill_report.json")
    return results


def image_options(options: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    """``options`` with the image file paths under ``keys`` (mask, markers, ...) read into images."""
    options = dict(options or {})
    for key in keys:
        if isinstance(options.get(key), str | os.PathLike):
            options[key] = read_image(options[key])
    return options


def segment_classical(
    method: str,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> list[Path]:
    """Segment an image file or a folder with a classical method of :data:`medseg.classical.METHODS`.

    ``options`` are the method's keyword options; ``mask``, ``markers`` and
    ``init`` may be image file paths. Outputs keep the input geometry.
    """
    options = image_options(options, ("mask", "markers", "init"))
    return map_images(
        lambda image: run_method(image, method, **options),
        input_path,
        output_path,
        overwrite=overwrite,
        show_progress=show_progress,
        desc=method,
    )


def filter_images(
    name: str,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    options: dict[str, Any] | None = None,
    output_dtype: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> list[Path]:
    """Apply a filter of :data:`medseg.filters.FILTERS` to an image file or a folder.

    ``reference`` (histogram matching) and ``mask`` may be image file paths;
    ``output_dtype`` rounds and casts the float32 result (e.g. ``uint8`` for PNG).
    """
    options = image_options(options, ("reference", "mask"))
    return map_images(
        lambda image: apply_filter(image, name, **options),
        input_path,
        output_path,
        overwrite=overwrite,
        output_dtype=output_dtype,
        show_progress=show_progress,
        desc=name,
    )


def select_postprocessing(
    model_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror: bool = False,
    max_cases: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
) -> PostprocessConfig:
    """Choose thresholds, component and hole filling per class on the validation folds and
    record them in ``postprocessing.json`` (applied by :func:`predict` from then on)."""
    folder = ModelFolder.open(model_dir)
    return select_on_folds(
        folder.path,
        folds=folds,
        mirror_axes=tuple(range(folder.plan.ndim)) if mirror else (),
        max_cases=max_cases,
        device=device,
        overwrite=overwrite,
        show_progress=show_progress,
    )


def select_ensemble(
    model_dirs: list[str | os.PathLike],
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
    out = Path(output_json)
    if out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists (use --overwrite)")
    selection = select_best(
        model_dirs,
        folds=folds,
        methods=methods,
        max_members=max_members,
        mirror=mirror,
        device=device,
        show_progress=show_progress,
    )
    return write_json_atomic(selection, out)
