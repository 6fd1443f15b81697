"""PACS round trip over DICOMweb: pull a study, segment it, push the DICOM SEG back, watch."""

from medseg.pacs.client import (
    PacsError,
    connect,
    find_series,
    find_studies,
    process_study,
    pull_study,
    push,
    watch,
)
from medseg.pacs.segment import SegmentationResult, load_predictor, segment_dicom

__all__ = [
    "PacsError",
    "SegmentationResult",
    "connect",
    "find_series",
    "find_studies",
    "load_predictor",
    "process_study",
    "pull_study",
    "push",
    "segment_dicom",
    "watch",
]
