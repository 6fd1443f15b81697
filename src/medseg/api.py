"""The Python API: one typed function per pipeline step, keyword-only after the paths.

A thin facade over :mod:`medseg.workflow` (orchestration over a work folder, whose layout
it documents) and the stages. The ``medseg`` command line calls these functions.

Naming: ``dataset`` is a dataset folder, ``work_dir`` a work folder, ``model_dir`` a
model folder (or a work folder holding ``model/``) and ``model_dirs`` several,
``input_path`` an image file or folder, ``source`` DICOM files (a folder or zip),
``output_dir`` a folder written and ``output_path`` a file or folder written.
``num_workers``, ``overwrite`` and ``show_progress`` mean the same everywhere.

DICOM, PACS and the REST service need the ``hospital`` extra (pydicom, highdicom,
FastAPI): their facade functions import :mod:`medseg.dicom`, :mod:`medseg.pacs` and
:mod:`medseg.serve` when called, so the rest works without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg import workflow
from medseg.calibration import calibrate_model
from medseg.continual import ExtendResult
from medseg.continual import extend as extend_model
from medseg.ensembling import ensemble_predict_folder
from medseg.errors import MedsegError
from medseg.evaluation import EvaluationReport, evaluate_folders
from medseg.evaluation.biometry import BiometryReport, measure_folder
from medseg.evaluation.crossval import evaluate_cross_validation as evaluate_folds
from medseg.evaluation.metrics import compute_metrics as compute_all_metrics
from medseg.explain import explain_files
from medseg.export import ExportReport, export_model, prune_model_dir
from medseg.federated import (
    FederationConfig,
    join_federation,
    make_certificates,
    serve_federation,
    simulate_federation,
)
from medseg.imaging.lock import holds_folder
from medseg.io.check import CheckReport, check_dataset, require_clean
from medseg.io.dataset import DatasetSpec
from medseg.model_folder import ModelFolder
from medseg.planning import Fingerprint, Plan, read_plan
from medseg.planning.work_dir import PLAN_FILE, fingerprint_dataset, plan_dataset, plan_for
from medseg.preprocessing import preprocess_dataset
from medseg.pretraining import PretrainConfig, PretrainResult
from medseg.pretraining import pretrain as pretrain_images
from medseg.registration.learned import RegistrationTrainConfig, RegistrationTrainResult
from medseg.registration.pipeline import (
    atlas_segment_files,
    register_files,
    train_registration_dataset,
)
from medseg.training import TrainConfig
from medseg.tuning import run_study
from medseg.workflow import (  # the facade's orchestration functions, as they are
    coregister,
    demo,
    distill,
    filter_images,
    predict,
    run,
    segment_classical,
    select_ensemble,
    select_postprocessing,
    train,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from medseg.dicom import DicomSeries
    from medseg.pacs import SegmentationResult

__all__ = [
    "atlas_segment",
    "calibrate",
    "check",
    "compute_metrics",
    "coregister",
    "deidentify",
    "demo",
    "distill",
    "ensemble",
    "evaluate",
    "evaluate_cross_validation",
    "explain",
    "export",
    "extend",
    "filter_images",
    "fingerprint",
    "link_cases",
    "load_plan",
    "measure",
    "plan",
    "predict",
    "preprocess",
    "pretrain",
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

# --- dataset, plan, training, prediction, evaluation ---


def check(dataset: str | os.PathLike, *, num_workers: int = 2) -> CheckReport:
    """List every problem of a dataset folder (see :func:`medseg.io.check.check_dataset`)."""
    return check_dataset(dataset, workers=num_workers)


def fingerprint(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Fingerprint:
    """Compute and save ``work_dir/fingerprint.json``."""
    spec = require_clean(dataset)
    return fingerprint_dataset(spec, work_dir, num_workers=num_workers, show_progress=show_progress)


@holds_folder("plan", "work_dir")
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
    path = Path(work_dir) / PLAN_FILE
    if path.exists() and not overwrite:
        raise MedsegError(f"{path}: already exists (use --overwrite to re-plan)")
    spec = require_clean(dataset)
    return plan_dataset(
        spec, work_dir, gpu=gpu, num_workers=num_workers, show_progress=show_progress
    )


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a (possibly hand-edited) plan JSON, or the one in a work or model folder."""
    return read_plan(path)


