"""Unlabelled images for pretraining: find them, plan for them, preprocess them (cached).

The images are a dataset folder (its labels are ignored, its test images count too) or any
folder of image files medseg reads (NIfTI, NRRD, MHA, PNG, ...), 2D or 3D. They go through
the same planning rules (:func:`medseg.planning.plan.make_plan` on a label-free fingerprint)
and the same preprocessing (:func:`medseg.preprocessing.preprocess.preprocess_image`) as a
labelled dataset, or through the plan of a fine-tuning work folder given with ``plan``, so
the pretrained encoder sees its inputs as the fine-tuned network will.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.io.dataset import CaseSpec, DatasetSpec, load_dataset, read_case_image
from medseg.io.files import IMAGE_SUFFIXES, image_suffix, read_image_channels, strip_suffix
from medseg.io.image import Image
from medseg.planning.fingerprint import SAMPLES_PER_CASE, Fingerprint, channel_stats
from medseg.planning.plan import Plan, make_plan, read_plan
from medseg.preprocessing.preprocess import (
    CaseGeometry,
    LoadedCase,
    plan_fingerprint,
    preprocess_image,
)
from medseg.progress import progress
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training.splits import read_splits
from medseg.transforms.cropping import crop, nonzero_bbox

UNLABELLED = ((0, "background"), (1, "foreground"))  # the plan's labels when none are known


def find_images(source: str | os.PathLike) -> DatasetSpec:
    """The unlabelled cases of a dataset folder or of a folder of image files.

    Parameters
    ----------
    source
        A dataset folder (MSD, nnU-Net v2 or plain 2D; labels are ignored, test images
        are included) or a folder whose image files are one case each.

    Returns
    -------
    DatasetSpec
        Cases without labels (``layout`` is ``"unlabelled"`` for a plain folder).

    Raises
    ------
    MedsegError
        One line naming the folder when it is missing or holds no image.
    """
    root = Path(source)
    if not root.is_dir():
        raise MedsegError(f"{root}: image folder not found")
    is_dataset = (root / "dataset.json").is_file() or (
        (root / "images").is_dir() and any((root / n).is_dir() for n in ("masks", "labels"))
    )
    if is_dataset:
        spec = load_dataset(root)
        cases = tuple(
            CaseSpec(c.case_id, c.images, None)
            for c in spec.cases + spec.test_cases
            if all(Path(p).exists() for p in c.images)
        )
        if not cases:
            raise MedsegError(f"{root}: no images in the dataset folder")
        return replace(spec, cases=cases, test_cases=())
    files = sorted(
        f for f in root.iterdir() if f.is_file() and not f.name.startswith(".") and image_suffix(f)
    )
    if not files:
        raise MedsegError(
            f"{root}: no images (looked for {', '.join(IMAGE_SUFFIXES)} files, or a dataset folder)"
        )
    ids = [strip_suffix(f) for f in files]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise MedsegError(f"{root}: several files are named {twice[0]} (one case each, please)")
    n_channels = len(read_channels(files[0]))
    names = ("image",) if n_channels == 1 else tuple(f"channel_{i}" for i in range(n_channels))
    return DatasetSpec(
        root=str(root),
        name=root.name,
        layout="unlabelled",
        channel_names=names,
        labels=UNLABELLED,
        cases=tuple(CaseSpec(i, (str(f),), None) for i, f in zip(ids, files)),
        file_ending=image_suffix(files[0]),
    )


def read_channels(path: str | os.PathLike) -> list[Image]:
    """The channels of one image file; any failure is one line naming the file."""
    try:
        return read_image_channels(path)
    except MedsegError:
        raise
    except Exception as exc:  # a reader's own error type: still one line
        raise MedsegError(f"{path}: cannot read image ({str(exc).strip()[:200]})") from None


def select_cases(spec: DatasetSpec, split_file: str | os.PathLike, fold: int = 0) -> DatasetSpec:
    """Only the training cases of ``fold`` of a splits JSON (validation images stay unseen)."""
    folds = read_splits(split_file)
    if not 0 <= fold < len(folds):
        raise MedsegError(f"{split_file}: has no fold {fold}")
    wanted = set(folds[fold]["train"])
    cases = tuple(c for c in spec.cases if c.case_id in wanted)
    missing = sorted(wanted - {c.case_id for c in cases})
    if missing:
        raise MedsegError(f"{split_file}: case {missing[0]} is not among the images of {spec.root}")
    return replace(spec, cases=cases)


def read_case(spec: DatasetSpec, case: CaseSpec, ndim: int | None = None) -> list[Image]:
    """One case's channels, checked: readable, the declared channels, ``ndim`` dimensions."""
    try:
        channels = read_case_image(spec, case)
    except MedsegError:
        raise
    except Exception as exc:
        raise MedsegError(
            f"{case.images[0]}: cannot read image ({str(exc).strip()[:200]})"
        ) from None
    if ndim is not None and channels[0].array.ndim != ndim:
        raise MedsegError(
            f"{case.images[0]}: a {channels[0].array.ndim}D image, but the plan is {ndim}D"
        )
    return channels


