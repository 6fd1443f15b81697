"""Crop to nonzero, normalize and resample cases as the plan says; cache the results on disk."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.filters import apply_filters
from medseg.imaging.atomic import atomic_path
from medseg.io.dataset import CaseSpec, DatasetSpec, read_case_image, read_case_label
from medseg.io.image import Image
from medseg.planning.plan import Plan
from medseg.progress import progress
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.transforms.cropping import BBox, crop, nonzero_bbox

LOCATIONS_PER_CLASS = 2000
CACHE_VERSION = 1


@dataclass(frozen=True)
class CaseGeometry:
    """Where a preprocessed array came from, so predictions can be put back exactly."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    bbox: tuple[tuple[int, int], ...]
    resampled_shape: tuple[int, ...]

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.bbox)


def normalize(data: np.ndarray, plan: Plan) -> np.ndarray:
    """Normalize each channel of ``(C, *S)`` in place as the plan says (float32)."""
    data = data.astype(np.float32, copy=False)
    for c, norm in enumerate(plan.normalization):
        channel = data[c]
        if norm.scheme == "ct":
            np.clip(channel, norm.clip_low, norm.clip_high, out=channel)
            channel -= norm.mean
            channel /= max(norm.std, 1e-8)
        elif norm.scheme == "zscore":
            mean, std = float(channel.mean()), float(channel.std())
            channel -= mean
            channel /= max(std, 1e-8)
        elif norm.scheme != "none":
            raise ValueError(f"unknown normalization scheme {norm.scheme!r}")
    return data


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_channels(data: np.ndarray, shape: tuple[int, ...], *, order: int = 3) -> np.ndarray:
    """Resample ``(C, *S)`` to ``(C, *shape)`` with a spline of ``order`` (pixel areas aligned)."""
    if tuple(data.shape[1:]) == tuple(shape):
        return data
    zoom = [n / o for n, o in zip(shape, data.shape[1:])]
    out = np.empty((data.shape[0], *shape), dtype=np.float32)
    for c in range(data.shape[0]):
        out[c] = ndimage.zoom(
            data[c], zoom, order=order, mode="nearest", grid_mode=True, output=np.float32
        )
    return out


def resample_labels(
    label: np.ndarray, shape: tuple[int, ...], *, method: str = "nearest", num_classes: int = 0
) -> np.ndarray:
    """Resample a label map: nearest neighbour, or linear on one-hot channels then argmax."""
    if tuple(label.shape) == tuple(shape):
        return label
    zoom = [n / o for n, o in zip(shape, label.shape)]
    if method == "nearest":
        return ndimage.zoom(label, zoom, order=0, mode="nearest", grid_mode=True)
    if method != "onehot_linear":
        raise ValueError(f"unknown label resampling {method!r}")
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=label.dtype)
    for value in np.unique(label):
        prob = ndimage.zoom(
            (label == value).astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True
        )
        better = prob > best
        out[better], best[better] = value, prob[better]
    return out


def preprocess_image(channels: list[Image], plan: Plan) -> tuple[np.ndarray, CaseGeometry]:
    """Crop, normalize and resample one case's channels; return ``(C, *S)`` and its geometry."""
    if plan.filters:
        channels = [apply_filters(c, plan.filters) for c in channels]
    first = channels[0]
    data = np.stack([c.array for c in channels]).astype(np.float32)
    bbox: BBox = nonzero_bbox(data) if plan.crop_to_nonzero else tuple((0, n) for n in first.shape)
    data = normalize(np.ascontiguousarray(crop(data, bbox)), plan)
    shape = resampled_shape(data.shape[1:], first.spacing, plan.target_spacing)
    data = resample_channels(data, shape, order=plan.image_resample_order)
    geometry = CaseGeometry(first.shape, first.spacing, first.origin, first.direction, bbox, shape)
    return data, geometry


def preprocess_case(
    spec: DatasetSpec, case: CaseSpec, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, CaseGeometry]:
    channels = read_case_image(spec, case)
    data, geometry = preprocess_image(channels, plan)
    label = None
    if case.label is not None:
        raw = read_case_label(spec, case).array
        label = resample_labels(
            crop(raw, geometry.bbox), geometry.resampled_shape, method=plan.label_resampling
        )
        label = label.astype(np.uint8 if plan.num_classes < 256 else np.int16)
    return data, label, geometry


