"""Batch prediction of a folder: reading, preprocessing, the network and writing overlap.

A pool of reader threads loads and preprocesses the next cases while the network
runs (PyTorch and onnxruntime release the GIL), and a writer thread compresses and
writes finished cases. Every output is written to a temporary file and renamed, so
a killed run leaves only finished files (plus hidden ``.tmp-*`` files, removed when
the next run into the same folder starts) and resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.predictor import Prediction, Predictor, TrustResult
from medseg.inference.uncertainty import PROBABILITY_FORMATS, write_probabilities
from medseg.io.files import image_suffix, read_image_channels, strip_suffix, write_image
from medseg.io.image import Image
from medseg.preprocessing.preprocess import CaseGeometry
from medseg.progress import progress
from medseg.serialization import from_jsonable, write_json_atomic


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``.tmp-*`` files that an interrupted run left in ``folder``."""
    removed = []
    for tmp in folder.glob(".tmp-*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _output_path(case_id: str, files: list[Path], output_dir: Path, fmt: str | None) -> Path:
    suffix = fmt or (
        ".png" if image_suffix(files[0]) in (".png", ".jpg", ".jpeg", ".bmp") else ".nii.gz"
    )
    return output_dir / f"{case_id}{suffix}"


def _merge_predictions(path: Path, new: list[Prediction]) -> None:
    """Add this run's records to ``predictions.json``, keeping earlier runs' other cases."""
    old: list[Prediction] = []
    if path.exists():
        try:
            old = [from_jsonable(Prediction, d) for d in json.loads(path.read_text())]
        except (ValueError, TypeError, KeyError):
            old = []
    done = {p.case_id for p in new}
    write_json_atomic([p for p in old if p.case_id not in done] + new, path)


def predict_batch(
    predictor: Predictor,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    mirror_axes: tuple[int, ...] = (),
    largest_component: bool = False,
    fill: bool = False,
    overwrite: bool = False,
    output_format: str | None = None,
    postprocess: bool = True,
    uncertainty: bool = False,
    num_workers: int = 1,
    show_progress: bool = True,
    probabilities: str | None = None,
    mc_samples: int = 0,
    qc: bool = False,
    missing: Sequence[str] = (),
) -> list[Prediction]:
    """Predict every case under ``input_path`` into ``output_dir``; resumable.

    Parameters
    ----------
    predictor
        A loaded :class:`~medseg.inference.predictor.Predictor`.
    input_path
        A file, a folder of files (``case_0000.nii.gz`` channels are grouped) or DICOM series.
    output_dir
        Output folder; a case whose output exists is skipped unless ``overwrite``.
    mirror_axes, largest_component, fill, postprocess, uncertainty
        As :meth:`Predictor.predict_case`; ``uncertainty`` also writes
        ``<case>_entropy.nii.gz``.
    num_workers
        Reader threads (cases read and preprocessed ahead of the network).
    show_progress
        Progress bar on stderr.
    probabilities
        ``"nifti"`` or ``"npz"``: also write the calibrated class probabilities,
        ``<case>_probabilities.nii.gz`` (4D, 16-bit) or ``<case>_probabilities.npz`` (float16).
    mc_samples
        MC-dropout samples per fold and mirrored copy (0: none; the network needs dropout).
    qc
        Write ``qc.csv``: every case's uncertainty score and whether to review it, by the
        threshold ``medseg calibrate`` chose on the validation folds.
        ``probabilities``, ``mc_samples`` and ``qc`` run each member on its own
        (:meth:`Predictor.infer_trust`); with ``uncertainty`` they add
        ``<case>_mutual_information.nii.gz`` when there are several members.
    missing
        Channels (names or numbers) to predict without, even where a case has them. A
        case whose ``_XXXX`` channel files leave some out lacks those too. Both need a model
        trained with modality dropout (else a one-line error names the channel).

    Returns
    -------
    list of Prediction
        One record per case predicted in this run (also merged into ``predictions.json``).
    """
    output_dir = Path(output_dir)
    # inputs first, so that a wrong input path leaves no empty output folder behind
    num_channels = predictor.plan.num_channels
    named = predictor.missing_channels(missing)
    groups = group_inputs(collect_inputs(input_path), num_channels, allow_missing=True)
    for files in groups.values():  # refuse before any work when a case lacks channel files
        numbers = {channel_number(f) for f in files}
        if num_channels > 1 and None not in numbers and max(numbers) < num_channels:
            predictor.missing_channels([*named, *(set(range(num_channels)) - numbers)])
    trust = check_trust_options(predictor, probabilities, mc_samples, qc)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    jobs = []
    for case_id, files in groups.items():
        out_path = _output_path(case_id, files, output_dir, output_format)
        if overwrite or not out_path.exists():
            jobs.append((case_id, files, out_path))
    skipped = len(groups) - len(jobs)
    if skipped and show_progress:
        print(
            f"{skipped} case(s) already predicted in {output_dir}: skipped "
            "(use --overwrite to predict them again)",
            file=sys.stderr,
        )
    workers = max(1, int(num_workers))

    def load(files: list[Path]) -> tuple[Image, np.ndarray, CaseGeometry]:
        channels, absent = select_channels(files, num_channels, named)
        # errors (channels, 2D/3D, NaN) name the input file
        source = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        data, geometry = predictor.prepare(channels, source=source, missing=absent)
        return channels[0], data, geometry

    results: list[Prediction] = []
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="medseg-read") as readers,
        ThreadPoolExecutor(1, thread_name_prefix="medseg-write") as writer,
    ):
        queue: deque[tuple[tuple, Future, float]] = deque()
        pending = iter(jobs)

        def submit_next() -> None:
            job = next(pending, None)
            if job is not None:
                queue.append((job, readers.submit(load, job[1]), time.perf_counter()))

        for _ in range(workers + 1):  # bounded read-ahead keeps memory flat
            submit_next()
        writes: deque[Future] = deque()
        for _ in progress(range(len(jobs)), total=len(jobs), desc="predict", enabled=show_progress):
            (case_id, files, out_path), future, started = queue.popleft()
            reference, data, geometry = future.result()
            submit_next()
            trusted: TrustResult | None = None
            if trust:
                trusted = predictor.infer_trust(
                    data,
                    geometry,
                    reference,
                    mirror_axes=mirror_axes,
                    mc_samples=mc_samples,
                    probabilities=probabilities is not None,
                    largest_component=largest_component,
                    fill=fill,
                    postprocess=postprocess,
                )
                label, entropy = trusted.label, trusted.entropy if uncertainty else None
                # written before the label file, which marks the case done
                writes.append(
                    writer.submit(
                        write_trust_files,
                        trusted,
                        out_path,
                        probabilities=probabilities,
                        mutual_information=uncertainty,
                        labels=dict(predictor.plan.labels),
                    )
                )
            else:
                label, entropy = predictor.infer(
                    data,
                    geometry,
                    reference,
                    mirror_axes=mirror_axes,
                    largest_component=largest_component,
                    fill=fill,
                    postprocess=postprocess,
                    uncertainty=uncertainty,
                )
            del data
            writes.append(writer.submit(write_case, label, entropy, out_path, overwrite=overwrite))
            while len(writes) > 2:  # at most two finished cases wait in memory
                writes.popleft().result()
            results.append(
                Prediction(
                    case_id=case_id,
                    inputs=tuple(str(f) for f in files),
                    output=str(out_path),
                    folds=tuple(predictor.folds),
                    mirror_axes=tuple(mirror_axes),
                    seconds=round(time.perf_counter() - started, 3),
                    label_volumes_mm3=label_volumes(label, predictor.plan),
                    quality=trusted.scores if trusted is not None else None,
                )
            )
        while writes:
            writes.popleft().result()
    if results:
        _merge_predictions(output_dir / "predictions.json", results)
    if qc:
        write_qc_csv(output_dir, list(groups), predictor.calibration)
    return results


