"""DICOM in and out: checked series reading, DICOM SEG and RTSTRUCT writing, label codes, de-identification."""

from medseg.dicom.codes import SegmentCode, code_for_label, load_code_table
from medseg.dicom.deid import deidentify_datasets, deidentify_folder
from medseg.dicom.rtstruct import make_rtstruct, rasterize_rtstruct, write_rtstruct
from medseg.dicom.seg import make_seg, read_seg_labels, save_dataset_atomic, write_seg
from medseg.dicom.series import (
    DicomSeries,
    DicomSeriesError,
    SeriesInfo,
    dicom_folder,
    read_series,
    scan_series,
    select_series,
)

__all__ = [
    "DicomSeries",
    "DicomSeriesError",
    "SegmentCode",
    "SeriesInfo",
    "code_for_label",
    "deidentify_datasets",
    "deidentify_folder",
    "dicom_folder",
    "load_code_table",
    "make_rtstruct",
    "make_seg",
    "rasterize_rtstruct",
    "read_seg_labels",
    "read_series",
    "save_dataset_atomic",
    "scan_series",
    "select_series",
    "write_rtstruct",
    "write_seg",
]