def _summary(spec: DatasetSpec, index: int, seed: int) -> dict:
    channels = read_case(spec, spec.cases[index])
    data = np.stack([c.array for c in channels]).astype(np.float32, copy=False)
    bbox = nonzero_bbox(data)
    cropped = crop(data, bbox)
    rng = np.random.default_rng(seed + index)
    samples = []
    for c in range(data.shape[0]):
        values = cropped[c][cropped[c] != 0]  # no labels: the nonzero voxels stand in
        values = values if values.size else cropped[c].ravel()
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values)
    return {
        "ndim": data.ndim - 1,
        "spacing": channels[0].spacing,
        "shape": channels[0].shape,
        "cropped_shape": tuple(b - a for a, b in bbox),
        "samples": samples,
        "path": spec.cases[index].images[0],
    }


def unlabelled_fingerprint(
    spec: DatasetSpec, *, num_workers: int = 2, seed: int = 0, show_progress: bool = True
) -> Fingerprint:
    """The planner's fingerprint without labels: intensities over nonzero voxels.

    Raises
    ------
    MedsegError
        One line naming an unreadable image, or the first image whose dimensionality
        differs from the first one's.
    """
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        summaries = list(
            progress(
                pool.map(lambda i: _summary(spec, i, seed), range(len(spec.cases))),
                total=len(spec.cases),
                desc="fingerprint",
                enabled=show_progress,
            )
        )
    ndim = summaries[0]["ndim"]
    odd = next((s for s in summaries if s["ndim"] != ndim), None)
    if odd is not None:
        raise MedsegError(
            f"{odd['path']}: a {odd['ndim']}D image among {ndim}D ones ({summaries[0]['path']})"
        )
    n = len(spec.labels)
    return Fingerprint(
        dataset_name=spec.name,
        ndim=ndim,
        channel_names=spec.channel_names,
        is_ct=spec.is_ct,
        labels=spec.labels,
        num_cases=len(summaries),
        spacings=tuple(tuple(float(v) for v in s["spacing"]) for s in summaries),
        shapes=tuple(tuple(int(v) for v in s["shape"]) for s in summaries),
        cropped_shapes=tuple(tuple(int(v) for v in s["cropped_shape"]) for s in summaries),
        crop_volume_ratio=float(
            np.median([np.prod(s["cropped_shape"]) / np.prod(s["shape"]) for s in summaries])
        ),
        foreground_intensities=tuple(
            channel_stats(np.concatenate([s["samples"][c] for s in summaries]))
            for c in range(spec.num_channels)
        ),
        class_voxel_fraction=(1.0,) + (0.0,) * (n - 1),
        class_case_fraction=(1.0,) + (0.0,) * (n - 1),
    )


