"""File-level registration steps behind ``medseg register`` and ``medseg atlas-segment``.

``register_files`` writes into one output folder::

    transform.tfm | transform.h5   fixed -> moving ITK transform (.h5 when it holds a field)
    warped<ext>                    moving image on the fixed grid (fixed's format)
    warped_labels<ext>             moving labels on the fixed grid (with --labels)
    jacobian.nii.gz                Jacobian determinant map (deformable methods)
    quality.json                   method, timing, Jacobian/folding, inverse consistency, Dice
    checkerboard.png, overlay.png, jacobian.png, report.html
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.imaging.overlap import dice
from medseg.io.dataset import load_dataset
from medseg.io.files import WRITE_SUFFIXES, image_suffix, read_image, write_image
from medseg.io.image import Image
from medseg.registration.atlas import atlas_segment, load_atlases
from medseg.registration.classical import METHODS, linear_parameters, register, write_transform
from medseg.registration.fields import centring_transform, check_pair, warp_image, warp_labels
from medseg.registration.learned import (
    load_registration_model,
    register_learned,
    train_registration,
)
from medseg.registration.quality import deformation_quality
from medseg.registration.report import save_views, write_report
from medseg.serialization import write_json_atomic

ALL_METHODS = ("translation", "rigid", "similarity", "affine", "bspline", "demons", "learned")


def _output_suffix(path: str | os.PathLike) -> str:
    suffix = image_suffix(path)
    return suffix if suffix in WRITE_SUFFIXES else ".nii.gz"


def _for_format(image: Image, like: Image, suffix: str) -> Image:
    """PNG keeps integers only: round and clip to the moving image's type there."""
    if suffix != ".png":
        return image
    info = np.iinfo(like.array.dtype) if like.array.dtype.kind in "iu" else np.iinfo(np.uint8)
    return image.with_array(
        np.clip(np.round(image.array), max(info.min, 0), min(info.max, 65535)).astype(
            like.array.dtype if like.array.dtype.kind in "iu" else np.uint8
        )
    )


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Dice of each nonzero label present in either map."""
    return {
        str(int(v)): float(dice(a == v, b == v))
        for v in np.union1d(np.unique(a), np.unique(b))
        if v != 0
    }


def register_files(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    method: str = "affine",
    metric: str = "mattes",
    init: str = "geometry",
    labels: str | os.PathLike | None = None,
    fixed_labels: str | os.PathLike | None = None,
    fixed_mask: str | os.PathLike | None = None,
    moving_mask: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    precision: str = "fp32",
    label_mode: str = "nearest",
    report: bool = True,
    overwrite: bool = False,
) -> dict:
    """Register two image files and write the transform, warped image/labels, quality and report."""
    if method not in ALL_METHODS:
        raise MedsegError(f"unknown method {method!r} (use one of {', '.join(ALL_METHODS)})")
    if method == "learned" and model is None:
        raise MedsegError(
            "--method learned needs --model (a folder made by `medseg train-registration`)"
        )
    out = Path(output_dir)
    suffix = _output_suffix(fixed)
    deformable = method in ("bspline", "demons", "learned")
    names = {
        "transform": out / ("transform.h5" if deformable else "transform.tfm"),
        "warped": out / f"warped{suffix}",
        "quality": out / "quality.json",
    }
    if labels is not None:
        names["warped_labels"] = out / f"warped_labels{suffix}"
    if deformable:
        names["jacobian"] = out / "jacobian.nii.gz"
    if not overwrite:
        for p in names.values():
            if p.exists():
                raise MedsegError(f"{p}: already exists (use --overwrite to replace it)")
    f_img, m_img = read_image(fixed), read_image(moving)
    check_pair(f_img, m_img, names=(str(fixed), str(moving)))
    masks = {}
    for key, path, ref in (("fixed_mask", fixed_mask, f_img), ("moving_mask", moving_mask, m_img)):
        if path is not None:
            mask = read_image(path)
            if mask.ndim != ref.ndim:
                raise MedsegError(f"{path}: a {mask.ndim}D mask for a {ref.ndim}D image")
            if not np.any(mask.array):
                raise MedsegError(f"{path}: the mask is empty (no nonzero voxel)")
            masks[key] = mask
    m_labels = read_image(labels) if labels is not None else None
    if m_labels is not None and m_labels.shape != m_img.shape:
        raise MedsegError(
            f"{labels}: labels of shape {m_labels.shape} do not match the moving image {m_img.shape}"
        )
    inverse = None
    start = time.perf_counter()
    if method == "learned":
        if masks:
            raise MedsegError(
                "--method learned does not use masks (drop --fixed-mask/--moving-mask)"
            )
        net = load_registration_model(model, precision=precision)
        transform, inverse = register_learned(f_img, m_img, net, return_inverse=True)
        info = {}
    else:
        assert method in METHODS
        result = register(f_img, m_img, method=method, metric=metric, init=init, **masks)
        transform = result.transform
        info = {
            "metric_value": result.metric_value,
            "iterations": result.iterations,
            "stop_condition": result.stop_condition,
        }
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    write_transform(transform, names["transform"], overwrite=overwrite)
    warped = warp_image(m_img, f_img, transform)
    write_image(_for_format(warped, m_img, suffix), names["warped"], overwrite=overwrite)
    summary: dict = {
        "fixed": str(fixed),
        "moving": str(moving),
        "method": method,
        "metric": None if method == "learned" else metric,
        "precision": precision if method == "learned" else None,
        "init": init,
        "seconds": round(seconds, 3),
        **info,
        "files": {k: str(v) for k, v in names.items()},
    }
    if method not in ("learned",):
        summary["linear_part"] = linear_parameters(transform)
    if m_labels is not None:
        w_labels = warp_labels(m_labels, f_img, transform, mode=label_mode)
        write_image(w_labels, names["warped_labels"], overwrite=overwrite)
        if fixed_labels is not None:
            ref = read_image(fixed_labels)
            if ref.shape != f_img.shape:
                raise MedsegError(
                    f"{fixed_labels}: shape {ref.shape} differs from the fixed image {f_img.shape}"
                )
            d = dice_per_label(w_labels.array, ref.array)
            summary["dice"] = d
            summary["dice_mean"] = float(np.mean(list(d.values()))) if d else float("nan")
    jac = None
    if deformable:
        quality, jac = deformation_quality(transform, f_img, inverse=inverse)
        summary["quality"] = quality
        write_image(jac, names["jacobian"], overwrite=overwrite)
    if report:
        before = warp_image(m_img, f_img, centring_transform(f_img, m_img))
        pngs = save_views(f_img, warped, out, jacobian=jac, moving_on_fixed=before)
        summary["files"]["report"] = str(
            write_report(
                out,
                title=f"medseg register: {method}",
                summary={k: v for k, v in summary.items() if k != "files"},
                images=pngs,
            )
        )
    write_json_atomic(summary, names["quality"])
    return summary


def atlas_segment_files(
    target: str | os.PathLike,
    atlases_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "demons",
    metric: str = "mattes",
    fusion: str = "majority",
    max_atlases: int | None = None,
    model: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Segment one target image with the labelled cases of a dataset folder; write the fused labels."""
    out = Path(output)
    if image_suffix(out) not in WRITE_SUFFIXES:
        out = (
            out
            / f"{Path(target).name[: len(Path(target).name) - len(image_suffix(target))] or 'target'}{_output_suffix(target)}"
        )
    if out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists (use --overwrite to replace it)")
    image = read_image(target)
    atlases = load_atlases(atlases_dir, max_atlases=max_atlases)
    register_fn = None
    if method == "learned":
        if model is None:
            raise MedsegError("--method learned needs --model")
        net = load_registration_model(model)

        def register_fn(f, m):
            return register_learned(f, m, net)

    result = atlas_segment(
        image,
        atlases,
        register=register_fn,
        method=method,
        metric=metric,
        fusion=fusion,
        show_progress=show_progress,
    )
    write_image(result.labels, out, overwrite=overwrite)
    return {
        "target": str(target),
        "output": str(out),
        "atlases": len(atlases),
        "method": method,
        "fusion": fusion,
        "seconds_per_atlas": [round(s, 3) for s in result.seconds_per_atlas],
        "labels": [int(v) for v in np.unique(result.labels.array)],
    }


def train_registration_dataset(
    dataset: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    config=None,
    resume: bool = True,
    show_progress: bool = True,
):
    """Check the dataset folder, then train a learned registration model (see ``learned``)."""
    load_dataset(dataset)  # raises a DatasetError naming the folder when it is not one
    return train_registration(
        dataset, model_dir, config=config, resume=resume, show_progress=show_progress
    )
