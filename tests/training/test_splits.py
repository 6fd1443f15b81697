"""Labelled subsets of a training split: reproducible from the seed, nested, sized right."""

from __future__ import annotations

import pytest

from medseg.errors import MedsegError
from medseg.training.splits import labelled_subset

IDS = [f"case_{i:03d}" for i in range(166)]


def test_labelled_subset_is_reproducible_from_its_seed():
    a = labelled_subset(IDS, fraction=0.1, seed=0)
    assert a == labelled_subset(list(reversed(IDS)), fraction=0.1, seed=0)  # order-free
    assert len(a) == 17 and len(labelled_subset(IDS, fraction=0.25, seed=0)) == 42
    assert set(a) <= set(labelled_subset(IDS, fraction=0.25, seed=0))  # nested
    assert a != labelled_subset(IDS, fraction=0.1, seed=1)
    assert labelled_subset(IDS, cases=8, seed=5) == labelled_subset(IDS, cases=8, seed=5)
    assert labelled_subset(IDS) == IDS


@pytest.mark.parametrize(
    "options",
    [
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"cases": 0},
        {"cases": 167},
        {"fraction": 0.1, "cases": 3},
    ],
)
def test_labelled_subset_rejects_bad_sizes(options):
    with pytest.raises(MedsegError):
        labelled_subset(IDS, **options)
