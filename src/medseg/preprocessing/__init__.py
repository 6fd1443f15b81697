"""Cropping, normalization and resampling as the plan says, cached on disk."""

from medseg.preprocessing.preprocess import (
    CaseGeometry,
    load_preprocessed,
    preprocess_dataset,
    preprocess_image,
)

__all__ = ["CaseGeometry", "load_preprocessed", "preprocess_dataset", "preprocess_image"]