def class_locations(label: np.ndarray, num_classes: int, seed: int) -> dict[str, list[list[int]]]:
    """Up to ``LOCATIONS_PER_CLASS`` voxel indices of each foreground class, for oversampling."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {}
    for value in range(1, num_classes):
        coords = np.argwhere(label == value)
        if len(coords) > LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_CLASS, replace=False)]
        if len(coords):
            out[str(value)] = coords.tolist()
    return out


def plan_fingerprint(plan: Plan) -> str:
    """Hash of the plan fields that change preprocessed data."""
    keys = (
        "target_spacing",
        "normalization",
        "crop_to_nonzero",
        "image_resample_order",
        "label_resampling",
        "channel_names",
        "labels",
    )
    if plan.filters:  # only then, so that plans without filters keep their cache
        keys = (*keys, "filters")
    payload = json.dumps(
        {"v": CACHE_VERSION, **{k: to_jsonable(getattr(plan, k)) for k in keys}}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _preprocess_to_disk(args: tuple[DatasetSpec, CaseSpec, Plan, str, int]) -> str:
    spec, case, plan, out_dir, seed = args
    out = Path(out_dir)
    data, label, geometry = preprocess_case(spec, case, plan)
    _save_npy(data, out / f"{case.case_id}_data.npy")
    props = {"case_id": case.case_id, "geometry": to_jsonable(geometry)}
    if label is not None:
        _save_npy(label, out / f"{case.case_id}_seg.npy")
        props["class_locations"] = class_locations(label, plan.num_classes, seed)
    write_json_atomic(
        props, out / f"{case.case_id}.json", indent=0
    )  # written last: marks the case done
    return case.case_id


def preprocessed_folder(work_dir: str | os.PathLike, plan: Plan) -> Path:
    return Path(work_dir) / "preprocessed" / plan_fingerprint(plan)


def preprocess_dataset(
    spec: DatasetSpec,
    plan: Plan,
    work_dir: str | os.PathLike,
    *,
    case_ids: list[str] | None = None,
    num_workers: int = 2,
    show_progress: bool = True,
) -> Path:
    """Preprocess labelled cases into ``work_dir/preprocessed/<plan hash>/``; cached cases are skipped."""
    out = preprocessed_folder(work_dir, plan)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(to_jsonable(plan), out / "plan.json")
    wanted = [
        c for c in spec.cases if c.label is not None and (case_ids is None or c.case_id in case_ids)
    ]
    todo = [c for c in wanted if not (out / f"{c.case_id}.json").exists()]
    if todo:
        jobs = [(spec, c, plan, str(out), i) for i, c in enumerate(todo)]
        if num_workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(num_workers, len(todo))) as pool:
                for _ in progress(
                    pool.map(_preprocess_to_disk, jobs, chunksize=4),
                    total=len(jobs),
                    desc="preprocess",
                    enabled=show_progress,
                ):
                    pass
        else:
            for job in progress(jobs, total=len(jobs), desc="preprocess", enabled=show_progress):
                _preprocess_to_disk(job)
    return out


@dataclass
class LoadedCase:
    case_id: str
    data: np.ndarray  # (C, *S) float32, maybe memory-mapped
    label: np.ndarray  # (*S) integer
    geometry: CaseGeometry
    locations: dict[int, np.ndarray]


def load_preprocessed(
    folder: str | os.PathLike, case_ids: list[str], *, mmap: bool = False
) -> list[LoadedCase]:
    """Load preprocessed cases (into RAM, or memory-mapped for large datasets)."""
    folder = Path(folder)
    cases = []
    for case_id in case_ids:
        props = json.loads((folder / f"{case_id}.json").read_text())
        g = props["geometry"]
        geometry = CaseGeometry(
            tuple(g["shape"]),
            tuple(g["spacing"]),
            tuple(g["origin"]),
            tuple(g["direction"]),
            tuple(tuple(b) for b in g["bbox"]),
            tuple(g["resampled_shape"]),
        )
        mode = "r" if mmap else None
        cases.append(
            LoadedCase(
                case_id,
                np.load(folder / f"{case_id}_data.npy", mmap_mode=mode),
                np.load(folder / f"{case_id}_seg.npy", mmap_mode=mode),
                geometry,
                {
                    int(k): np.asarray(v, dtype=np.int64)
                    for k, v in props.get("class_locations", {}).items()
                },
            )
        )
    return cases