@holds_folder("preprocess", "work_dir")
def preprocess(
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    coregister: str | None = None,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Path:
    """Preprocess all labelled cases with the work folder's plan (cached).

    ``coregister`` ("rigid", "affine" or "header") first puts every channel on channel
    0's grid in ``work_dir/coregistered`` (see :func:`medseg.workflow.coregister`) and
    preprocesses that dataset; train on it (``medseg train <work_dir>/coregistered``).
    """
    if coregister is not None:
        dataset = workflow.coregister(
            dataset,
            work_dir,
            method=coregister,
            num_workers=num_workers,
            show_progress=show_progress,
        )
    spec = require_clean(dataset)
    the_plan = plan_for(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
    return preprocess_dataset(
        spec, the_plan, work_dir, num_workers=num_workers, show_progress=show_progress
    )


@holds_folder("evaluate", "output_dir")
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
    **metric_options: Any,
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


def link_cases(
    spec: DatasetSpec, case_ids: list[str], folder: str | os.PathLike
) -> tuple[Path, Path]:
    """Symlink cases' images and labels into ``folder/images`` and ``folder/labels``
    (see :func:`medseg.workflow.link_cases`)."""
    return workflow.link_cases(spec, case_ids, Path(folder))


# --- metrics and evaluation (issue 3) ---


def evaluate_cross_validation(
    work_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    labels: dict[int, str] | str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    **metric_options: Any,
) -> EvaluationReport:
    """Evaluate every fold's validation predictions of a ``run`` work folder at once.

    The report pools all cases; ``summary["folds"]`` holds each fold's summary
    and ``summary["groups"]["fold"]`` the spread between folds.
    """
    return evaluate_folds(
        work_dir,
        output_dir=output_dir,
        labels=labels,
        overwrite=overwrite,
        show_progress=show_progress,
        **metric_options,
    )


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    labels: Iterable[int],
    spacing: Sequence[float] | None = None,
    **metric_options: Any,
) -> dict[int, dict[str, float | bool]]:
    """Every overlap and distance metric of two label arrays (see medseg.evaluation.compute_metrics)."""
    return compute_all_metrics(pred, ref, labels=labels, spacing=spacing, **metric_options)


# --- biometry (issue 24) ---


def measure(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    head: bool = False,
    head_label: int | None = None,
    labels: dict[int, str] | Sequence[int] | None = None,
    pixel_size: float | None = None,
    pixel_size_csv: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> BiometryReport:
    """Clinical measurements of a label map file or folder (``input_path``), with their units.

    Volume per label in mL (3D) or area in mm^2 (2D); with ``head``, the ellipse fitted to
    the fetal head's outline, HC (Ramanujan), BPD and OFD in mm; with ``reference`` (HC18's
    ``pixel_size_and_HC.csv``), absolute errors and Bland-Altman agreement. A PNG holds no
    pixel size: give ``pixel_size`` or ``pixel_size_csv`` (or a ``reference`` CSV with
    pixel sizes), else it is refused. With ``output_dir``: measurements.csv, summary.json,
    report.html. See :func:`medseg.evaluation.biometry.measure_folder`.
    """
    return measure_folder(
        input_path,
        output_dir,
        head=head,
        head_label=head_label,
        labels=labels,
        pixel_size=pixel_size,
        pixel_size_csv=pixel_size_csv,
        reference_csv=reference,
        images_dir=images_dir,
        overwrite=overwrite,
        show_progress=show_progress,
    )


# --- classical methods and filters (issue 4) ---


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
    model_dir: str | os.PathLike | None = None,
    precision: str = "fp32",
    report: bool = True,
    overwrite: bool = False,
) -> dict:
    """Register ``moving`` to ``fixed``; write the transform, warped image/labels, quality and report.

    ``model_dir`` is the learned model of ``method="learned"``. See
    :func:`medseg.registration.pipeline.register_files`.
    """
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
        model=model_dir,
        precision=precision,
        report=report,
        overwrite=overwrite,
    )


