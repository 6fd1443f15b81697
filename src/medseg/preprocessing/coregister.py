"""Co-registration of a case's channels onto the grid of its first channel.

Multi-modal studies often store each sequence on its own grid (another resolution, field
of view or orientation), and the sequences of one patient may be physically misaligned
(the patient moved between them). The network needs every channel voxel-aligned, so
:func:`coregister_dataset` writes a new dataset folder (nnU-Net v2 layout) in which every
channel is resampled onto channel 0's grid, after an optional alignment step per channel.

The alignment is an ``aligner``: a function ``(fixed, moving) -> Alignment`` whose
transform maps points of channel 0 (fixed) to points of the other channel (moving),
ITK's convention. This module only resamples; the rigid/affine registration lives in
:mod:`medseg.registration.coregister` (above preprocessing in the layers) and is passed
in by :mod:`medseg.workflow`. Without an aligner the scanner coordinates are trusted
(pure resampling through the headers).

Output layout (``out_dir``)::

    dataset.json                  nnU-Net v2 metadata, plus "coregistered_from" and "coregistration"
    imagesTr/<case>_<XXXX>.nii.gz every channel on channel 0's grid
    labelsTr/<case>.nii.gz        the labels (they live on channel 0's grid already)
    imagesTs/...                  test cases, the same way
    transforms/<case>_<XXXX>.tfm  the transform applied to channel XXXX (channel 0 -> channel XXXX points)
    transforms/<case>.json        per channel: method, accepted, metric before/after, parameters
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.io.dataset import CaseSpec, DatasetSpec, read_case_image, read_case_label
from medseg.io.files import from_sitk, to_sitk, write_image
from medseg.io.image import Image
from medseg.progress import progress
from medseg.serialization import write_json_atomic

#: Geometry tolerance (mm, and direction cosines) under which two grids count as the same.
GRID_ATOL = 1e-3
INTERPOLATORS = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}


@dataclass(frozen=True)
class Alignment:
    """How one channel was aligned to channel 0.

    ``transform`` maps channel-0 (fixed) points to points of the channel (moving).
    ``accepted`` is False when a registration was tried but did not improve the
    similarity metric, in which case ``transform`` is the identity (headers trusted).
    """

    transform: sitk.Transform
    method: str
    accepted: bool = True
    metric_before: float | None = None
    metric_after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "accepted": self.accepted,
            "metric_before": self.metric_before,
            "metric_after": self.metric_after,
            "transform_type": self.transform.GetName(),
            "parameters": list(self.transform.GetParameters()),
            "fixed_parameters": list(self.transform.GetFixedParameters()),
            **self.details,
        }


Aligner = Callable[[Image, Image], Alignment]


def identity(ndim: int) -> sitk.Transform:
    """The identity transform (the channel's header is trusted)."""
    return sitk.Transform(ndim, sitk.sitkIdentity)


def same_grid(a: Image, b: Image, *, atol: float = GRID_ATOL) -> bool:
    """True when ``a`` and ``b`` have the same shape, spacing, origin and direction."""
    return a.ndim == b.ndim and a.same_geometry(b, atol=atol)


def misaligned_channels(channels: list[Image]) -> list[int]:
    """Indices of the channels whose grid differs from channel 0's."""
    return [i for i, c in enumerate(channels[1:], 1) if not same_grid(channels[0], c)]


def resample_onto(
    image: Image, reference: Image, transform: sitk.Transform | None = None, *, order: int = 1
) -> Image:
    """``image`` resampled on ``reference``'s grid through ``transform`` (reference -> image points).

    Voxels that map outside ``image`` get 0. ``order`` 0 nearest, 1 linear, 3 B-spline.
    """
    if image.ndim != reference.ndim:
        raise MedsegError(
            f"a {image.ndim}D channel cannot be resampled onto a {reference.ndim}D channel 0"
        )
    if order not in INTERPOLATORS:
        raise ValueError(f"order must be one of {sorted(INTERPOLATORS)}, got {order}")
    transform = transform if transform is not None else identity(reference.ndim)
    moving = to_sitk(image.with_array(np.asarray(image.array, dtype=np.float32)))
    out = sitk.Resample(
        moving,
        [int(s) for s in reference.shape],
        transform,
        INTERPOLATORS[order],
        reference.origin,
        reference.spacing,
        reference.direction,
        0.0,
        sitk.sitkFloat32,
    )
    return reference.with_array(from_sitk(out).array)


def coregister_channels(
    channels: list[Image], *, align: Aligner | None = None, order: int = 1
) -> tuple[list[Image], list[Alignment | None]]:
    """Every channel on channel 0's grid; the alignment of each (None for channel 0).

    Without ``align``, a channel already on channel 0's grid is kept as it is and the
    others are resampled through their headers. With ``align``, every other channel
    is registered to channel 0 first (the aligner decides whether to keep the result).
    """
    if not channels:
        raise MedsegError("a case needs at least one channel")
    reference = channels[0]
    out: list[Image] = [reference]
    alignments: list[Alignment | None] = [None]
    for channel in channels[1:]:
        if align is None:
            alignment = Alignment(identity(reference.ndim), "header")
        else:
            alignment = align(reference, channel)
        if align is None and same_grid(reference, channel):
            out.append(channel)
        else:
            out.append(resample_onto(channel, reference, alignment.transform, order=order))
        alignments.append(alignment)
    return out, alignments


def _labels_json(spec: DatasetSpec) -> dict[str, int]:
    return {name: int(value) for value, name in spec.labels}


def _write_transform(transform: sitk.Transform, path: Path) -> None:
    with atomic_path(path, suffix=".tfm") as tmp:
        sitk.WriteTransform(transform, str(tmp))


def _coregister_case(
    spec: DatasetSpec,
    case: CaseSpec,
    out: Path,
    images_dir: str,
    labels_dir: str | None,
    align: Aligner | None,
    order: int,
) -> str:
    marker = out / "transforms" / f"{case.case_id}.json"
    if marker.exists():  # written last: the case is done
        return case.case_id
    channels = read_case_image(spec, case)
    moved, alignments = coregister_channels(channels, align=align, order=order)
    for index, image in enumerate(moved):
        write_image(image, out / images_dir / f"{case.case_id}_{index:04d}.nii.gz", overwrite=True)
    if labels_dir is not None and case.label is not None:
        write_image(
            read_case_label(spec, case),
            out / labels_dir / f"{case.case_id}.nii.gz",
            overwrite=True,
        )
    record: dict[str, Any] = {"case_id": case.case_id, "channels": {}}
    for index, alignment in enumerate(alignments):
        if alignment is None:
            continue
        _write_transform(
            alignment.transform, out / "transforms" / f"{case.case_id}_{index:04d}.tfm"
        )
        record["channels"][spec.channel_names[index]] = {
            "index": index,
            "was_on_grid": same_grid(channels[0], channels[index]),
            **alignment.to_json(),
        }
    write_json_atomic(record, marker)
    return case.case_id


def coregister_dataset(
    spec: DatasetSpec,
    out_dir: str | os.PathLike,
    *,
    align: Aligner | None = None,
    method: str = "header",
    order: int = 1,
    num_workers: int = 1,
    show_progress: bool = True,
) -> Path:
    """Write ``spec``'s cases with every channel on channel 0's grid to ``out_dir``.

    Parameters
    ----------
    spec
        The dataset (any layout: MSD 4D files or nnU-Net ``_XXXX`` channels).
    out_dir
        The new dataset folder (nnU-Net v2 layout, see the module docstring).
        Finished cases are skipped, so an interrupted run resumes.
    align
        Registers each channel to channel 0 (see :class:`Alignment`); None trusts the headers.
    method
        The name of the alignment, recorded in ``dataset.json``.
    order
        Interpolation of the resampled channels (0, 1 or 3).
    num_workers
        Cases processed at a time (threads; SimpleITK releases the GIL).
    show_progress
        Progress bar on stderr.

    Returns
    -------
    Path
        ``out_dir``, a dataset folder that ``medseg check`` accepts.
    """
    out = Path(out_dir)
    if out.resolve() == Path(spec.root).resolve():
        raise MedsegError(f"{out}: the co-registered dataset needs its own folder")
    (out / "transforms").mkdir(parents=True, exist_ok=True)
    jobs = [(c, "imagesTr", "labelsTr") for c in spec.cases] + [
        (c, "imagesTs", "labelsTs" if c.label else None) for c in spec.test_cases
    ]

    def work(job: tuple[CaseSpec, str, str | None]) -> str:
        case, images_dir, labels_dir = job
        return _coregister_case(spec, case, out, images_dir, labels_dir, align, order)

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for _ in progress(
            pool.map(work, jobs), total=len(jobs), desc="coregister", enabled=show_progress
        ):
            pass
    meta = {
        "name": spec.name,
        "description": f"{spec.name}: every channel resampled onto channel 0's grid ({method})",
        "channel_names": {str(i): name for i, name in enumerate(spec.channel_names)},
        "labels": _labels_json(spec),
        "numTraining": len(spec.cases),
        "file_ending": ".nii.gz",
        "coregistered_from": str(spec.root),
        "coregistration": method,
    }
    write_json_atomic(meta, out / "dataset.json")
    return out


def read_coregistration(dataset: str | os.PathLike, case_id: str) -> dict[str, Any]:
    """The alignment record :func:`coregister_dataset` wrote for one case."""
    path = Path(dataset) / "transforms" / f"{case_id}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MedsegError(f"{path}: no co-registration record for case {case_id}") from None