def plan_for_images(
    spec: DatasetSpec,
    work_dir: str | os.PathLike,
    *,
    plan: str | os.PathLike | None,
    num_workers: int,
    show_progress: bool,
) -> Plan:
    """The plan to pretrain with, written to ``work_dir/plan.json``.

    ``plan`` (a plan JSON, or a work or model folder holding one: the fine-tuning plan)
    wins; else the work folder's own plan; else a new plan from the images' fingerprint
    (``work_dir/fingerprint.json``), by the same rules as ``medseg plan``.
    """
    work = Path(work_dir)
    if plan is not None:
        source = Path(plan)
        if source.is_dir() and not (source / "plan.json").is_file():
            source = source / "model"
        the_plan = read_plan(source)
    elif (work / "plan.json").is_file():
        the_plan = read_plan(work / "plan.json")
    else:
        fp = unlabelled_fingerprint(spec, num_workers=num_workers, show_progress=show_progress)
        write_json_atomic(fp, work / "fingerprint.json")
        the_plan = make_plan(fp, gpu=torch.cuda.is_available())
    if the_plan.num_channels != spec.num_channels:
        raise MedsegError(
            f"{spec.root}: images have {spec.num_channels} channel(s), the plan "
            f"{plan or work / 'plan.json'} expects {the_plan.num_channels}"
        )
    write_json_atomic(the_plan, work / "plan.json")
    return the_plan


def preprocessed_images_folder(work_dir: str | os.PathLike, plan: Plan) -> Path:
    """Where the preprocessed unlabelled images of ``plan`` are cached."""
    return Path(work_dir) / "pretraining" / "preprocessed" / plan_fingerprint(plan)


def _preprocess_one(spec: DatasetSpec, case: CaseSpec, plan: Plan, out: Path) -> str:
    data, geometry = preprocess_image(read_case(spec, case, plan.ndim), plan)
    with atomic_path(out / f"{case.case_id}_data.npy") as tmp:
        np.save(tmp, data.astype(np.float32, copy=False))
    write_json_atomic(  # written last: marks the case done
        {"case_id": case.case_id, "geometry": to_jsonable(geometry)},
        out / f"{case.case_id}.json",
        indent=0,
    )
    return case.case_id


def preprocess_images(
    spec: DatasetSpec,
    plan: Plan,
    work_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Path:
    """Crop, normalize and resample every image as ``plan`` says; cached cases are skipped.

    Raises
    ------
    MedsegError
        One line naming the first unreadable image, or an image of another
        dimensionality than the plan's (a 2D folder for a 3D plan).
    """
    out = preprocessed_images_folder(work_dir, plan)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(to_jsonable(plan), out / "plan.json")
    todo = [c for c in spec.cases if not (out / f"{c.case_id}.json").exists()]
    if todo:
        # The first case alone: a wrong folder fails at once, before the pool starts.
        _preprocess_one(spec, todo[0], plan, out)
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            jobs = pool.map(lambda c: _preprocess_one(spec, c, plan, out), todo[1:])
            for _ in progress(jobs, total=len(todo) - 1, desc="preprocess", enabled=show_progress):
                pass
    return out


def load_images(folder: str | os.PathLike, case_ids: list[str]) -> list[LoadedCase]:
    """Preprocessed unlabelled cases, with an all-background label view (no memory)."""
    folder = Path(folder)
    cases = []
    for case_id in case_ids:
        props = json.loads((folder / f"{case_id}.json").read_text())
        g = props["geometry"]
        data = np.load(folder / f"{case_id}_data.npy")
        cases.append(
            LoadedCase(
                case_id,
                data,
                np.broadcast_to(np.zeros((), np.uint8), data.shape[1:]),
                CaseGeometry(
                    tuple(g["shape"]),
                    tuple(g["spacing"]),
                    tuple(g["origin"]),
                    tuple(g["direction"]),
                    tuple(tuple(b) for b in g["bbox"]),
                    tuple(g["resampled_shape"]),
                ),
                {},
            )
        )
    return cases