def group_inputs(
    paths: list[Path], num_channels: int, *, allow_missing: bool = False
) -> dict[str, list[Path]]:
    """Group input files into cases: ``case_0000.nii.gz``, ``case_0001.nii.gz`` ... or one file per case.

    ``allow_missing`` accepts cases with fewer channel files than ``num_channels``.
    """
    groups: dict[str, list[Path]] = {}
    for path in sorted(paths):
        stem = strip_suffix(path) if path.is_file() else path.name
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            groups.setdefault(stem[:-5], []).append(path)
        else:
            groups.setdefault(stem, []).append(path)
    for case_id, files in groups.items():
        if (
            num_channels > 1
            and len(files) != num_channels
            and not (len(files) == 1 and files[0].is_file())
            and not (allow_missing and len(files) < num_channels)
        ):
            raise MedsegError(
                f"{files[0].parent}: case {case_id} has {len(files)} file(s), the model needs {num_channels} channels"
            )
    return groups


def collect_inputs(input_path: str | os.PathLike) -> list[Path]:
    """Image files of a folder, one file, or a DICOM series folder."""
    path = Path(input_path)
    if not path.exists():
        raise MedsegError(f"{path}: not found")
    if path.is_file():
        return [path]
    files = [
        p
        for p in sorted(path.iterdir())
        if p.is_file() and image_suffix(p) and not p.name.startswith(".")
    ]
    if files:
        return files
    subdirs = [p for p in sorted(path.iterdir()) if p.is_dir()]
    if subdirs:  # a folder of DICOM series folders
        return subdirs
    if not any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()):
        raise MedsegError(f"{path}: empty folder (no image files or DICOM series)")
    return [path]  # a DICOM series folder itself


