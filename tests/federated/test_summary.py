"""The federated fingerprint: pooled statistics equal those of the pooled data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.federated.summary import fingerprint_from_json, merge_summaries, site_summary
from medseg.io.dataset import load_dataset
from medseg.planning.fingerprint import ChannelStats, Fingerprint


def _fp(values: np.ndarray, n: int, spacing: float) -> Fingerprint:
    stats = ChannelStats(
        float(values.mean()),
        float(values.std()),
        float(np.median(values)),
        float(np.percentile(values, 0.5)),
        float(np.percentile(values, 99.5)),
        float(values.min()),
        float(values.max()),
    )
    return Fingerprint(
        dataset_name="d",
        ndim=3,
        channel_names=("MRI",),
        is_ct=(False,),
        labels=((0, "background"), (1, "a")),
        num_cases=n,
        spacings=((spacing, 1.0, 1.0),) * n,
        shapes=((10, 10, 10),) * n,
        cropped_shapes=((8, 8, 8),) * n,
        crop_volume_ratio=0.5,
        foreground_intensities=(stats,),
        class_voxel_fraction=(0.9, 0.1),
        class_case_fraction=(1.0, 1.0),
    )


def test_pooled_mean_and_std_equal_those_of_the_pooled_data():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 3000), rng.normal(5, 2, 1000)
    # one "case" per 1000 values, so case weights are sample weights
    merged = merge_summaries([_fp(a, 3, 1.0), _fp(b, 1, 2.0)])
    pooled = np.concatenate([a, b])
    stats = merged.foreground_intensities[0]
    assert stats.mean == pytest.approx(pooled.mean(), rel=1e-9)
    assert stats.std == pytest.approx(pooled.std(), rel=1e-9)
    assert stats.minimum == pooled.min() and stats.maximum == pooled.max()
    assert merged.num_cases == 4 and len(merged.spacings) == 4
    assert merged.median_spacing == (1.0, 1.0, 1.0)


def test_sites_that_disagree_on_labels_are_refused():
    a = _fp(np.ones(10), 1, 1.0)
    with pytest.raises(MedsegError, match="labels"):
        merge_summaries([a, replace(a, labels=((0, "background"), (1, "b")))])


def test_a_site_summary_holds_no_voxels(phantom_dataset):
    spec = load_dataset(phantom_dataset)
    text = site_summary(spec, case_ids=[c.case_id for c in spec.cases[:2]])
    fp = fingerprint_from_json(text)
    assert fp.num_cases == 2
    assert len(text) < 4000  # statistics and header geometry only
    with pytest.raises(MedsegError):
        fingerprint_from_json('{"dataset_name": 1}')
