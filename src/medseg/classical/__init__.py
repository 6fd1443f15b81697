"""Classical segmentation methods on :class:`~medseg.io.Image` (2D or 3D, with spacing).

Thresholds (global, Otsu, multi-Otsu, Kittler-Illingworth, Li, triangle, local
mean/Gaussian, Sauvola, Niblack), region growing (range, confidence, gradient;
seeds in voxels or mm, or automatic; split/merge), fuzzy C-means with a spatial
term, marker watershed, Chan-Vese and geodesic active contours, and connected
component filtering. Results are images with the input geometry, so they are
written and scored like a model's predictions.

:data:`METHODS` maps the names used by ``medseg classical METHOD`` to functions
``f(image, **options) -> Image``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medseg.classical.components import connected_components, filter_components, morphology
from medseg.classical.fcm import FCMResult, fuzzy_c_means
from medseg.classical.region_growing import auto_seeds, region_grow, seeds_to_index, split_merge
from medseg.classical.thresholds import (
    kittler_illingworth_value,
    local_threshold_map,
    multi_otsu,
    threshold,
    threshold_value,
)
from medseg.classical.watershed import (
    auto_markers,
    chan_vese,
    geodesic_active_contour,
    watershed,
)
from medseg.errors import MedsegError
from medseg.io.image import Image


def _fcm_labels(image: Image, **options: Any) -> Image:
    return fuzzy_c_means(image, **options).labels


def _method(name: str) -> Callable[..., Image]:
    def run(image: Image, **options: Any) -> Image:
        return threshold(image, method=name, **options)

    run.__doc__ = f"``threshold(image, method={name!r}, ...)``"
    return run


METHODS: dict[str, Callable[..., Image]] = {
    "threshold": threshold,
    **{
        name: _method(name)
        for name in (
            "otsu",
            "multiotsu",
            "kittler",
            "li",
            "triangle",
            "percentile",
            "mean",
            "gaussian",
            "sauvola",
            "niblack",
        )
    },
    "region_growing": region_grow,
    "fcm": _fcm_labels,
    "watershed": watershed,
    "chan_vese": chan_vese,
    "geodesic_active_contour": geodesic_active_contour,
    "components": connected_components,
}


def run_method(image: Image, name: str, **options: Any) -> Image:
    """Run the method called ``name`` (see :data:`METHODS`); a bad option raises MedsegError."""
    if name not in METHODS:
        raise MedsegError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    try:
        return METHODS[name](image, **options)
    except TypeError as exc:  # an option the method does not take
        raise MedsegError(f"method {name!r}: {exc}") from None


__all__ = [
    "METHODS",
    "FCMResult",
    "auto_markers",
    "auto_seeds",
    "chan_vese",
    "connected_components",
    "filter_components",
    "fuzzy_c_means",
    "geodesic_active_contour",
    "kittler_illingworth_value",
    "local_threshold_map",
    "morphology",
    "multi_otsu",
    "region_grow",
    "run_method",
    "seeds_to_index",
    "split_merge",
    "threshold",
    "threshold_value",
    "watershed",
]