def train_registration(
    dataset: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    config: RegistrationTrainConfig | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> RegistrationTrainResult:
    """Train a learned (VoxelMorph-style) registration model on pairs of a dataset folder's cases."""
    return train_registration_dataset(
        dataset, model_dir, config=config, resume=resume, show_progress=show_progress
    )


def atlas_segment(
    target: str | os.PathLike,
    atlases: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    method: str = "demons",
    metric: str = "mattes",
    fusion: str = "majority",
    max_atlases: int | None = None,
    model_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Segment ``target`` by registering the labelled cases of ``atlases`` and fusing their labels."""
    return atlas_segment_files(
        target,
        atlases,
        output_path,
        method=method,
        metric=metric,
        fusion=fusion,
        max_atlases=max_atlases,
        model=model_dir,
        overwrite=overwrite,
        show_progress=show_progress,
    )


# --- fast inference and export (issue 6) ---


@holds_folder("export", "model_dir")
def export(
    model_dir: str | os.PathLike,
    *,
    fmt: str = "onnx",
    int8: tuple[str, ...] = (),
    folds: list[int] | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export a model folder to ``model/export/`` (ONNX fp32 + int8, or TorchScript), checked
    against PyTorch (see :func:`medseg.export.export_model`)."""
    return export_model(model_dir, fmt=fmt, int8=int8, folds=folds, overwrite=overwrite)


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
    return prune_model_dir(model_dir, output_dir, keep=keep, overwrite=overwrite)


# --- DICOM, PACS and the REST service (issue 7; the hospital extra) ---


def read_dicom(
    source: str | os.PathLike, *, series_uid: str | None = None, modality: str | None = None
) -> DicomSeries:
    """Read and check one DICOM series from a folder or zip (see :func:`medseg.dicom.read_series`)."""
    from medseg.dicom import read_series  # the hospital extra (pydicom)

    return read_series(source, series_uid=series_uid, modality=modality)


def deidentify(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    seed: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """De-identify DICOM files (PS3.15 basic profile, UIDs consistent within the study)."""
    from medseg.dicom import deidentify_folder  # the hospital extra (pydicom, dicognito)

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
) -> SegmentationResult:
    """Segment a DICOM series: ``image.nii.gz``, ``label.nii.gz``, DICOM SEG ``seg.dcm``
    (and ``rtstruct.dcm`` with ``rtstruct``)."""
    from medseg import pacs  # the hospital extra (pydicom, highdicom)

    out = Path(output_dir)
    if (out / "seg.dcm").exists() and not overwrite:
        raise MedsegError(f"{out / 'seg.dcm'}: already exists (use --overwrite)")
    return pacs.segment_dicom(
        pacs.load_predictor(model_dir, device=device),
        source,
        out,
        series_uid=series_uid,
        modality=modality,
        code_table=code_table,
        model_name=model_name,
        rtstruct=rtstruct,
        overwrite=overwrite,
    )


def serve_app(model_dir: str | os.PathLike, **options: Any) -> FastAPI:
    """The FastAPI application of ``medseg serve`` (options: :func:`medseg.serve.create_app`)."""
    from medseg.serve import create_app  # the hospital extra (FastAPI)

    return create_app(model_dir, **options)


# --- model zoo, tuning, distillation, ensembling (issue 8) ---


def ensemble(
    model_dirs: list[str | os.PathLike],
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
    return ensemble_predict_folder(
        model_dirs,
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
) -> dict:
    """Optuna search over plan and training options (see :mod:`medseg.tuning`); the study
    lives in ``work_dir/tuning/study.db`` (a killed search resumes) and the best plan is
    written to ``work_dir/tuning/best_plan.json``."""
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


# --- self-supervised pretraining (issue 17) ---


def pretrain(
    images: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    config: PretrainConfig | None = None,
    plan: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    fold: int = 0,
    resume: bool = True,
    num_workers: int = 2,
    show_progress: bool = True,
) -> PretrainResult:
    """Pretrain the plan's U-Net encoder on unlabelled images (``mae``, ``contrastive`` or
    ``genesis``) into ``work_dir/model``; fine-tune with :func:`train` and
    ``TrainConfig(init_from=work_dir)``. ``plan`` is the fine-tuning plan (a plan JSON, or
    a work or model folder), so the encoder fits it exactly (see
    :func:`medseg.pretraining.pretrain`)."""
    return pretrain_images(
        images,
        work_dir,
        config=config,
        plan=plan,
        split_file=split_file,
        fold=fold,
        resume=resume,
        num_workers=num_workers,
        show_progress=show_progress,
    )


# --- trust: calibration, quality control, explanations (issue 20) ---


def calibrate(
    model_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mode: str = "global",
    mirror: bool = False,
    mc_samples: int = 0,
    max_cases: int | None = None,
    fit_region: str = "crop",
    target_recall: float = 0.8,
    failure_quantile: float = 0.1,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Fit temperature scaling (``mode`` "global" or "per_class") and the ``predict --qc``
    review threshold on the model's cross-validation predictions only (each fold predicts
    its own validation cases); store them in ``calibration.json`` in the model folder, which
    :func:`predict` then applies. ``mirror`` (TTA) and ``mc_samples`` should match how you
    predict. ``fit_region`` "bbox" fits only inside each case's reference-foreground
    bounding box. See :func:`medseg.calibration.calibrate_model`."""
    folder = ModelFolder.open(model_dir)
    return calibrate_model(
        folder.path,
        folds=folds,
        mode=mode,
        mirror_axes=tuple(range(folder.plan.ndim)) if mirror else (),
        mc_samples=mc_samples,
        max_cases=max_cases,
        fit_region=fit_region,
        target_recall=target_recall,
        failure_quantile=failure_quantile,
        device=device,
        overwrite=overwrite,
        show_progress=show_progress,
    )


def explain(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    method: str = "occlusion",
    class_value: str | int,
    region: str | os.PathLike | None = None,
    fold: int | None = None,
    window: tuple[int, ...] | None = None,
    stride: tuple[int, ...] | None = None,
    steps: int = 32,
    device: str = "auto",
) -> dict:
    """Attribution map of one class (a name or label value) of an image ``input_path`` (or
    its channel files): ``method``
    "occlusion", "gradcam" or "integrated_gradients" (captum), inside ``region`` (a mask
    file on the image's grid; default: the predicted segmentation of the class). Writes the
    NIfTI map, a PNG overlay, a JSON record and ``report.html`` into ``output_dir``; returns
    the record. See :func:`medseg.explain.explain_files`."""
    return explain_files(
        model_dir,
        input_path,
        output_dir,
        method=method,
        class_value=class_value,
        region=region,
        fold=fold,
        window=window,
        stride=stride,
        steps=steps,
        device=device,
    )


def federated_certs(
    output_dir: str | os.PathLike,
    *,
    sites: list[str],
    hosts: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """A federation's CA, SuperLink certificate (for ``hosts``) and one key pair per site.
    See :mod:`medseg.federated.certs`."""
    certs = make_certificates(output_dir, sites=sites, hosts=hosts, overwrite=overwrite)
    return {
        "ca_certificate": str(certs.ca_certificate),
        "server_certificate": str(certs.server_certificate),
        "server_key": str(certs.server_key),
        "node_keys": {site: str(path) for site, path in certs.node_keys.items()},
    }


def federated_server(
    output_dir: str | os.PathLike,
    *,
    certs_dir: str | os.PathLike,
    config: FederationConfig,
    host: str = "127.0.0.1",
    port: int = 9092,
    connect_host: str = "127.0.0.1",
) -> dict:
    """Coordinate a federated run (Flower SuperLink, TLS, node authentication); each round's
    global model is a model folder ``output_dir/round_<r>``. See :mod:`medseg.federated.deploy`."""
    return serve_federation(
        output_dir, certs_dir, config, host=host, port=port, connect_host=connect_host
    )


def federated_client(
    dataset: str | os.PathLike,
    *,
    server: str,
    certs_dir: str | os.PathLike,
    key: str | os.PathLike,
    work_dir: str | os.PathLike,
    name: str = "site",
    runtime_port: int | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
) -> int:
    """Join a federation as a site (a Flower SuperNode) until stopped; only weights and
    counts leave the site."""
    return join_federation(
        dataset,
        server=server,
        certs_dir=certs_dir,
        key=key,
        work_dir=work_dir,
        name=name,
        runtime_port=runtime_port,
        device=device,
        num_threads=num_threads,
    )


def federated_simulate(
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    sites: int,
    split_by: str,
    config: FederationConfig,
    split_file: str | os.PathLike | None = None,
    deployment: bool = False,
    num_threads: int | None = 1,
) -> dict:
    """Federate one dataset split into ``sites`` on this machine (in process, or as a real
    loopback deployment with ``deployment=True``)."""
    return simulate_federation(
        dataset,
        output_dir,
        config,
        sites=sites,
        split_by=split_by,
        split_file=split_file,
        deployment=deployment,
        num_threads=num_threads,
    )


# --- continual learning ---


def extend(
    model_dir: str | os.PathLike,
    dataset: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    method: str = "naive",
    exemplars: int = 5,
    old_dataset: str | os.PathLike | None = None,
    fold: int | None = None,
    config: TrainConfig | None = None,
    split_file: str | os.PathLike | None = None,
    weight: float | None = None,
    head_init: str = "copy",
    num_workers: int = 2,
    show_progress: bool = True,
) -> ExtendResult:
    """Extend a trained model with new classes or a new site without forgetting the old
    (``work_dir/model`` is the extended model folder; see :mod:`medseg.continual.extend`).

    ``method`` is naive, lwf, mib, plop, rehearsal or ewc; ``exemplars`` (K) bounds the
    old cases kept, chosen from ``old_dataset`` (which also measures forgetting) or
    inherited from ``model_dir``; ``head_init`` "mib" starts new classes as copies of the
    background classifier (MiB) instead of a fresh initialization.
    """
    return extend_model(
        model_dir,
        dataset,
        work_dir,
        method=method,
        exemplars=exemplars,
        old_dataset=old_dataset,
        fold=fold,
        config=config,
        split_file=split_file,
        weight=weight,
        head_init=head_init,
        num_workers=num_workers,
        show_progress=show_progress,
    )
