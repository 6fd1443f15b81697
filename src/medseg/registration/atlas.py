"""Atlas-based segmentation: register labelled atlases to a target and fuse their warped labels.

A segmentation method that needs no training (and a baseline for the deep models).
Fusion: ``majority`` (SimpleITK's label voting; ties go to the locally best-matching
atlas) or ``weighted`` (locally weighted voting: each atlas votes at each voxel with
weight ``1 / (local mean squared intensity difference + eps) ** power`` after
registration, Artaechevarria et al., IEEE TMI 2009).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.dataset import load_dataset, read_case_image, read_case_label
from medseg.io.files import to_sitk
from medseg.io.image import Image
from medseg.progress import progress
from medseg.registration.classical import register as classical_register
from medseg.registration.fields import warp_image, warp_labels

FUSIONS = ("majority", "weighted")


@dataclass(frozen=True)
class AtlasResult:
    """The fused label map on the target grid, each atlas's warped labels and image, timing."""

    labels: Image
    warped_labels: tuple[Image, ...]
    warped_images: tuple[Image, ...]
    seconds_per_atlas: tuple[float, ...]
    fusion: str


def _normalized(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    lo, hi = np.percentile(a, [1, 99])
    return (a - lo) / max(hi - lo, 1e-6)


def local_weights(
    target: Image, warped: Sequence[Image], *, sigma_mm: float = 2.0, power: float = 1.0
) -> np.ndarray:
    """Per-atlas, per-voxel weights ``(n_atlases, *shape)`` from Gaussian-smoothed squared differences."""
    t = _normalized(target.array)
    out = []
    for w in warped:
        diff = target.with_array((t - _normalized(w.array)) ** 2)
        local = sitk.SmoothingRecursiveGaussian(to_sitk(diff), sigma_mm)
        a = sitk.GetArrayFromImage(local).transpose(tuple(range(target.ndim))[::-1])
        out.append(1.0 / (np.clip(a, 0, None) + 1e-3) ** power)
    return np.stack(out)


def fuse_labels(
    labels: Sequence[Image],
    *,
    method: str = "majority",
    target: Image | None = None,
    warped_images: Sequence[Image] | None = None,
    sigma_mm: float = 2.0,
    power: float = 1.0,
) -> Image:
    """Fuse label maps that share the target grid by majority or locally weighted vote."""
    if method not in FUSIONS:
        raise MedsegError(f"unknown fusion {method!r} (use one of {', '.join(FUSIONS)})")
    if not labels:
        raise MedsegError("atlas fusion needs at least one warped label map")
    arrays = [np.asarray(lab.array).astype(np.int64) for lab in labels]
    values = np.unique(np.concatenate([np.unique(a) for a in arrays]))
    weights = None
    if target is not None and warped_images is not None:
        weights = local_weights(target, warped_images, sigma_mm=sigma_mm, power=power)
    if method == "weighted":
        if weights is None:
            raise MedsegError("weighted fusion needs the target and the warped atlas images")
        scores = np.stack([(weights * np.stack([a == v for a in arrays])).sum(0) for v in values])
        return labels[0].with_array(values[scores.argmax(0)].astype(labels[0].array.dtype))
    undecided = int(values.max()) + 1
    voted = sitk.LabelVoting(
        [sitk.Cast(to_sitk(lab.with_array(a)), sitk.sitkUInt16) for lab, a in zip(labels, arrays)],
        undecided,
    )
    fused = (
        sitk.GetArrayFromImage(voted).transpose(tuple(range(labels[0].ndim))[::-1]).astype(np.int64)
    )
    ties = fused == undecided
    if ties.any():
        # ties: the atlas that matches the target best there (or the first atlas without images)
        if weights is not None:
            best = np.take_along_axis(np.stack(arrays), weights.argmax(0)[None], 0)[0]
        else:
            best = arrays[0]
        fused[ties] = best[ties]
    return labels[0].with_array(fused.astype(labels[0].array.dtype))


def atlas_segment(
    target: Image,
    atlases: Sequence[tuple[Image, Image]],
    *,
    register: Callable[[Image, Image], sitk.Transform] | None = None,
    method: str = "demons",
    metric: str = "mattes",
    fusion: str = "majority",
    label_mode: str = "nearest",
    show_progress: bool = False,
) -> AtlasResult:
    """Register each ``(image, labels)`` atlas to ``target`` and fuse the warped labels.

    ``register(fixed, moving) -> transform`` overrides the classical ``method``
    (for instance a learned model: ``lambda f, m: register_learned(f, m, model)``).
    """
    if not atlases:
        raise MedsegError("atlas segmentation needs at least one atlas")
    warped_labels, warped_images, seconds = [], [], []
    for i, (image, labels) in enumerate(
        progress(atlases, total=len(atlases), desc="atlases", enabled=show_progress)
    ):
        if labels.shape != image.shape:
            raise MedsegError(
                f"atlas {i}: labels of shape {labels.shape} do not match the image {image.shape}"
            )
        t0 = time.perf_counter()
        if register is not None:
            transform = register(target, image)
        else:
            transform = classical_register(target, image, method=method, metric=metric).transform
        seconds.append(time.perf_counter() - t0)
        warped_labels.append(warp_labels(labels, target, transform, mode=label_mode))
        warped_images.append(warp_image(image, target, transform))
    fused = fuse_labels(warped_labels, method=fusion, target=target, warped_images=warped_images)
    return AtlasResult(fused, tuple(warped_labels), tuple(warped_images), tuple(seconds), fusion)


def load_atlases(
    folder: str | os.PathLike, *, max_atlases: int | None = None
) -> list[tuple[Image, Image]]:
    """Labelled cases of a dataset folder (MSD, nnU-Net v2 or plain 2D) as ``(image, labels)`` atlases."""
    spec = load_dataset(folder)
    cases = [c for c in spec.cases if c.label]
    if not cases:
        raise MedsegError(f"{folder}: no labelled case to use as an atlas")
    if max_atlases is not None:
        cases = cases[:max_atlases]
    return [(read_case_image(spec, c)[0], read_case_label(spec, c)) for c in cases]
