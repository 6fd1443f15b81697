"""From a fingerprint to a plain, editable JSON plan (nnU-Net style rules, CPU-aware budget)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.filters import FILTERS
from medseg.planning.fingerprint import Fingerprint
from medseg.serialization import from_jsonable

ANISOTROPY_RATIO = 3.0
# Voxels of one resampled image the planner aims for: on a CPU a coarser grid keeps
# training inside minutes; a GPU affords the native resolution.
CPU_VOXEL_BUDGET = {2: 300 * 220, 3: 96 * 96 * 96}
GPU_VOXEL_BUDGET = {2: 1024 * 1024, 3: 256 * 256 * 256}
CPU_PATCH_BUDGET = {2: 320 * 240, 3: 64 * 64 * 64}
GPU_PATCH_BUDGET = {2: 512 * 512, 3: 128 * 128 * 128}
CPU_STEP_VOXELS = {2: 320 * 240 * 4, 3: 96 * 96 * 48}
GPU_STEP_VOXELS = {2: 512 * 512 * 12, 3: 128 * 128 * 128 * 2}
MIN_FEATURE_SIZE = 4  # no stage goes below 4 voxels along an axis


@dataclass(frozen=True)
class ChannelNormalization:
    """``scheme`` is "ct" (clip to foreground percentiles, then dataset z-score) or "zscore" (per image)."""

    scheme: str
    clip_low: float = 0.0
    clip_high: float = 0.0
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class NetworkPlan:
    name: str = "unet"
    features: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[tuple[int, ...], ...] = ()  # per stage; the first is all ones
    kernel_sizes: tuple[tuple[int, ...], ...] = ()
    residual: bool = False
    deep_supervision: bool = True


@dataclass(frozen=True)
class Plan:
    """Everything preprocessing, training and inference need to agree on. Edit freely."""

    dataset_name: str
    ndim: int
    configuration: str  # "2d" | "3d"
    channel_names: tuple[str, ...]
    labels: tuple[tuple[int, str], ...]
    target_spacing: tuple[float, ...]  # in image axis order (x, y[, z])
    normalization: tuple[ChannelNormalization, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    network: NetworkPlan
    median_shape: tuple[int, ...]  # after cropping and resampling
    crop_to_nonzero: bool = True
    image_resample_order: int = 3
    label_resampling: str = "nearest"  # or "onehot_linear"
    foreground_oversampling: float = 0.33
    compute_target: str = "cpu"
    notes: tuple[str, ...] = field(default=())
    # Image filters run on every channel before cropping, e.g. [{"name": "n4"}]
    # (names from medseg.filters.FILTERS); empty by default, added by editing the plan.
    filters: tuple[dict[str, Any], ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return max(v for v, _ in self.labels) + 1

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)


def choose_target_spacing(fp: Fingerprint) -> tuple[float, ...]:
    """Median spacing; along a strongly anisotropic axis the 10th percentile (nnU-Net's rule)."""
    spacings = np.array(fp.spacings)
    target = np.median(spacings, axis=0)
    shapes = np.median(np.array(fp.cropped_shapes), axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if others and target[worst] > ANISOTROPY_RATIO * max(target[others]):
        low_res_shape = shapes[worst]
        if low_res_shape * ANISOTROPY_RATIO < min(shapes[others]):
            target[worst] = max(np.percentile(spacings[:, worst], 10), max(target[others]) * 1.0001)
    return tuple(float(v) for v in target)


def _fit_budget(
    spacing: np.ndarray, shape: np.ndarray, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coarsen the finest axes until the resampled shape fits ``budget`` voxels."""
    spacing, shape = spacing.astype(float).copy(), shape.astype(float).copy()
    while np.prod(shape) > budget:
        finest = spacing <= spacing.min() * 1.001
        factor = min(1.25, (np.prod(shape) / budget) ** (1 / max(1, finest.sum())) * 1.0001)
        spacing[finest] *= factor
        shape[finest] /= factor
    return spacing, shape


def _network_topology(
    patch: list[int], spacing: np.ndarray, max_stages: int
) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Strides and kernel sizes per stage; anisotropic axes are pooled later (nnU-Net's rule)."""
    ndim = len(patch)
    size = np.array(patch, dtype=float)
    current_spacing = spacing.astype(float).copy()
    strides: list[tuple[int, ...]] = [(1,) * ndim]
    kernels: list[tuple[int, ...]] = []
    kernel = tuple(3 if current_spacing[i] <= 2 * current_spacing.min() else 1 for i in range(ndim))
    kernels.append(kernel)
    for _ in range(max_stages - 1):
        pool = []
        for i in range(ndim):
            can = (
                size[i] / 2 >= MIN_FEATURE_SIZE and current_spacing[i] <= 2 * current_spacing.min()
            )
            pool.append(2 if can else 1)
        if all(p == 1 for p in pool):
            break
        size = size / np.array(pool)
        current_spacing = current_spacing * np.array(pool)
        strides.append(tuple(pool))
        kernels.append(
            tuple(3 if current_spacing[i] <= 2 * current_spacing.min() else 1 for i in range(ndim))
        )
    divisors = np.prod(np.array(strides), axis=0)
    patch_fixed = [int(math.ceil(p / d) * d) for p, d in zip(patch, divisors)]
    return patch_fixed, strides, kernels


def make_plan(fp: Fingerprint, *, gpu: bool = False) -> Plan:
    """Choose spacing, normalization, patch, network and batch size from a fingerprint.

    On a CPU (``gpu=False``) the image grid and patch are bounded so that a model
    trains within minutes; the plan records the choice in ``notes``.
    """
    notes: list[str] = []
    ndim = fp.ndim
    configuration = "2d" if ndim == 2 else "3d"
    spacing = np.array(choose_target_spacing(fp))
    native = spacing.copy()
    shapes = np.array(fp.cropped_shapes, dtype=float) * np.array(fp.spacings) / spacing
    median_shape = np.median(shapes, axis=0)
    work_spacing, work_shape = spacing, median_shape
    eff_dim = len(work_shape)
    voxel_budget = (GPU_VOXEL_BUDGET if gpu else CPU_VOXEL_BUDGET)[eff_dim]
    new_spacing, new_shape = _fit_budget(work_spacing, work_shape, voxel_budget)
    if not np.allclose(new_spacing, work_spacing):
        notes.append(
            f"{'GPU' if gpu else 'CPU'} budget: spacing coarsened from {np.round(work_spacing, 4).tolist()} "
            f"to {np.round(new_spacing, 4).tolist()} (median image {np.round(work_shape).tolist()} -> {np.round(new_shape).tolist()})"
        )
    spacing, median_shape = new_spacing, new_shape

    # Patch: the median image, capped by the patch budget (shrink the longest axis first).
    patch_budget = (GPU_PATCH_BUDGET if gpu else CPU_PATCH_BUDGET)[eff_dim]
    patch = np.maximum(np.round(new_shape), 8.0)
    while np.prod(patch) > patch_budget:
        axis = int(np.argmax(patch / new_spacing.min() * new_spacing))
        patch[axis] = max(8.0, math.floor(patch[axis] * 0.9))
    max_stages = 6 if eff_dim == 2 else 5
    patch_list, strides, kernels = _network_topology(
        [int(p) for p in patch], new_spacing, max_stages
    )
    base = 32 if gpu else (24 if eff_dim == 2 else 16)
    cap = 512 if eff_dim == 2 else 320
    features = tuple(min(cap, base * 2**i) for i in range(len(strides)))
    # Batch: fill a fixed voxel count per step (nnU-Net uses about 5% of the dataset).
    step_voxels = (GPU_STEP_VOXELS if gpu else CPU_STEP_VOXELS)[eff_dim]
    batch = int(np.clip(step_voxels // int(np.prod(patch_list)), 2, 64 if eff_dim == 2 else 16))
    batch = int(
        min(batch, max(2, round(0.05 * fp.num_cases * np.prod(median_shape) / np.prod(patch_list))))
    )
    batch = max(batch, 2)
    normalization = []
    for is_ct, stats in zip(fp.is_ct, fp.foreground_intensities):
        if is_ct:
            normalization.append(
                ChannelNormalization(
                    "ct", stats.p00_5, stats.p99_5, stats.mean, max(stats.std, 1e-8)
                )
            )
        else:
            normalization.append(ChannelNormalization("zscore"))
    return Plan(
        dataset_name=fp.dataset_name,
        ndim=ndim,
        configuration=configuration,
        channel_names=fp.channel_names,
        labels=fp.labels,
        target_spacing=tuple(float(round(s, 6)) for s in spacing),
        normalization=tuple(normalization),
        patch_size=tuple(patch_list),
        batch_size=batch,
        network=NetworkPlan(
            name="unet",
            features=features,
            strides=tuple(strides),
            kernel_sizes=tuple(kernels),
        ),
        median_shape=tuple(int(round(s)) for s in median_shape),
        compute_target="gpu" if gpu else "cpu",
        notes=tuple(notes)
        + ((f"native target spacing {np.round(native, 4).tolist()}",) if notes else ()),
    )


def read_plan(path: str | os.PathLike) -> Plan:
    """Read a (possibly hand-edited) plan: a ``plan.json`` file or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    try:
        plan = from_jsonable(Plan, json.loads(path.read_text()))
    except FileNotFoundError:
        raise MedsegError(
            f"{path}: no plan.json (run `medseg plan`, or give a model folder)"
        ) from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise MedsegError(f"{path}: invalid plan ({exc})") from None
    _check_filters(plan, path)
    return plan


def _check_filters(plan: Plan, path: Path) -> None:
    for step in plan.filters:
        name = step.get("name") if isinstance(step, dict) else None
        if name not in FILTERS:
            raise MedsegError(f"{path}: plan filter {step!r} is not one of {', '.join(FILTERS)}")
