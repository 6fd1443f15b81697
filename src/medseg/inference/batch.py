"""Batch prediction of a folder: reading, preprocessing, the network and writing overlap.

A pool of reader threads loads and preprocesses the next cases while the network
runs (PyTorch and onnxruntime release the GIL), and a writer thread compresses and
writes finished cases. Every output is written to a temporary file and renamed, so
a killed run leaves only finished files (plus hidden ``.tmp-*`` files, removed when
the next run into the same folder starts) and resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.predictor import Prediction, Predictor
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

    Returns
    -------
    list of Prediction
        One record per case predicted in this run (also merged into ``predictions.json``).
    """
    output_dir = Path(output_dir)
    # inputs first, so that a wrong input path leaves no empty output folder behind
    groups = group_inputs(collect_inputs(input_path), predictor.plan.num_channels)
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
        channels = read_case(files)
        data, geometry = predictor.prepare(channels)
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
                )
            )
        while writes:
            writes.popleft().result()
    if results:
        _merge_predictions(output_dir / "predictions.json", results)
    return results


def group_inputs(paths: list[Path], num_channels: int) -> dict[str, list[Path]]:
    """Group input files into cases: ``case_0000.nii.gz``, ``case_0001.nii.gz`` ... or one file per case."""
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
) -> list[Prediction]:
    """Predict every case under ``input_path`` into ``output_dir`` (same geometry as the input).

    Cases whose output exists are skipped unless ``overwrite`` (so an interrupted run
    resumes). Reading and writing overlap with the network (see
    :func:`medseg.inference.batch.predict_batch`).
    """
    predictor = Predictor(
        model_dir, folds=folds, device=device, backend=backend, precision=precision
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
    )


def label_volumes(label: Image, plan) -> dict[str, float]:
    voxel = float(np.prod(label.spacing))
    counts = np.bincount(label.array.ravel().astype(np.int64), minlength=plan.num_classes)
    names = dict(plan.labels)
    return {names.get(v, str(v)): float(counts[v] * voxel) for v in range(1, len(counts))}


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
