"""Patch sampling with foreground oversampling, from cases held in memory."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.preprocessing.preprocess import LoadedCase


def region_size(patch_size: Sequence[int], spatial_augmentation: bool) -> tuple[int, ...]:
    """Region to cut before augmentation: a margin keeps rotated corners filled with data."""
    if not spatial_augmentation:
        return tuple(int(p) for p in patch_size)
    return tuple(int(p + 2 * int(np.ceil(0.15 * p))) for p in patch_size)


def cut_region(array: np.ndarray, center: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Cut ``size`` around ``center`` from the trailing axes of ``array``, zero-padding outside."""
    spatial = array.shape[array.ndim - len(size) :]
    lead = array.shape[: array.ndim - len(size)]
    out = np.zeros((*lead, *size), dtype=array.dtype)
    src, dst = [], []
    for c, s, n in zip(center, size, spatial):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    keep = (slice(None),) * len(lead)
    out[keep + tuple(dst)] = array[keep + tuple(src)]
    return out


CLASS_SAMPLING = ("rarest_half", "uniform", "inverse_frequency")


class PatchSampler:
    """Draws training batches: a share of patches is centred on a foreground voxel.

    Half of the foreground draws pick the rarest class present in the case, which
    helps small structures (class-balanced oversampling).
    """

    def __init__(
        self,
        cases: list[LoadedCase],
        *,
        patch_size: Sequence[int],
        region: Sequence[int],
        batch_size: int,
        foreground_fraction: float = 0.33,
        seed: int = 0,
        class_sampling: str = "rarest_half",
        class_frequencies: Sequence[float] | None = None,
    ) -> None:
        if not cases:
            raise ValueError("no training cases")
        if class_sampling not in CLASS_SAMPLING:
            raise ValueError(
                f"unknown class sampling {class_sampling!r} (use {', '.join(CLASS_SAMPLING)})"
            )
        if class_sampling == "inverse_frequency" and class_frequencies is None:
            raise ValueError("class_sampling='inverse_frequency' needs class_frequencies")
        self.cases, self.patch, self.region = cases, tuple(patch_size), tuple(region)
        self.batch_size, self.foreground_fraction = batch_size, foreground_fraction
        self.class_sampling = class_sampling
        self.class_frequencies = (
            np.asarray(class_frequencies, dtype=float) if class_frequencies is not None else None
        )
        self.rng = np.random.default_rng(seed)

    def _pick_class(self, classes: list[int], locations: dict) -> int:
        if self.class_sampling == "uniform" or len(classes) == 1:
            return classes[self.rng.integers(len(classes))]
        if self.class_sampling == "inverse_frequency":
            f = np.array([self.class_frequencies[c] for c in classes])
            w = 1.0 / np.maximum(f, 1e-12)
            return classes[self.rng.choice(len(classes), p=w / w.sum())]
        if self.rng.random() < 0.5:
            return min(classes, key=lambda c: len(locations[c]))
        return classes[self.rng.integers(len(classes))]

    def _center(self, case: LoadedCase, force_foreground: bool) -> list[int]:
        shape = case.label.shape
        if force_foreground and case.locations:
            value = self._pick_class(sorted(case.locations), case.locations)
            coords = case.locations[value]
            point = coords[self.rng.integers(len(coords))]
            # Jitter so the structure is not always in the patch centre.
            return [
                int(p + self.rng.integers(-(s // 4), s // 4 + 1)) for p, s in zip(point, self.patch)
            ]
        center = []
        for n, p in zip(shape, self.patch):
            lo, hi = p // 2, n - (p - p // 2)
            center.append(
                int(self.rng.integers(lo, hi + 1))
                if hi >= lo
                else n // 2 + int(self.rng.integers(-(p - n) // 2, (p - n) // 2 + 1))
            )
        return center

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch: image ``(B, C, *region)`` float32 and label ``(B, 1, *region)`` int16."""
        n_channels = self.cases[0].data.shape[0]
        images = np.empty((self.batch_size, n_channels, *self.region), dtype=np.float32)
        labels = np.empty((self.batch_size, 1, *self.region), dtype=np.int16)
        n_fg = int(round(self.foreground_fraction * self.batch_size))
        for b in range(self.batch_size):
            case = self.cases[self.rng.integers(len(self.cases))]
            # nnU-Net's rule: the last third of every batch is foreground-centred.
            center = self._center(case, force_foreground=b >= self.batch_size - n_fg)
            images[b] = cut_region(case.data, center, self.region)
            labels[b, 0] = cut_region(case.label, center, self.region)
        return images, labels
