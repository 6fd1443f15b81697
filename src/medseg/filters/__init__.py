"""Image filters for preprocessing: denoising, N4, CLAHE, histogram matching, CT windows.

Every filter takes an :class:`~medseg.io.Image` (2D or 3D, sizes in mm) and
keyword-only options, and returns a float32 image with the same geometry.
:data:`FILTERS` names them for the CLI and for plans; :func:`apply_filters`
runs a list of named steps, e.g. ``[{"name": "n4"}, {"name": "gaussian", "sigma_mm": 1}]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from medseg.errors import MedsegError
from medseg.filters.bias import n4_bias_correction
from medseg.filters.denoise import anisotropic_diffusion, bilateral, gaussian, median, nl_means
from medseg.filters.intensity import CT_WINDOWS, clahe, histogram_match, normalize, window
from medseg.io.files import read_image
from medseg.io.image import Image

FILTERS: dict[str, Callable[..., Image]] = {
    "gaussian": gaussian,
    "median": median,
    "bilateral": bilateral,
    "anisotropic_diffusion": anisotropic_diffusion,
    "nl_means": nl_means,
    "n4": n4_bias_correction,
    "clahe": clahe,
    "histogram_match": histogram_match,
    "window": window,
    "normalize": normalize,
}

__all__ = [
    "CT_WINDOWS",
    "FILTERS",
    "anisotropic_diffusion",
    "apply_filter",
    "apply_filters",
    "bilateral",
    "clahe",
    "gaussian",
    "histogram_match",
    "median",
    "n4_bias_correction",
    "nl_means",
    "normalize",
    "window",
]


def apply_filter(image: Image, name: str, **options: Any) -> Image:
    """Run the filter called ``name`` with ``options``; a bad name or option raises MedsegError.

    ``histogram_match`` takes ``reference`` as an Image or an image file path.
    """
    if name not in FILTERS:
        raise MedsegError(f"unknown filter {name!r} (choose from {', '.join(FILTERS)})")
    if name == "histogram_match":
        ref = options.pop("reference", None)
        if ref is None:
            raise MedsegError("histogram_match needs reference= (an image file)")
        if not isinstance(ref, Image):
            ref = read_image(ref)
        options["reference"] = ref
    try:
        return FILTERS[name](image, **options)
    except TypeError as exc:  # an option the filter does not have
        raise MedsegError(f"filter {name!r}: {exc}") from None


def apply_filters(image: Image, steps: Sequence[str | Mapping[str, Any]]) -> Image:
    """Run filter steps in order; each is a name or a mapping with ``name`` and its options."""
    for step in steps:
        if isinstance(step, str):
            step = {"name": step}
        options = dict(step)
        name = options.pop("name", None)
        if name is None:
            raise MedsegError(f"filter step {dict(step)} has no 'name'")
        image = apply_filter(image, name, **options)
    return image
