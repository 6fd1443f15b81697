"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import Image
from medseg.registration.atlas import fuse_labels


def test_majority_and_weighted_fusion_by_construction():
    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 1
    target = Image(np.where(truth, 100.0, 10.0).astype(np.float32), (1.0, 1.0))
    wrong = np.zeros_like(truth)
    wrong[0:4, 0:4] = 1
    labels = [target.with_array(truth), target.with_array(truth), target.with_array(wrong)]
    fused = fuse_labels(labels, method="majority")
    assert np.array_equal(fused.array, truth)
    # two bad atlases out-vote one good one by majority; local weights follow the images
    bad_image = target.with_array(np.where(wrong, 100.0, 10.0).astype(np.float32))
    labels = [target.with_array(truth), target.with_array(wrong), target.with_array(wrong)]
    images = [target, bad_image, bad_image]
    assert not np.array_equal(fuse_labels(labels, method="majority").array, truth)
    weighted = fuse_labels(labels, method="weighted", target=target, warped_images=images)
    assert (weighted.array == truth).mean() > 0.95
    with pytest.raises(MedsegError, match="needs the target"):
        fuse_labels(labels, method="weighted")
