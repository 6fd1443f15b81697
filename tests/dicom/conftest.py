"""Fixtures shared by the dicom tests."""

from __future__ import annotations

import pytest
from dicom_factory import phantom_volume, write_series
from helpers.dicom import ORIGIN, SPACING


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    volume, ball = phantom_volume()
    folder = tmp_path_factory.mktemp("series")
    write_series(folder, volume, spacing=SPACING, origin=ORIGIN)
    return folder, volume, ball
