"""RTSTRUCT output: each label's outline per slice as closed planar contours (pydicom).

highdicom does not write RT Structure Sets, and rt-utils pulls in OpenCV; the contours come
from scikit-image's marching squares at the 0.5 iso-line of each label's slice mask, in
patient coordinates (holes are contours too: readers fill with the even-odd rule).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from medseg import __version__
from medseg.dicom.seg import check_destination, save_dataset_atomic, seg_frames
from medseg.dicom.series import DicomSeries
from medseg.errors import MedsegError
from medseg.io.image import Image

_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription", "PatientIdentityRemoved",
)  # fmt: skip
_DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"
_COLOURS = [(255, 0, 0), (0, 200, 0), (0, 80, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220)]


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
    return item


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines ``(N, 2)`` in (x, y) voxel indices of a 2D ``(x, y)`` mask."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(np.float32), 1)  # outlines close at the border too
    return [c[:-1] - 1 for c in find_contours(padded, 0.5) if len(c) > 3]


def make_rtstruct(
    label: Image, series: DicomSeries, *, labels: dict[int, str], model_name: str = "medseg"
) -> Dataset:
    """An RT Structure Set with one ROI per label present in ``label`` (grid of ``series``)."""
    seg_frames(label, series)  # the same grid check as for SEG
    first = series.datasets[0]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not first.get(key):
            raise MedsegError(f"{series.files[0]}: empty {key}; an RTSTRUCT cannot reference it")
    present = [int(v) for v in np.unique(label.array) if v != 0]
    if not present:
        raise MedsegError(f"the label map for series {series.series_uid} is empty")
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = (
        RTStructureSetStorage,
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds.InstanceCreationDate, ds.InstanceCreationTime = (
        now.strftime("%Y%m%d"),
        now.strftime("%H%M%S"),
    )
    for key in _COPIED:
        setattr(ds, key, first.get(key, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 901
    ds.SeriesDescription = f"medseg {model_name}"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = "medseg", model_name[:64]
    ds.SoftwareVersions = str(__version__)
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "MEDSEG"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    images = [_ref(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in series.datasets]
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series.series_uid
    ref_series.ContourImageSequence = Sequence(images)
    ref_study = _ref(_DETACHED_STUDY, series.study_uid)
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, contours, observations = [], [], []
    for number, value in enumerate(present, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, first.FrameOfReferenceUID
        roi.ROIName = labels.get(value, f"label {value}")[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        items = []
        for k in range(label.shape[2]):
            mask = label.array[:, :, k] == value
            if not mask.any():
                continue
            for outline in slice_contours(mask):
                index = np.column_stack([outline, np.full(len(outline), k)])
                points = label.index_to_world(index)
                item = Dataset()
                item.ContourImageSequence = Sequence([images[k]])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourData = [f"{v:.3f}" for v in points.ravel()]
                items.append(item)
        contour = Dataset()
        contour.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        contour.ReferencedROINumber = number
        contour.ContourSequence = Sequence(items)
        contours.append(contour)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.RTROIInterpretedType, obs.ROIInterpreter = "ORGAN", ""
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def write_rtstruct(
    label: Image,
    series: DicomSeries,
    path: str | os.PathLike,
    *,
    labels: dict[int, str],
    model_name: str = "medseg",
    overwrite: bool = False,
) -> Path:
    """Write an RTSTRUCT for ``label`` (see :func:`make_rtstruct`), atomically."""
    check_destination(Path(path), overwrite)
    ds = make_rtstruct(label, series, labels=labels, model_name=model_name)
    return save_dataset_atomic(ds, path, overwrite=overwrite)


def rasterize_rtstruct(path: str | os.PathLike, series: DicomSeries) -> dict[str, np.ndarray]:
    """ROI name -> ``(x, y, z)`` mask on the grid of ``series`` (even-odd fill of the contours)."""
    from skimage.draw import polygon

    ds = pydicom.dcmread(path)
    image = series.image
    inverse = np.linalg.inv(image.direction_matrix * np.asarray(image.spacing))
    slice_of = {str(d.SOPInstanceUID): k for k, d in enumerate(series.datasets)}
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out = {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros(image.shape, dtype=bool)
        for item in roi.get("ContourSequence", []):
            points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
            index = (points - np.asarray(image.origin)) @ inverse.T
            k = slice_of[str(item.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            rr, cc = polygon(index[:, 0], index[:, 1], shape=image.shape[:2])
            mask[rr, cc, k] ^= True
        out[names[int(roi.ReferencedROINumber)]] = mask
    return out
