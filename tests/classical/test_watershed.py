"""Classical methods: golden values from scikit-image and SimpleITK, ground truth by construction."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.classical import dice

from medseg.classical import (
    chan_vese,
    watershed,
)
from medseg.errors import MedsegError


def test_watershed_from_markers_and_automatic(case):
    image, truth = case
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(n // 2 for n in image.shape)] = 2
    markers[(0,) * image.ndim] = 1
    labels = watershed(image, markers, sigma_mm=1.5)
    assert set(np.unique(labels.array)) == {1, 2}
    assert dice(labels.array == 2, truth) > 0.85
    assert dice(watershed(image).array, truth) > 0.85
    with pytest.raises(MedsegError, match="markers are empty"):
        watershed(image, np.zeros(image.shape, int))


def test_chan_vese_segments_the_blob(case):
    image, truth = case
    out = chan_vese(image, iterations=30, init="checkerboard")
    assert dice(out.array, truth) > 0.9
    assert out.same_geometry(image)
