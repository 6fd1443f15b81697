"""Dataset fingerprint: what the planner needs to know about a dataset."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from medseg.io.dataset import DatasetSpec, read_case_image, read_case_label
from medseg.progress import progress
from medseg.transforms.cropping import crop, nonzero_bbox

SAMPLES_PER_CASE = 10_000


@dataclass(frozen=True)
class ChannelStats:
    """Intensity statistics of one channel over foreground (labelled) voxels."""

    mean: float
    std: float
    median: float
    p00_5: float
    p99_5: float
    minimum: float
    maximum: float


@dataclass(frozen=True)
class Fingerprint:
    dataset_name: str
    ndim: int
    channel_names: tuple[str, ...]
    is_ct: tuple[bool, ...]
    labels: tuple[tuple[int, str], ...]
    num_cases: int
    spacings: tuple[tuple[float, ...], ...]
    shapes: tuple[tuple[int, ...], ...]  # original
    cropped_shapes: tuple[tuple[int, ...], ...]  # after cropping to nonzero
    crop_volume_ratio: float  # median cropped / original voxel count
    foreground_intensities: tuple[ChannelStats, ...]
    class_voxel_fraction: tuple[float, ...]  # per class value 0..num_classes-1, over all voxels
    class_case_fraction: tuple[float, ...]  # fraction of cases where the class is present

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(np.array(self.spacings), axis=0))

    @property
    def median_cropped_shape(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.median(np.array(self.cropped_shapes), axis=0))


def _case_summary(spec: DatasetSpec, index: int, seed: int) -> dict:
    case = spec.cases[index]
    channels = read_case_image(spec, case)
    label = read_case_label(spec, case)
    data = np.stack([c.array for c in channels]).astype(np.float32, copy=False)
    bbox = nonzero_bbox(data)
    label_cropped = crop(label.array, bbox)
    data_cropped = crop(data, bbox)
    counts = np.bincount(label_cropped.ravel().astype(np.int64), minlength=spec.num_classes)[
        : spec.num_classes
    ]
    foreground = label_cropped > 0
    rng = np.random.default_rng(seed + index)
    samples = []
    for c in range(data.shape[0]):
        values = data_cropped[c][foreground] if foreground.any() else data_cropped[c].ravel()
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values)
    return {
        "spacing": channels[0].spacing,
        "shape": channels[0].shape,
        "cropped_shape": tuple(b - a for a, b in bbox),
        "counts": counts,
        "samples": samples,
    }


def channel_stats(values: np.ndarray) -> ChannelStats:
    """Mean, spread, percentiles and range of one channel's sampled intensities."""
    if values.size == 0:
        return ChannelStats(0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    p = np.percentile(values, [0.5, 50, 99.5])
    return ChannelStats(
        mean=float(values.mean()),
        std=float(values.std()),
        median=float(p[1]),
        p00_5=float(p[0]),
        p99_5=float(p[2]),
        minimum=float(values.min()),
        maximum=float(values.max()),
    )


def compute_fingerprint(
    spec: DatasetSpec, *, num_workers: int = 2, seed: int = 0, show_progress: bool = True
) -> Fingerprint:
    """Read every labelled case once and summarise spacing, shape, intensities and classes."""
    cases = [i for i, c in enumerate(spec.cases) if c.label is not None]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        summaries = list(
            progress(
                pool.map(lambda i: _case_summary(spec, i, seed), cases),
                total=len(cases),
                desc="fingerprint",
                enabled=show_progress,
            )
        )
    counts = np.sum([s["counts"] for s in summaries], axis=0).astype(float)
    presence = np.mean([s["counts"] > 0 for s in summaries], axis=0)
    n_channels = spec.num_channels
    stats = tuple(
        channel_stats(np.concatenate([s["samples"][c] for s in summaries]))
        for c in range(n_channels)
    )
    original = np.array([np.prod(s["shape"]) for s in summaries], dtype=float)
    cropped = np.array([np.prod(s["cropped_shape"]) for s in summaries], dtype=float)
    return Fingerprint(
        dataset_name=spec.name,
        ndim=len(summaries[0]["shape"]),
        channel_names=spec.channel_names,
        is_ct=spec.is_ct,
        labels=spec.labels,
        num_cases=len(summaries),
        spacings=tuple(tuple(float(v) for v in s["spacing"]) for s in summaries),
        shapes=tuple(tuple(int(v) for v in s["shape"]) for s in summaries),
        cropped_shapes=tuple(tuple(int(v) for v in s["cropped_shape"]) for s in summaries),
        crop_volume_ratio=float(np.median(cropped / original)),
        foreground_intensities=stats,
        class_voxel_fraction=tuple(float(v) for v in counts / max(counts.sum(), 1.0)),
        class_case_fraction=tuple(float(v) for v in presence),
    )