def predict_to_folder(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror_axes: tuple[int, ...] = (),
    largest_component: bool = False,
    fill: bool = False,
    overwrite: bool = False,
    output_format: str | None = None,
    device: str = "auto",
    backend: str = "torch",
    postprocess: bool = True,
    uncertainty: bool = False,
    num_workers: int = 1,
    precision: str = "auto",
    show_progress: bool = True,
    nan_policy: str = "refuse",
    missing: Sequence[str] = (),
    probabilities: str | None = None,
    mc_samples: int = 0,
    qc: bool = False,
    calibrated: bool = True,
) -> list[Prediction]:
    """Predict every case under ``input_path`` into ``output_dir`` (same geometry as the input).

    Cases whose output exists are skipped unless ``overwrite`` (so an interrupted run
    resumes). Reading and writing overlap with the network (see
    :func:`medseg.inference.batch.predict_batch`). ``nan_policy``: see
    :class:`~medseg.inference.predictor.Predictor`. ``missing``: channels to predict
    without (see :func:`predict_batch`). ``probabilities``, ``mc_samples``, ``qc``: see
    :func:`predict_batch`; ``calibrated`` applies the model folder's temperature.
    """
    predictor = Predictor(
        model_dir,
        folds=folds,
        device=device,
        backend=backend,
        precision=precision,
        nan_policy=nan_policy,
        calibrated=calibrated,
    )
    return predict_batch(
        predictor,
        input_path,
        output_dir,
        mirror_axes=mirror_axes,
        largest_component=largest_component,
        fill=fill,
        overwrite=overwrite,
        output_format=output_format,
        postprocess=postprocess,
        uncertainty=uncertainty,
        num_workers=num_workers,
        show_progress=show_progress,
        missing=missing,
        probabilities=probabilities,
        mc_samples=mc_samples,
        qc=qc,
    )


def label_volumes(label: Image, plan) -> dict[str, float]:
    voxel = float(np.prod(label.spacing))
    counts = np.bincount(label.array.ravel().astype(np.int64), minlength=plan.num_classes)
    names = dict(plan.labels)
    return {names.get(v, str(v)): float(counts[v] * voxel) for v in range(1, len(counts))}


def channel_number(path: Path) -> int | None:
    """The channel of an nnU-Net style ``<case>_<XXXX>`` file name, or None."""
    stem = path.name if path.is_dir() else strip_suffix(path)
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return int(stem[-4:])
    return None


def select_channels(
    files: list[Path], num_channels: int, missing: tuple[int, ...] = ()
) -> tuple[list[Image], tuple[int, ...]]:
    """The channels of one case to predict from, in plan order, and those it lacks.

    A case with every channel drops the ``missing`` ones. Otherwise ``_XXXX`` file
    names say which channels are there; a case without them (e.g. a 4D file with
    fewer volumes) must lack exactly the ``missing`` channels, in order.
    """
    per_file = [read_image_channels(f) for f in files]
    flat = [c for group in per_file for c in group]
    if len(flat) == num_channels:
        return [c for i, c in enumerate(flat) if i not in missing], tuple(missing)
    numbers = [channel_number(f) for f in files]
    if None not in numbers and all(len(g) == 1 for g in per_file):
        present = {n: g[0] for n, g in zip(numbers, per_file) if n not in missing}
        absent = tuple(sorted(set(range(num_channels)) - set(present)))
        return [present[n] for n in sorted(present) if n < num_channels], absent
    return flat, tuple(missing)


