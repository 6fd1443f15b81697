"""Fingerprint and plan: values on the shared datasets, rules on synthetic fingerprints, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_dataset

from medseg.io import Image, write_image
from medseg.io.dataset import load_dataset
from medseg.planning import ChannelStats, Fingerprint, Plan, compute_fingerprint, make_plan
from medseg.planning.plan import choose_target_spacing
from medseg.preprocessing.preprocess import preprocess_image
from medseg.serialization import from_jsonable, to_jsonable


def synthetic_fingerprint(spacings, shapes, *, ct: bool = False) -> Fingerprint:
    n = len(spacings)
    return Fingerprint(
        dataset_name="synthetic",
        ndim=len(spacings[0]),
        channel_names=("CT" if ct else "MRI",),
        is_ct=(ct,),
        labels=((0, "background"), (1, "a")),
        num_cases=n,
        spacings=tuple(tuple(s) for s in spacings),
        shapes=tuple(tuple(s) for s in shapes),
        cropped_shapes=tuple(tuple(s) for s in shapes),
        crop_volume_ratio=1.0,
        foreground_intensities=(ChannelStats(10.0, 5.0, 9.0, -100.0, 300.0, -1000.0, 2000.0),),
        class_voxel_fraction=(0.9, 0.1),
        class_case_fraction=(1.0, 1.0),
    )


def test_anisotropy_rule_takes_10th_percentile_of_the_coarse_axis():
    spacings = [(0.8, 0.8, z) for z in (5.0, 5.0, 5.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 2.5)]
    shapes = [(512, 512, 40)] * len(spacings)
    target = choose_target_spacing(synthetic_fingerprint(spacings, shapes))
    assert target[:2] == (0.8, 0.8)
    assert target[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))


def test_isotropic_data_keeps_median_spacing():
    spacings = [(1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (0.9, 0.9, 0.9)]
    assert choose_target_spacing(synthetic_fingerprint(spacings, [(50, 50, 50)] * 3)) == (
        1.0,
        1.0,
        1.0,
    )


def test_cpu_plan_coarsens_large_images_and_gpu_plan_does_not():
    fp = synthetic_fingerprint([(0.5, 0.5, 0.5)] * 3, [(300, 300, 150)] * 3, ct=True)
    cpu, gpu = make_plan(fp, gpu=False), make_plan(fp, gpu=True)
    assert np.prod(cpu.median_shape) <= 96**3 * 1.01
    assert cpu.target_spacing[0] > 0.5 and gpu.target_spacing == (0.5, 0.5, 0.5)
    assert cpu.notes and "CPU budget" in cpu.notes[0]
    assert np.prod(gpu.patch_size) > np.prod(cpu.patch_size)
    for plan in (cpu, gpu):
        divisor = np.prod(np.array(plan.network.strides), axis=0)
        assert all(p % d == 0 for p, d in zip(plan.patch_size, divisor))
        assert (
            len(plan.network.features)
            == len(plan.network.strides)
            == len(plan.network.kernel_sizes)
        )
    assert cpu.normalization[0].scheme == "ct"
    assert (cpu.normalization[0].clip_low, cpu.normalization[0].clip_high) == (-100.0, 300.0)


def test_plan_json_round_trip_and_hand_edit():
    plan = make_plan(synthetic_fingerprint([(1.0, 1.0)] * 4, [(120, 100)] * 4))
    data = json.loads(json.dumps(to_jsonable(plan)))
    assert from_jsonable(Plan, data) == plan
    data["batch_size"] = 3
    data["patch_size"] = [64, 64]
    edited = from_jsonable(Plan, data)
    assert edited.batch_size == 3 and edited.patch_size == (64, 64)
    data["not_a_field"] = 1
    with pytest.raises(ValueError, match="not_a_field"):
        from_jsonable(Plan, data)


@pytest.mark.integration
def test_hippocampus_plan():
    spec = load_dataset(shared_dataset("Task04_Hippocampus"))
    fp = compute_fingerprint(spec, show_progress=False)
    assert fp.num_cases == 208 and fp.ndim == 3
    assert fp.median_spacing == (1.0, 1.0, 1.0)
    assert 0.02 < fp.class_voxel_fraction[1] < 0.04 and 0.02 < fp.class_voxel_fraction[2] < 0.04
    plan = make_plan(fp, gpu=False)
    assert plan.configuration == "3d"
    assert plan.target_spacing == (1.0, 1.0, 1.0)
    assert plan.patch_size == (40, 56, 40)  # nnU-Net's 3d_fullres patch for this dataset (x, y, z)
    assert plan.normalization[0].scheme == "zscore"
    assert plan.num_classes == 3
    assert plan.network.strides[0] == (1, 1, 1) and len(plan.network.strides) == 4


@pytest.mark.integration
def test_hc18_plan():
    spec = load_dataset(shared_dataset("HC18_fetal_head_US"))
    assert spec.layout == "plain2d" and spec.binary_masks_255
    fp = compute_fingerprint(spec, show_progress=False)
    assert fp.ndim == 2 and fp.num_cases == 80
    assert (800, 542) in fp.shapes
    cpu = make_plan(fp, gpu=False)
    assert cpu.configuration == "2d" and len(cpu.patch_size) == 2
    assert (
        cpu.target_spacing[0] == cpu.target_spacing[1] > 2.0
    )  # 800x540 pixels coarsened for a CPU
    assert cpu.patch_size[0] >= cpu.median_shape[0] * 0.9  # the patch covers nearly the whole image
    gpu = make_plan(fp, gpu=True)
    assert gpu.target_spacing == (1.0, 1.0)


@pytest.mark.integration
def test_totalsegmentator_ct_plan():
    spec = load_dataset(shared_dataset("TotalSegmentator_example_CT"))
    fp = compute_fingerprint(spec, show_progress=False)
    plan = make_plan(fp, gpu=False)
    assert plan.target_spacing == (3.0, 3.0, 3.0)
    assert plan.num_classes == 118
    norm = plan.normalization[0]
    assert norm.scheme == "ct"
    assert -1100 < norm.clip_low < -900 and 400 < norm.clip_high < 800
    assert np.prod(plan.patch_size) <= 64**3


def test_per_channel_normalization_ct_clip_zscore_and_mr_zscore(tmp_path):
    """A CT channel gets clip to its foreground 0.5-99.5 percentiles + dataset z-score, an MR
    channel a per-image z-score (issue 22); the values come from numpy on the same voxels."""
    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    cases = []
    for i in range(2):
        label = np.zeros(shape, np.uint8)
        label[3:9, 2:8, 2:6] = 1
        ct = np.where(label > 0, rng.normal(40, 30, shape), -1000 + rng.normal(0, 5, shape))
        ct[4, 4, 3] = 3000  # a metal voxel inside the foreground: clipped
        mr = rng.gamma(2.0, 100.0, shape) + 300.0 * label
        for c, array in enumerate((ct, mr)):
            write_image(
                Image(array.astype(np.float32), (1.0, 1.0, 2.0)),
                tmp_path / "imagesTr" / f"case_{i}_{c:04d}.nii.gz",
            )
        write_image(Image(label, (1.0, 1.0, 2.0)), tmp_path / "labelsTr" / f"case_{i}.nii.gz")
        cases.append((ct.astype(np.float32), mr.astype(np.float32), label))
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT", "1": "T2"},
                "labels": {"background": 0, "organ": 1},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    spec = load_dataset(tmp_path)
    assert spec.is_ct == (True, False)
    plan = make_plan(compute_fingerprint(spec, num_workers=1, show_progress=False))
    ct_norm, mr_norm = plan.normalization
    assert (ct_norm.scheme, mr_norm.scheme) == ("ct", "zscore")
    foreground = np.concatenate([ct[label > 0] for ct, _, label in cases])
    low, high = np.percentile(foreground, [0.5, 99.5])
    assert ct_norm.clip_low == pytest.approx(low, rel=1e-5)
    assert ct_norm.clip_high == pytest.approx(high, rel=1e-5)
    assert ct_norm.mean == pytest.approx(foreground.mean(), rel=1e-5)
    assert ct_norm.std == pytest.approx(foreground.std(), rel=1e-5)
    ct, mr, _ = cases[0]
    data, _ = preprocess_image(
        [Image(ct, (1.0, 1.0, 2.0)), Image(mr, (1.0, 1.0, 2.0))],
        Plan(**{**plan.__dict__, "target_spacing": (1.0, 1.0, 2.0)}),
    )
    expected_ct = (np.clip(ct, ct_norm.clip_low, ct_norm.clip_high) - ct_norm.mean) / ct_norm.std
    np.testing.assert_allclose(data[0], expected_ct, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data[1], (mr - mr.mean()) / mr.std(), rtol=1e-4, atol=1e-4)
