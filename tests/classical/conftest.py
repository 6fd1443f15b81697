"""Fixtures shared by the classical tests."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.classical import blob


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def case(request):
    rng = np.random.default_rng(request.param)
    if request.param == 2:
        return blob((60, 50), (0.5, 0.8), 9.0, rng)
    return blob((30, 28, 16), (1.0, 1.2, 2.5), 9.0, rng)
