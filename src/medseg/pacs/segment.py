"""One study through the model: DICOM series in, label map, volumes and DICOM SEG out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.dicom import read_series, write_rtstruct, write_seg
from medseg.inference import Predictor
from medseg.io.files import write_image
from medseg.io.image import Image


@dataclass(frozen=True)
class SegmentationResult:
    """Files written for one segmented series, and the per-label volumes."""

    series_uid: str
    study_uid: str
    image: str  # the input volume as NIfTI (for the viewer)
    label: str  # the label map as NIfTI
    seg: str | None  # the DICOM SEG (None for a non-DICOM input)
    volumes_ml: dict[str, float]
    labels: dict[int, str]
    rtstruct: str | None = None  # the RT Structure Set, when asked for


def model_labels(predictor) -> dict[int, str]:
    """Label value -> name, background excluded, from a Predictor's plan."""
    return {int(v): str(n) for v, n in predictor.plan.labels if int(v) != 0}


def label_volumes_ml(label: Image, labels: dict[int, str]) -> dict[str, float]:
    """Volume of each label in millilitres (voxel count x voxel volume)."""
    voxel_ml = float(np.prod(label.spacing)) / 1000.0
    counts = np.bincount(label.array.ravel().astype(np.int64), minlength=max(labels, default=0) + 1)
    return {name: round(float(counts[v]) * voxel_ml, 4) for v, name in sorted(labels.items())}


UNCERTAINTY_FILE = "uncertainty.nii.gz"  # the viewer's uncertainty overlay (issue 20)


def segment_image(
    predictor,
    image: Image,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    uncertainty: bool = False,
):
    """Predict a label map for ``image`` and write ``image.nii.gz`` and ``label.nii.gz``.

    ``uncertainty`` also writes ``uncertainty.nii.gz`` (the entropy map, in nats) when the
    predictor can make one (:meth:`medseg.inference.Predictor.predict_case`).
    """
    output_dir = Path(output_dir)
    if uncertainty and hasattr(predictor, "predict_case"):
        label, entropy = predictor.predict_case([image], uncertainty=True)
        if entropy is not None:
            array = entropy.array.astype(np.float32)
            write_image(entropy.with_array(array), output_dir / UNCERTAINTY_FILE, overwrite=True)
    else:
        label = predictor.predict([image])
    labels = model_labels(predictor)
    image_path = write_image(image, output_dir / "image.nii.gz", overwrite=overwrite)
    label_path = write_image(label, output_dir / "label.nii.gz", overwrite=overwrite)
    return label, labels, image_path, label_path


def segment_dicom(
    predictor,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    model_name: str | None = None,
    code_table: str | os.PathLike | None = None,
    rtstruct: bool = False,
    overwrite: bool = False,
) -> SegmentationResult:
    """Segment one DICOM series (folder or zip) and write NIfTI files and a DICOM SEG.

    Parameters
    ----------
    predictor
        A :class:`medseg.inference.Predictor` (or anything with ``plan`` and ``predict``).
    source
        Folder or zip holding the series.
    output_dir
        Receives ``image.nii.gz``, ``label.nii.gz``, ``seg.dcm`` (and ``rtstruct.dcm``).
    rtstruct
        Also write an RT Structure Set of the same labels.
    """
    series = read_series(source, series_uid=series_uid, modality=modality)
    label, labels, image_path, label_path = segment_image(
        predictor, series.image, output_dir, overwrite=overwrite
    )
    name = model_name or Path(predictor.model_dir).name
    seg_path = rt_path = None
    if rtstruct and np.any(label.array):
        rt_path = write_rtstruct(
            label,
            series,
            Path(output_dir) / "rtstruct.dcm",
            labels=labels,
            model_name=name,
            overwrite=overwrite,
        )
    if np.any(label.array):
        seg_path = write_seg(
            label,
            series,
            Path(output_dir) / "seg.dcm",
            labels=labels,
            model_name=name,
            code_table=code_table,
            overwrite=overwrite,
        )
    return SegmentationResult(
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        image=str(image_path),
        label=str(label_path),
        seg=str(seg_path) if seg_path else None,
        volumes_ml=label_volumes_ml(label, labels),
        labels=labels,
        rtstruct=str(rt_path) if rt_path else None,
    )


def load_predictor(model_dir: str | os.PathLike, *, device: str = "auto") -> Predictor:
    """A Predictor for a model folder (or a work folder holding ``model/``).

    The folder is read with :class:`medseg.model_folder.ModelFolder` (a one-line
    :class:`~medseg.errors.MedsegError` when it is not a trained model folder).
    """
    return Predictor(model_dir, device=device)
