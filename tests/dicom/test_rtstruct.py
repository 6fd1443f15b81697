"""DICOM series reading with checks, DICOM SEG round trips (highdicom, dciodvfy), codes, de-identification."""

from __future__ import annotations

import numpy as np
from helpers.dicom import dciodvfy_errors

from medseg.dicom import (
    read_series,
)


def test_rtstruct_is_valid_and_outlines_the_labels(series_dir, tmp_path):
    from medseg.dicom.rtstruct import rasterize_rtstruct, write_rtstruct

    folder, _, ball = series_dir
    series = read_series(folder)
    label = ball.copy()
    label[1:6, 1:6, 2:5] = 2
    out = write_rtstruct(
        series.image.with_array(label),
        series,
        tmp_path / "rt.dcm",
        labels={1: "liver", 2: "lesion"},
    )
    assert dciodvfy_errors(out) == []
    masks = rasterize_rtstruct(out, series)
    assert set(masks) == {"liver", "lesion"}
    for name, value in (("liver", 1), ("lesion", 2)):
        truth = label == value
        dice = 2 * np.sum(masks[name] & truth) / (masks[name].sum() + truth.sum())
        assert dice > 0.9, (name, dice)  # outlines at the 0.5 iso-line, filled back
