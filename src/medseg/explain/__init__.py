"""Attribution maps that explain a segmentation (issue 20).

:func:`explain_files` is what ``medseg explain MODEL IMAGE`` runs: it reads the image (and a
region mask), computes the attribution of one class with :func:`explain_case` (occlusion,
Grad-CAM or integrated gradients, via captum) and writes the NIfTI map, a PNG overlay, a
JSON record and ``report.html`` into the output folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.explain.attribution import (
    METHODS,
    Explanation,
    RegionTarget,
    attribute,
    check_region_geometry,
    default_occlusion_window,
    explain_case,
    positive_mass_share,
    resolve_class,
)
from medseg.explain.report import overlay_png, write_explanation, write_report
from medseg.inference.predictor import Predictor
from medseg.io.files import read_image, read_image_channels, strip_suffix

__all__ = [
    "METHODS",
    "Explanation",
    "RegionTarget",
    "attribute",
    "check_region_geometry",
    "default_occlusion_window",
    "explain_case",
    "explain_files",
    "overlay_png",
    "positive_mass_share",
    "resolve_class",
    "write_explanation",
    "write_report",
]


def explain_files(
    model_dir: str | os.PathLike,
    image: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    method: str,
    class_value: str | int,
    region: str | os.PathLike | None = None,
    fold: int | None = None,
    window: tuple[int, ...] | None = None,
    stride: tuple[int, ...] | None = None,
    steps: int = 32,
    device: str = "auto",
    predictor: Predictor | None = None,
) -> dict:
    """Explain one class of one image file; write map, overlay, record and report.

    Parameters
    ----------
    model_dir
        A trained model folder.
    image
        The image file, or its channel files in the plan's order.
    output_dir
        Receives ``<case>_<method>_<class>.nii.gz`` / ``.png`` / ``.json`` and ``report.html``.
    method, class_value, region, window, stride, steps
        As :func:`medseg.explain.attribution.explain_case` (``region``: a mask file).
    fold
        The fold whose network is explained (default: the first trained).
    device
        Where the network runs.
    predictor
        An already loaded predictor (then ``model_dir``, ``fold`` and ``device`` are unused).

    Returns
    -------
    dict
        The JSON record written (files, masses, seconds).
    """
    files = [image] if isinstance(image, (str, os.PathLike)) else list(image)
    channels = []
    for f in files:
        channels.extend(read_image_channels(f))
    if predictor is None:
        predictor = Predictor(
            model_dir, folds=None if fold is None else [fold], device=device, calibrated=False
        )
    mask = read_image(region) if region is not None else None
    explanation = explain_case(
        predictor,
        channels,
        method=method,
        class_value=class_value,
        region=mask,
        region_source=str(region) if region is not None else "region mask",
        window=window,
        stride=stride,
        steps=steps,
    )
    case_id = strip_suffix(Path(files[0]))
    if len(case_id) > 5 and case_id[-5] == "_" and case_id[-4:].isdigit():
        case_id = case_id[:-5]
    data = write_explanation(explanation, output_dir, case_id=case_id)
    write_report([data], output_dir)
    return data
