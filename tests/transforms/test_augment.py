"""Tests of the batched training augmentation (medseg.transforms.augment)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from medseg.transforms import (
    AugmentConfig,
    BatchAugmenter,
    centre_crop,
    spatial_matrix,
    spatial_transform,
)
from medseg.transforms import augment as aug

PROBABILITIES = (
    "rotation_probability",
    "scale_probability",
    "elastic_probability",
    "noise_probability",
    "blur_probability",
    "brightness_probability",
    "contrast_probability",
    "low_resolution_probability",
    "gamma_probability",
)
INTENSITY = PROBABILITIES[3:]
# everything off: the augmenter must reduce to a centre crop
IDENTITY = AugmentConfig(**{name: 0.0 for name in PROBABILITIES}, mirror_axes=())

# (input size, patch size): odd and even margins, so the centre convention is exercised
SIZES = {2: ((21, 18), (16, 13)), 3: ((13, 17, 15), (8, 10, 9))}


def make_batch(ndim: int, batch: int = 4, channels: int = 2, seed: int = 0, labels: int = 4):
    in_size, patch = SIZES[ndim]
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, channels, *in_size), generator=gen)
    label = torch.randint(0, labels, (batch, 1, *in_size), generator=gen, dtype=torch.uint8)
    return image, label, patch


def rotation(ndim: int, axis: int, degrees: float) -> torch.Tensor:
    angles = torch.zeros(1, 1 if ndim == 2 else 3, dtype=torch.float64)
    angles[0, axis] = degrees
    return angles


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_config_returns_exact_centre_crop(ndim):
    image, label, patch = make_batch(ndim)
    out_image, out_label = BatchAugmenter(IDENTITY, patch_size=patch, seed=1)(image, label)
    assert out_image.shape == (4, 2, *patch) and out_image.dtype == torch.float32
    assert out_label.shape == (4, 1, *patch) and out_label.dtype == torch.int64
    assert torch.equal(out_image, centre_crop(image, patch))
    assert torch.equal(out_label, centre_crop(label, patch).long())
    # the output is a copy, never a view of the caller's tensors
    out_image += 1
    assert torch.equal(image, make_batch(ndim)[0])


@pytest.mark.parametrize("ndim", [2, 3])
def test_disabled_config_is_centre_crop_even_with_probabilities_one(ndim):
    image, label, patch = make_batch(ndim)
    config = AugmentConfig(**{name: 1.0 for name in PROBABILITIES}, enabled=False)
    out_image, out_label = BatchAugmenter(config, patch_size=patch, seed=0)(image, label)
    assert torch.equal(out_image, centre_crop(image, patch))
    assert torch.equal(out_label, centre_crop(label, patch).long())


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_through_the_sampling_grid_matches_centre_crop(ndim):
    # rotation drawn for every sample but by 0 degrees: the grid_sample path with identity
    image, label, patch = make_batch(ndim)
    config = replace(IDENTITY, rotation_probability=1.0, rotation_degrees=0.0)
    out_image, out_label = BatchAugmenter(config, patch_size=patch, seed=0)(image, label)
    torch.testing.assert_close(out_image, centre_crop(image, patch), atol=1e-4, rtol=0)
    assert torch.equal(out_label, centre_crop(label, patch).long())


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("field", PROBABILITIES)
def test_each_transform_keeps_labels_integer_and_from_the_input_set(ndim, field):
    image, label, patch = make_batch(ndim, labels=3)
    label[label == 2] = 7  # values {0, 1, 7}: interpolated labels would show up as 2..6
    config = replace(IDENTITY, **{field: 1.0}, elastic_magnitude=0.1)
    out_image, out_label = BatchAugmenter(config, patch_size=patch, seed=3)(image, label)
    assert out_label.dtype == torch.int64 and out_label.shape == (4, 1, *patch)
    assert set(out_label.unique().tolist()) <= {0, 1, 7}
    assert out_image.dtype == torch.float32 and out_image.shape == (4, 2, *patch)
    assert torch.isfinite(out_image).all()
    crop = centre_crop(image, patch)
    if field in INTENSITY:
        # intensity transforms never touch the label, and they do change the image
        assert torch.equal(out_label, centre_crop(label, patch).long())
        assert not torch.allclose(out_image, crop)
    else:
        assert not torch.equal(out_label, centre_crop(label, patch).long())


@pytest.mark.parametrize("size", [10, 11])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotation_by_90_degrees_matches_rot90_in_3d(size, axis):
    gen = torch.Generator().manual_seed(axis)
    label = torch.randint(0, 5, (1, 1, size, size, size), generator=gen)  # asymmetric
    image = torch.randn((1, 1, size, size, size), generator=gen)
    plane = [(3, 4), (2, 4), (2, 3)][axis]  # rotated tensor dims for each spatial axis
    matrix = spatial_matrix(rotation(3, axis, 90.0))
    out_image, out_label = spatial_transform(image, label, matrix, (size,) * 3)
    assert torch.equal(out_label, torch.rot90(label, 1, dims=plane))
    torch.testing.assert_close(out_image, torch.rot90(image, 1, dims=plane), atol=1e-4, rtol=0)
    # the opposite angle is the opposite rotation
    _, back = spatial_transform(image, label, spatial_matrix(rotation(3, axis, -90.0)), (size,) * 3)
    assert torch.equal(back, torch.rot90(label, -1, dims=plane))


def test_rotation_by_90_degrees_matches_rot90_in_2d_with_a_margin():
    gen = torch.Generator().manual_seed(5)
    label = torch.randint(0, 5, (2, 1, 14, 14), generator=gen)
    image = torch.randn((2, 3, 14, 14), generator=gen)
    matrix = spatial_matrix(torch.full((2, 1), 90.0))
    out_image, out_label = spatial_transform(image, label, matrix, (10, 10))
    # the centre crop of the rotated input (square input, centred crop)
    assert torch.equal(out_label, centre_crop(torch.rot90(label, 1, dims=(2, 3)), (10, 10)))
    expected = centre_crop(torch.rot90(image, 1, dims=(2, 3)), (10, 10))
    torch.testing.assert_close(out_image, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("zoom", "expected"), [(2.0, 8.0), (0.5, 1.0 / 8.0)])
def test_scale_is_a_zoom_volume_changes_by_scale_cubed(zoom, expected):
    # convention: scale s > 1 enlarges the content, volumes are multiplied by s ** 3
    size, radius = 41, 8.0
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    dist = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    label = (dist <= radius**2).long()[None, None]
    image = label.float()
    _, out = spatial_transform(image, label, spatial_matrix(torch.zeros(1, 3), zoom), (size,) * 3)
    ratio = out.sum().item() / label.sum().item()
    assert ratio == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("through_grid", [False, True])
def test_mirroring_flips_image_and_label_together(ndim, through_grid):
    image, label, patch = make_batch(ndim, batch=16, channels=1, labels=2)
    config = replace(IDENTITY, mirror_axes=(0, 1, 2))  # axis 2 is ignored in 2D
    if through_grid:  # mirroring folded into the sampling matrix
        config = replace(config, rotation_probability=1.0, rotation_degrees=0.0)
    out_image, out_label = BatchAugmenter(config, patch_size=patch, seed=7)(image, label)
    crop_image, crop_label = centre_crop(image, patch), centre_crop(label, patch).long()
    combos = [
        tuple(a + 2 for a in range(ndim) if mask >> a & 1) for mask in range(2**ndim)
    ]  # every subset of spatial axes, as tensor dims
    seen = set()
    for i in range(16):
        matches = [d for d in combos if torch.equal(out_label[i], crop_label[i : i + 1].flip(d)[0])]
        assert len(matches) == 1  # a random label pattern identifies the flip
        dims = matches[0]
        seen.add(dims)
        expected = crop_image[i : i + 1].flip(dims)[0]
        # the foreground voxels moved to the flipped positions carry the flipped image values
        fg = out_label[i, 0] == 1
        if through_grid:
            torch.testing.assert_close(out_image[i, 0][fg], expected[0][fg], atol=1e-4, rtol=0)
        else:
            assert torch.equal(out_image[i], expected)
    assert len(seen) >= 3  # flipped and unflipped samples both occur


@pytest.mark.parametrize("ndim", [2, 3])
def test_intensity_transforms_change_only_the_image(ndim):
    image, label, patch = make_batch(ndim, batch=6)
    config = replace(IDENTITY, **{name: 1.0 for name in INTENSITY})
    out_image, out_label = BatchAugmenter(config, patch_size=patch, seed=2)(image, label)
    assert torch.equal(out_label, centre_crop(label, patch).long())
    assert torch.isfinite(out_image).all()
    assert not torch.allclose(out_image, centre_crop(image, patch))


def test_contrast_keeps_channel_range_and_gamma_keeps_mean_and_std():
    image, label, patch = make_batch(3, batch=4)
    crop = centre_crop(image, patch)
    dims = (2, 3, 4)
    contrast = replace(IDENTITY, contrast_probability=1.0)
    out, _ = BatchAugmenter(contrast, patch_size=patch, seed=0)(image, label)
    assert (out >= crop.amin(dims, keepdim=True) - 1e-6).all()
    assert (out <= crop.amax(dims, keepdim=True) + 1e-6).all()
    gamma = replace(IDENTITY, gamma_probability=1.0)
    out, _ = BatchAugmenter(gamma, patch_size=patch, seed=0)(image, label)
    torch.testing.assert_close(out.mean(dims), crop.mean(dims), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dims), crop.std(dims), atol=1e-3, rtol=1e-3)


def test_blur_keeps_constants_and_smooths_noise():
    const = torch.full((2, 1, 9, 12, 10), 3.5)
    sigma = torch.tensor([0.5, 1.0], dtype=torch.float64)
    mats = [aug._blur_matrix(sigma, n) for n in const.shape[2:]]
    torch.testing.assert_close(aug._apply_separable(const, mats), const)
    noise = torch.randn(2, 1, 9, 12, 10, generator=torch.Generator().manual_seed(0))
    blurred = aug._apply_separable(noise, mats)
    assert blurred[1].std() < blurred[0].std() < noise.std()


@pytest.mark.parametrize("size", [40, 56, 17])
def test_low_resolution_matrix_equals_two_interpolations(size):
    factors = torch.tensor([1.0, 1.25, 40 / 12, 1.9, 2.0, 1.51], dtype=torch.float64)
    factors = factors.clamp(max=2.0)
    x = torch.randn(len(factors), 1, size, 6)
    mats = aug._low_resolution_matrix(factors, size)
    got = torch.einsum("nij,njw->niw", mats, x[:, 0])
    for i, f in enumerate(factors.tolist()):
        small = max(1, round(size / f))
        low = F.interpolate(x[i : i + 1], size=(small, 6), mode="nearest-exact")
        ref = F.interpolate(low, size=(size, 6), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got[i], ref[0, 0], atol=1e-5, rtol=0)


def test_slab_sampling_equals_torch_3d_grid_sample():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((3, 2, 12, 14, 13), generator=gen)
    label = torch.randint(0, 4, (3, 1, 12, 14, 13), generator=gen)
    patch = (10, 11, 12)
    angles = torch.rand((3, 3), generator=gen, dtype=torch.float64) * 80 - 40
    matrix = spatial_matrix(angles, torch.tensor([0.7, 1.0, 1.4], dtype=torch.float64))
    displacement = torch.rand((3, 3, 4, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1
    norm = [2.0 / (n - 1) for n in image.shape[2:]]
    coords = aug._coordinates(matrix, image.shape[2:], patch, image.device, norm, [-1.0] * 3)
    coords = aug._add_displacement(coords, displacement, patch, norm)
    grid = torch.stack(coords[::-1], dim=-1)
    ref_image = F.grid_sample(image, grid, mode="bilinear", align_corners=True)
    ref_label = F.grid_sample(label.float(), grid, mode="nearest", align_corners=True).long()
    out_image, out_label = spatial_transform(image, label, matrix, patch, displacement=displacement)
    torch.testing.assert_close(out_image, ref_image, atol=1e-4, rtol=0)
    # float32 rounding of the row coordinate may flip a nearest-neighbour tie, very rarely
    assert (out_label != ref_label).float().mean() < 1e-3


def test_same_seed_same_output_different_seed_different():
    image, label, patch = make_batch(3, batch=6)
    config = AugmentConfig(**{name: 0.5 for name in PROBABILITIES})
    first = BatchAugmenter(config, patch_size=patch, seed=11)(image, label)
    second = BatchAugmenter(config, patch_size=patch, seed=11)(image, label)
    other = BatchAugmenter(config, patch_size=patch, seed=12)(image, label)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    # successive calls draw new parameters
    augmenter = BatchAugmenter(config, patch_size=patch, seed=11)
    assert not torch.equal(augmenter(image, label)[0], augmenter(image, label)[0])


def test_config_json_round_trip_and_validation():
    config = AugmentConfig(scale_range=(0.8, 1.2), mirror_axes=(0, 2), elastic_probability=0.1)
    restored = AugmentConfig(**json.loads(json.dumps(asdict(config))))
    assert restored == config and isinstance(restored.scale_range, tuple)
    with pytest.raises(ValueError):
        AugmentConfig(noise_probability=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(scale_range=(1.2, 0.8))


def test_bad_inputs_are_rejected():
    image, label, patch = make_batch(3)
    augmenter = BatchAugmenter(AugmentConfig(), patch_size=patch, seed=0)
    with pytest.raises(ValueError, match="integer"):
        augmenter(image, label.float())
    with pytest.raises(ValueError, match="smaller"):
        augmenter(image[..., :5], label[..., :5])
    with pytest.raises(ValueError):
        BatchAugmenter(AugmentConfig(), patch_size=(4,), seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    image, label, patch = make_batch(3, batch=6)
    config = AugmentConfig(**{name: 0.5 for name in PROBABILITIES})
    cpu = BatchAugmenter(config, patch_size=patch, seed=4)(image, label)
    gpu = BatchAugmenter(config, patch_size=patch, seed=4)(image.cuda(), label.cuda())
    assert gpu[0].is_cuda and gpu[1].is_cuda
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-3, rtol=1e-3)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 1e-3


def test_speed_3d_batch_is_reported():
    """Rough timing, printed (run with -s), not asserted: the machine is shared.

    Timed on one thread: on a loaded 2-core machine two torch threads mostly wait for each
    other, which says nothing about the augmentation itself.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time_3d_batch()
    finally:
        torch.set_num_threads(threads)


def _time_3d_batch() -> None:
    image = torch.randn(8, 1, 48, 64, 48)
    label = torch.randint(0, 3, (8, 1, 48, 64, 48))
    everything = AugmentConfig(**{name: 1.0 for name in PROBABILITIES})
    no_spatial = AugmentConfig(rotation_probability=0.0, scale_probability=0.0)
    for name, config in [
        ("default", AugmentConfig()),
        ("everything drawn", everything),
        ("no spatial", no_spatial),
    ]:
        augmenter = BatchAugmenter(config, patch_size=(40, 56, 40), seed=0)
        augmenter(image, label)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = augmenter(image, label)
            times.append(time.perf_counter() - start)
        assert out[0].shape == (8, 1, 40, 56, 40)
        print(f"augment (8,1,48,64,48)->(40,56,40), 1 thread, {name}: {1000 * min(times):.1f} ms")
