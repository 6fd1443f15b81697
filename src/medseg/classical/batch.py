"""Run a classical method or a filter on one image file or a folder of them (API and CLI)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io.files import (
    IMAGE_SUFFIXES,
    WRITE_SUFFIXES,
    image_suffix,
    read_image,
    strip_suffix,
    write_image,
)
from medseg.io.image import Image
from medseg.progress import progress

CASTS = ("uint8", "uint16", "int16", "float32")


def input_files(input_path: str | os.PathLike) -> list[Path]:
    """The image file itself, or the image files of a folder (sorted, hidden files skipped)."""
    path = Path(input_path)
    if not path.exists():
        raise MedsegError(f"{path}: not found")
    if path.is_file():
        if not image_suffix(path):
            raise MedsegError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith(".")
    )
    if not files:
        raise MedsegError(f"{path}: no image files in this folder")
    return files


def output_path(source: Path, output: Path, *, single: bool, image: Image) -> Path:
    """Where the result of ``source`` goes: ``output`` itself for a file, else a name in the folder.

    In a folder the input's name is kept; its suffix too when medseg can write it
    and the data fit (PNG holds 2D integers), otherwise ``.nii.gz``.
    """
    if single and image_suffix(output):
        return output
    suffix = image_suffix(source)
    fits_png = image.ndim == 2 and image.array.dtype.kind in "biu"
    if suffix not in WRITE_SUFFIXES or (suffix == ".png" and not fits_png):
        suffix = ".png" if suffix in (".jpg", ".jpeg", ".bmp") and fits_png else ".nii.gz"
    return output / f"{strip_suffix(source)}{suffix}"


def cast(image: Image, dtype: str | None) -> Image:
    """Round, clip to the type's range and cast (e.g. a filtered PNG back to uint8)."""
    if dtype is None:
        return image
    if dtype not in CASTS:
        raise MedsegError(f"unknown output type {dtype!r} (choose from {', '.join(CASTS)})")
    array = image.array
    if dtype != "float32":
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return image.with_array(array.astype(dtype))


def map_images(
    fn: Callable[[Image], Image],
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    output_dtype: str | None = None,
    show_progress: bool = True,
    desc: str = "",
) -> list[Path]:
    """Apply ``fn`` to every input image and write the results atomically.

    A problem in one file stops the run with that file's name in the message.
    Existing outputs are refused (before any work when their names are known)
    unless ``overwrite``.
    """
    files = input_files(input_path)
    out = Path(output)
    single = Path(input_path).is_file()
    if not single and image_suffix(out):
        raise MedsegError(f"{out}: the input is a folder, so the output must be a folder")
    if single and image_suffix(out) and out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists (use --overwrite to replace it)")
    written = []
    for path in progress(files, total=len(files), desc=desc, enabled=show_progress):
        image = read_image(path)
        try:
            result = cast(fn(image), output_dtype)
        except MedsegError as exc:
            raise MedsegError(f"{path}: {exc}") from None
        target = output_path(path, out, single=single, image=result)
        written.append(write_image(result, target, overwrite=overwrite))
    return written
