"""Channels onto channel 0's grid: resampling through headers or a given transform, and the
co-registered dataset folder (the registration itself: tests/registration/test_coregister.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from helpers.multimodal import anatomy, grid_points, t1_image, t2_image, write_two_channel_dataset

from medseg.io.check import check_dataset
from medseg.io.dataset import load_dataset
from medseg.io.files import read_image
from medseg.preprocessing.coregister import (
    Alignment,
    coregister_channels,
    coregister_dataset,
    misaligned_channels,
    read_coregistration,
    resample_onto,
    same_grid,
)


def contrast(a: np.ndarray) -> np.ndarray:  # the T2 contrast of helpers.multimodal.t2_image
    return 900 * np.exp(-1.5 * a) + 150 * a**2


def interior(image: np.ndarray, margin: int = 4) -> np.ndarray:
    return image[margin:-margin, margin:-margin, margin:-margin]


def test_resampling_through_the_headers_matches_the_analytic_image():
    t1, t2 = t1_image(), t2_image()  # aligned anatomy, different grids
    assert not same_grid(t1, t2) and misaligned_channels([t1, t2, t1]) == [1]
    moved = resample_onto(t2, t1)
    assert same_grid(moved, t1)
    expected = contrast(anatomy(grid_points(t1.shape, t1.spacing, t1.origin)))
    error = np.abs(interior(moved.array) - interior(expected)) / np.ptp(expected)
    assert error.mean() < 0.01


def test_a_given_transform_undoes_a_known_shift():
    shift = np.array([1.5, -1.0, 2.0])
    t1, t2 = t1_image(), t2_image(shift)  # T2(p) shows the anatomy at p + shift
    undo = sitk.TranslationTransform(3, tuple(-shift))  # T1 points -> T2 points
    moved = resample_onto(t2, t1, undo).array
    expected = contrast(anatomy(grid_points(t1.shape, t1.spacing, t1.origin)))
    assert (np.abs(interior(moved) - interior(expected)) / np.ptp(expected)).mean() < 0.01
    unaligned = resample_onto(t2, t1).array
    assert (np.abs(interior(unaligned) - interior(expected)) / np.ptp(expected)).mean() > 0.03


def test_channels_already_on_the_grid_are_kept_and_an_aligner_is_applied():
    t1 = t1_image()
    same, alignments = coregister_channels([t1, t1])
    assert same[1] is t1 and alignments[0] is None and alignments[1].method == "header"
    calls = []

    def align(fixed, moving):
        calls.append(moving.shape)
        return Alignment(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), "test")

    moved, alignments = coregister_channels([t1, t2_image()], align=align)
    assert calls == [(22, 22, 14)] and alignments[1].method == "test"
    assert same_grid(moved[1], t1)


def test_coregistered_dataset_is_a_clean_dataset_with_transforms(tmp_path: Path):
    raw = write_two_channel_dataset(tmp_path / "raw", shifts=[(0, 0, 0), (1, 0, 0)])
    out = coregister_dataset(load_dataset(raw), tmp_path / "out", show_progress=False)
    assert check_dataset(out).problems == ()
    spec = load_dataset(out)
    assert spec.channel_names == ("T1", "T2") and len(spec.cases) == 2
    assert json.loads((out / "dataset.json").read_text())["coregistered_from"] == str(raw)
    image = read_image(out / "imagesTr" / "case_001_0001.nii.gz")
    assert same_grid(image, read_image(raw / "imagesTr" / "case_001_0000.nii.gz"))
    record = read_coregistration(out, "case_001")
    assert record["channels"]["T2"]["was_on_grid"] is False
    assert (out / "transforms" / "case_001_0001.tfm").is_file()
    # a second run skips the finished cases
    (out / "imagesTr" / "case_000_0001.nii.gz").unlink()
    coregister_dataset(load_dataset(raw), tmp_path / "out", show_progress=False)
    assert not (out / "imagesTr" / "case_000_0001.nii.gz").exists()
