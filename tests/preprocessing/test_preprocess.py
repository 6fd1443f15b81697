"""Cropping, normalization, resampling, the cache, and putting predictions back in the original geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.inference.predictor import restore_geometry
from medseg.io import Image
from medseg.io.dataset import load_dataset
from medseg.planning.plan import ChannelNormalization, NetworkPlan, Plan
from medseg.preprocessing.preprocess import (
    normalize,
    preprocess_dataset,
    preprocess_image,
    preprocessed_folder,
    resample_labels,
)
from medseg.transforms.cropping import crop, nonzero_bbox, pad_to_shape


def make_plan(spacing=(1.0, 1.0, 1.0), scheme="zscore", **kw) -> Plan:
    ndim = len(spacing)
    return Plan(
        dataset_name="t",
        ndim=ndim,
        configuration=f"{ndim}d",
        channel_names=("MR",),
        labels=((0, "bg"), (1, "a"), (2, "b")),
        target_spacing=spacing,
        normalization=(ChannelNormalization(scheme, -100, 100, 10, 20),),
        patch_size=(16,) * ndim,
        batch_size=2,
        network=NetworkPlan(),
        median_shape=(16,) * ndim,
        **kw,
    )


def test_nonzero_bbox_and_crop():
    a = np.zeros((2, 10, 12, 8))
    a[0, 2:5, 3:4, 1:7] = 1
    a[1, 6, 11, 0] = 2
    box = nonzero_bbox(a)
    assert box == ((2, 7), (3, 12), (0, 7))
    assert crop(a, box).shape == (2, 5, 9, 7)
    assert nonzero_bbox(np.zeros((1, 3, 4))) == ((0, 3), (0, 4))


def test_pad_to_shape():
    a = np.ones((3, 4))
    padded, where = pad_to_shape(a, (5, 4))
    assert padded.shape == (5, 4) and where == ((1, 4), (0, 4)) and padded.sum() == 12


def test_zscore_and_ct_normalization():
    rng = np.random.default_rng(0)
    data = rng.normal(50, 7, (1, 10, 10, 10)).astype(np.float32)
    z = normalize(data.copy(), make_plan())
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    ct = normalize(np.array([[[-1000.0, 0.0, 1000.0]]], dtype=np.float32), make_plan(scheme="ct"))
    assert ct.ravel().tolist() == pytest.approx([(-100 - 10) / 20, (0 - 10) / 20, (100 - 10) / 20])


def test_label_resampling_by_construction():
    # Blocks aligned to pixel pairs: halving the grid keeps each pair's class exactly.
    label = np.zeros((20, 20), dtype=np.uint8)
    label[4:14, 4:14] = 1
    label[8:12, 8:12] = 2
    for method in ("nearest", "onehot_linear"):
        out = resample_labels(label, (10, 10), method=method)
        assert out.shape == (10, 10) and out.dtype == label.dtype
        assert (out == 2).sum() == 4 and (out == 1).sum() == 21
        assert (out[4:6, 4:6] == 2).all()


def test_preprocess_then_restore_returns_the_label_in_the_original_geometry():
    """One-hot 'probabilities' of a label go through crop + resample and come back exactly."""
    label = np.zeros((30, 24, 18), dtype=np.uint8)
    label[6:20, 5:15, 4:12] = 1
    label[10:14, 8:12, 6:10] = 2
    image = np.zeros(label.shape, dtype=np.float32)
    image[3:28, 2:22, 1:17] = 5 + label[3:28, 2:22, 1:17]  # zero border: cropped away
    img = Image(image, (1.0, 1.0, 2.0), (10.0, -5.0, 3.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))
    plan = make_plan(spacing=(1.0, 1.0, 1.0))
    data, geometry = preprocess_image([img], plan)
    assert geometry.bbox == ((3, 28), (2, 22), (1, 17))
    assert data.shape == (1, 25, 20, 32)  # z resampled from 2 mm to 1 mm
    lab_small = resample_labels(crop(label, geometry.bbox), geometry.resampled_shape)
    probs = (
        torch.nn.functional.one_hot(torch.from_numpy(lab_small.astype(np.int64)), 3)
        .movedim(-1, 0)
        .float()
    )
    restored = restore_geometry(probs, geometry)
    assert restored.shape == label.shape
    assert np.array_equal(restored, label)


def test_preprocess_dataset_caches(phantom_dataset, tmp_path):
    spec = load_dataset(phantom_dataset)
    plan = make_plan(spacing=(1.5, 1.5, 2.0))
    out = preprocess_dataset(spec, plan, tmp_path, num_workers=1, show_progress=False)
    assert out == preprocessed_folder(tmp_path, plan)
    files = sorted(out.glob("*_data.npy"))
    assert len(files) == len(spec.cases)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    preprocess_dataset(spec, plan, tmp_path, num_workers=1, show_progress=False)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # second run skipped the work
    other = preprocess_dataset(
        spec, make_plan(spacing=(3.0, 3.0, 4.0)), tmp_path, num_workers=2, show_progress=False
    )
    assert other != out and np.load(sorted(other.glob("*_data.npy"))[0]).shape[1:] == (12, 12, 10)


def test_plan_filters_run_before_normalization_and_change_the_cache(tmp_path):
    from medseg.planning.plan import read_plan
    from medseg.preprocessing.preprocess import plan_fingerprint, preprocess_image
    from medseg.serialization import write_json_atomic

    rng = np.random.default_rng(0)
    noisy = Image(rng.normal(100.0, 10.0, (24, 20, 12)).astype(np.float32), spacing=(1, 1, 2))
    plain = make_plan(spacing=(1.0, 1.0, 2.0))
    smoothed = make_plan(spacing=(1.0, 1.0, 2.0), filters=({"name": "gaussian", "sigma_mm": 2},))
    raw, _ = preprocess_image([noisy], plain)
    filtered, _ = preprocess_image([noisy], smoothed)
    # z-score keeps unit spread; smoothing first makes the interior less rough
    assert (
        np.abs(np.diff(filtered[0], axis=0)).mean() < 0.5 * np.abs(np.diff(raw[0], axis=0)).mean()
    )
    assert plan_fingerprint(plain) != plan_fingerprint(smoothed)
    # the plan JSON round trip keeps the steps, and unknown filters are refused on reading
    write_json_atomic(smoothed, tmp_path / "plan.json")
    assert read_plan(tmp_path).filters == smoothed.filters
    write_json_atomic(make_plan(filters=({"name": "sharpen"},)), tmp_path / "bad" / "plan.json")
    with pytest.raises(MedsegError, match="sharpen"):
        read_plan(tmp_path / "bad")