def read_case(files: list[Path]) -> list[Image]:
    channels: list[Image] = []
    for f in files:
        channels.extend(read_image_channels(f))
    return channels


def write_case(label: Image, entropy: Image | None, out_path: Path, *, overwrite: bool) -> None:
    if entropy is not None:  # written first: the label file marks the case done
        name = out_path.name[: len(out_path.name) - len(image_suffix(out_path))]
        write_image(
            entropy.with_array(entropy.array.astype(np.float32)),
            out_path.with_name(f"{name}_entropy.nii.gz"),
            overwrite=True,
        )
    write_image(label, out_path, overwrite=overwrite)


QC_FILE = "qc.csv"


def check_trust_options(
    predictor: Predictor, probabilities: str | None, mc_samples: int, qc: bool
) -> bool:
    """Whether members run one by one; one-line errors for options that cannot work."""
    if probabilities is not None and probabilities not in PROBABILITY_FORMATS:
        raise MedsegError(
            f"unknown probability format {probabilities!r} (use {', '.join(PROBABILITY_FORMATS)})"
        )
    if mc_samples < 0:
        raise MedsegError(f"MC-dropout samples must be >= 0 (got {mc_samples})")
    if mc_samples:
        predictor.member_forwards(mc_samples)  # refuses a network without dropout
    if qc and (predictor.calibration is None or predictor.calibration.qc_threshold is None):
        raise MedsegError(
            f"{predictor.model_dir}: no review threshold for --qc (run `medseg calibrate` first)"
        )
    return probabilities is not None or mc_samples > 0 or qc


def _stem(out_path: Path) -> str:
    return out_path.name[: len(out_path.name) - len(image_suffix(out_path))]


def write_trust_files(
    result: TrustResult,
    out_path: Path,
    *,
    probabilities: str | None,
    mutual_information: bool,
    labels: dict[int, str],
) -> None:
    """The probabilities and mutual-information map of :meth:`Predictor.infer_trust`."""
    name = _stem(out_path)
    if probabilities is not None and result.probabilities is not None:
        suffix = ".npz" if probabilities == "npz" else ".nii.gz"
        write_probabilities(
            result.probabilities,
            result.label,
            out_path.with_name(f"{name}_probabilities{suffix}"),
            labels=labels,
        )
    if mutual_information and result.mutual_information is not None:
        mi = result.mutual_information
        write_image(
            mi.with_array(mi.array.astype(np.float32)),
            out_path.with_name(f"{name}_mutual_information.nii.gz"),
            overwrite=True,
        )


def write_qc_csv(output_dir: Path, case_ids: list[str], calibration) -> Path:
    """``qc.csv``: one row per case of the input, its score and whether to review it.

    Scores come from ``predictions.json`` (this run and earlier ones); a case predicted
    earlier without ``--qc`` has no score and is marked ``review = unknown``.
    """
    score_name = calibration.qc_score or "dice_gap"
    threshold = float(calibration.qc_threshold)
    records: dict[str, dict] = {}
    path = output_dir / "predictions.json"
    if path.exists():
        records = {d["case_id"]: d for d in json.loads(path.read_text())}
    columns = ["case_id", "score", "review", "threshold", "score_name", *CASE_SCORE_COLUMNS]
    out = output_dir / QC_FILE
    tmp = out.with_name(f".tmp-{out.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for case_id in sorted(case_ids):
            quality = (records.get(case_id) or {}).get("quality") or {}
            score = quality.get(score_name)
            review = "unknown" if score is None else ("yes" if score >= threshold else "no")
            writer.writerow(
                [case_id, "" if score is None else f"{score:.6g}", review, f"{threshold:.6g}"]
                + [score_name]
                + [
                    "" if quality.get(c) is None else f"{quality[c]:.6g}"
                    for c in CASE_SCORE_COLUMNS
                ]
            )
    os.replace(tmp, out)
    return out


CASE_SCORE_COLUMNS = ("dice_gap", "entropy_ratio", "mi_ratio", "foreground_voxels")
