"""Classical methods: golden values from scikit-image and SimpleITK, ground truth by construction."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers.classical import dice

from medseg.classical import (
    auto_seeds,
    fuzzy_c_means,
    region_grow,
    seeds_to_index,
    split_merge,
)
from medseg.errors import MedsegError
from medseg.io import Image, read_image
from medseg.io.files import from_sitk, to_sitk


@pytest.mark.parametrize("connectivity", [6, 26])
def test_range_growing_equals_simpleitk_connected_threshold(case, connectivity):
    image, _ = case
    centre = tuple(n // 2 for n in image.shape)
    seeds = [centre, tuple(c + 1 for c in centre)]
    ours = region_grow(image, seeds, lower=140, upper=230, connectivity=connectivity)
    ref = sitk.ConnectedThreshold(
        to_sitk(image),
        seedList=seeds,
        lower=140,
        upper=230,
        connectivity=sitk.ConnectedThresholdImageFilter.FullConnectivity
        if connectivity == 26
        else sitk.ConnectedThresholdImageFilter.FaceConnectivity,
    )
    np.testing.assert_array_equal(ours.array, from_sitk(ref).array)
    assert ours.array.sum() > 50


def test_confidence_growing_equals_simpleitk_confidence_connected(case):
    image, truth = case
    centre = tuple(n // 2 for n in image.shape)
    seeds = [centre, tuple(c - 1 for c in centre)]
    ours = region_grow(image, seeds, criterion="confidence", multiplier=2.5, iterations=3, radius=1)
    ref = sitk.ConfidenceConnected(
        to_sitk(image),
        seedList=seeds,
        numberOfIterations=3,
        multiplier=2.5,
        initialNeighborhoodRadius=1,
        replaceValue=1,
    )
    np.testing.assert_array_equal(ours.array, from_sitk(ref).array)
    assert dice(ours.array, truth) > 0.9


def test_18_connectivity_joins_edges_not_corners():
    data = np.zeros((3, 3, 3), np.float32)
    data[0, 0, 1] = data[1, 1, 1] = data[2, 2, 2] = (
        1  # (0,0,1)-(1,1,1) share an edge; (2,2,2) a corner
    )
    image = Image(data, (1.0, 1.0, 1.0))
    grow = lambda c: region_grow(image, [(1, 1, 1)], lower=1, upper=1, connectivity=c).array  # noqa: E731
    assert grow(6).sum() == 1
    assert grow(18).sum() == 2
    assert grow(26).sum() == 3


def test_gradient_growing_stops_at_an_edge_the_range_leaks_through():
    data = np.full((40, 20), 100.0, np.float32)
    data[20:] = 125.0
    image = Image(data, (1.0, 1.0))
    leaky = region_grow(image, [(5, 10)], lower=90, upper=130)
    assert leaky.array.all()
    edge = region_grow(image, [(5, 10)], criterion="gradient", lower=90, upper=130, max_gradient=2)
    assert edge.array[:18].all() and not edge.array[21:].any()


def test_seeds_in_mm_use_origin_spacing_and_direction():
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    image = Image(np.zeros((10, 12, 8), np.float32), (0.5, 2.0, 3.0), (10.0, -4.0, 7.0), direction)
    index = np.array([[3, 7, 5], [0, 0, 0], [9, 11, 7]])
    world = image.index_to_world(index)
    assert seeds_to_index(image, world, units="mm") == [tuple(i) for i in index.tolist()]
    with pytest.raises(MedsegError, match="outside the image"):
        seeds_to_index(image, [world[0] + np.array([0, 100, 0])], units="mm")
    with pytest.raises(MedsegError, match="outside the image"):
        region_grow(image, [(10, 0, 0)], tolerance=1)
    with pytest.raises(MedsegError, match="3 coordinates"):
        region_grow(image, [(1, 1)], tolerance=1)


def test_auto_seeds_land_inside_the_bright_object(case):
    image, truth = case
    for method in ("threshold", "histogram"):
        (seed,) = auto_seeds(image, method=method)
        assert truth[seed]
    grown = region_grow(image, criterion="confidence", multiplier=2.5, connectivity=26)
    assert dice(grown.array, truth) > 0.9


def test_split_merge():
    data = np.zeros((20, 10), np.float32)
    data[:10], data[10:] = 10.0, 12.0
    image = Image(data, (1.0, 1.0))
    labels = np.ones((20, 10), int)
    labels[:, 5:] = 2  # two regions of the same mixed content: merged
    merged = split_merge(image, labels, merge_difference=1.0)
    assert np.unique(merged.array).tolist() == [1]
    split = split_merge(image, np.ones((20, 10), int), split_std=0.5)
    assert np.unique(split.array).tolist() == [1, 2]
    np.testing.assert_array_equal(split.array[:10] != split.array[10:], True)


@pytest.mark.integration
def test_fcm_and_region_growing_run_on_a_hippocampus_crop():
    from conftest import shared_dataset

    root = shared_dataset("Task04_Hippocampus")
    image = read_image(sorted((root / "imagesTr").glob("*.nii.gz"))[0])
    result = fuzzy_c_means(image, classes=3, spatial_weight=1.0)
    assert result.labels.same_geometry(image)
    assert set(np.unique(result.labels.array)) == {1, 2, 3}
    assert np.all(np.diff(result.centers) > 0)
    centre = tuple(n // 2 for n in image.shape)
    grown = region_grow(image, [centre], criterion="confidence", multiplier=1.5)
    assert grown.array[centre] == 1 and grown.array.sum() < grown.array.size
