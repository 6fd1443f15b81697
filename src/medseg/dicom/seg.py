"""DICOM SEG output with highdicom: one segment per label, coded, referencing its source slices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg import __version__
from medseg.dicom.codes import code_for_label, load_code_table
from medseg.dicom.series import DicomSeries
from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.io.image import Image


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite``; create its folder."""
    if path.exists() and not overwrite:
        raise MedsegError(f"{path}: already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)


def save_dataset_atomic(dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a pydicom dataset to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    check_destination(path, overwrite)
    with atomic_path(path, suffix=".dcm") as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def seg_frames(label: Image, series: DicomSeries) -> np.ndarray:
    """The label map as DICOM frames ``(slice, row, column)`` in the series' slice order."""
    if not label.same_geometry(series.image, atol=1e-3):
        raise MedsegError(
            f"label map of shape {label.shape} does not lie on the grid of series "
            f"{series.series_uid} (shape {series.image.shape})"
        )
    return np.ascontiguousarray(label.array.transpose(2, 1, 0))


def make_seg(
    label: Image,
    series: DicomSeries,
    *,
    labels: dict[int, str],
    model_name: str = "medseg",
    code_table: str | os.PathLike | None = None,
    series_number: int = 900,
):
    """Build a DICOM SEG dataset (highdicom) for a label map on the grid of ``series``.

    Parameters
    ----------
    label
        Integer label map with the geometry of ``series.image``.
    series
        The source series (from :func:`medseg.dicom.read_series`).
    labels
        Label value to name; each value present in ``label`` (except 0) becomes a segment.
    model_name
        Recorded as the algorithm name (with medseg's version) and manufacturer model name.
    code_table
        A JSON file that overrides the built-in label-to-SNOMED-CT table.

    Returns
    -------
    highdicom.seg.Segmentation
        The dataset, and ``segment_values``: segment number to label value, as an attribute.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not series.datasets[0].get(key):
            raise MedsegError(
                f"{series.files[0]}: empty {key}; a SEG cannot reference this series "
                "(de-identify it first: that assigns UIDs)"
            )
    frames = seg_frames(label, series)
    present = [int(v) for v in np.unique(frames) if v != 0]
    if not present:
        raise MedsegError(f"the label map for series {series.series_uid} is empty: no SEG written")
    table = load_code_table(code_table)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name,
        version=f"medseg {__version__}",
        family=codes.cid7162.ArtificialIntelligence,
        source="medseg",
    )
    descriptions = []
    numbered = np.zeros(frames.shape, dtype=np.uint16)
    for number, value in enumerate(present, start=1):
        name = labels.get(value, f"label {value}")
        code = code_for_label(name, table)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=Code(
                    code.category[1], code.category[0], code.category[2]
                ),
                segmented_property_type=Code(code.type[1], code.type[0], code.type[2]),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=f"{name} ({model_name})"[:64],
            )
        )
        numbered[frames == value] = number
    seg = hd.seg.Segmentation(
        source_images=list(series.datasets),
        pixel_array=numbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=model_name[:64],
        software_versions=str(__version__),
        device_serial_number="0",
        series_description=f"medseg {model_name}"[:64],
        content_label="MEDSEG",
        content_creator_name="medseg^automatic",
    )
    seg.segment_values = dict(enumerate(present, start=1))
    return seg


def write_seg(
    label: Image,
    series: DicomSeries,
    path: str | os.PathLike,
    *,
    labels: dict[int, str],
    model_name: str = "medseg",
    code_table: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a DICOM SEG file for ``label`` (see :func:`make_seg`), atomically."""
    check_destination(Path(path), overwrite)
    seg = make_seg(label, series, labels=labels, model_name=model_name, code_table=code_table)
    return save_dataset_atomic(seg, path, overwrite=overwrite)


def read_seg_labels(path: str | os.PathLike, series: DicomSeries) -> tuple[Image, dict[int, str]]:
    """Re-open a SEG with highdicom as a label map on the grid of ``series``.

    Segment numbers are given back in segment order (1..N) and named by their labels.
    """
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )
    names = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    array = np.ascontiguousarray(np.asarray(pixels).transpose(2, 1, 0))
    return series.image.with_array(array.astype(np.uint16)), names
