"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.losses import LocalNCC


def test_local_ncc_matches_average_pooling_reference():
    a = torch.rand(1, 1, 14, 12, 10, dtype=torch.float64)
    b = 0.5 * a + 0.5 * torch.rand(1, 1, 14, 12, 10, dtype=torch.float64)

    def mean(x):
        return F.avg_pool3d(x, 9, 1, 4, count_include_pad=True)

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    ref = -(
        cov**2 / ((mean(a * a) - ma**2).clamp_min(0) * (mean(b * b) - mb**2).clamp_min(0) + 1e-5)
    ).mean()
    assert float(LocalNCC()(a, b)) == pytest.approx(float(ref), rel=1e-9)
    assert float(LocalNCC()(a, a)) < float(LocalNCC()(a, b))
