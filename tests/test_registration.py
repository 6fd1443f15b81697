"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.io import Image, read_image, write_image
from medseg.io.files import from_sitk, to_sitk
from medseg.losses import LocalNCC
from medseg.registration.atlas import fuse_labels
from medseg.registration.classical import (
    read_transform,
    register,
    register_bspline,
    register_demons,
    register_linear,
    write_transform,
)
from medseg.registration.fields import (
    compose,
    field_to_transform,
    transform_to_field,
    warp_image,
    warp_labels,
)
from medseg.registration.learned import (
    RegistrationTrainConfig,
    VelocityUNet,
    build_registration_network,
    integrate_velocity,
    load_registration_model,
    register_learned,
    train_registration,
    warp,
)
from medseg.registration.quality import (
    deformation_quality,
    jacobian_determinant,
    jacobian_of_field,
    jacobian_statistics,
)
from medseg.serialization import to_jsonable, write_json_atomic


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth asymmetric image: a few Gaussian blobs of different sizes and brightness."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(6):
        c = [rng.uniform(0.25, 0.75) * s for s in shape]
        r = rng.uniform(0.06, 0.15) * min(shape)
        out += rng.uniform(50, 200) * np.exp(
            -sum((g - ci) ** 2 for g, ci in zip(grids, c)) / (2 * r * r)
        )
    return out.astype(np.float32)


def moved(fixed: Image, s: sitk.Transform) -> Image:
    """moving(y) = fixed(S(y)): the registration should find T = S^-1."""
    out = sitk.Resample(to_sitk(fixed), to_sitk(fixed), s, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return from_sitk(out)


def max_point_error(
    t: sitk.Transform, ref: sitk.Transform, image: Image, margin: float = 0.25
) -> float:
    """Largest distance between the two transforms' images of points in the central image region."""
    grids = np.meshgrid(
        *[np.linspace(margin * (s - 1), (1 - margin) * (s - 1), 5) for s in image.shape],
        indexing="ij",
    )
    pts = image.index_to_world(np.stack([g.ravel() for g in grids], -1))
    return max(
        float(np.linalg.norm(np.subtract(t.TransformPoint(tuple(p)), ref.TransformPoint(tuple(p)))))
        for p in pts
    )


# ----------------------------------------------------------------------------- classical


def test_rigid_2d_recovered_by_construction():
    fixed = Image(blobs((64, 72)), (1.0, 1.0))
    s = sitk.Euler2DTransform((31.5, 35.5), np.radians(8.0), (3.0, -2.0))
    moving = moved(fixed, s)
    result = register_linear(fixed, moving, method="rigid", metric="mse")
    assert max_point_error(result.transform, s.GetInverse(), fixed) < 0.1
    angle = np.degrees(sitk.Euler2DTransform(result.transform).GetAngle())
    assert abs(angle + 8.0) < 0.1  # T = S^-1 rotates the other way


def test_affine_3d_recovered_by_construction():
    fixed = Image(blobs((28, 30, 24), seed=1), (1.0, 1.2, 1.5))
    s = sitk.AffineTransform(3)
    s.SetCenter(tuple(fixed.index_to_world((np.array(fixed.shape) - 1) / 2)))
    s.SetMatrix((1.05, 0.04, 0.0, -0.03, 0.97, 0.02, 0.0, 0.05, 1.02))
    s.SetTranslation((1.5, -1.0, 2.0))
    moving = moved(fixed, s)
    result = register_linear(fixed, moving, method="affine", metric="ncc")
    assert max_point_error(result.transform, s.GetInverse(), fixed) < 0.25


def test_translation_mutual_information_with_inverted_contrast():
    a = blobs((64, 64), seed=3)
    fixed = Image(a, (1.0, 1.0))
    s = sitk.TranslationTransform(2, (2.5, -3.0))
    moving = moved(fixed, s)
    moving = moving.with_array(
        (moving.array.max() - moving.array).astype(np.float32)
    )  # other "modality"
    result = register_linear(fixed, moving, method="translation", metric="mattes")
    assert np.allclose(result.transform.GetParameters(), (-2.5, 3.0), atol=0.1)


def test_demons_and_bspline_improve_a_deformed_pair():
    fixed = Image(blobs((32, 32, 24), seed=4), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    coarse = rng.normal(0, 1.5, (3, 4, 4, 3))  # a smooth random deformation
    field = np.stack(
        [
            np.asarray(
                F.interpolate(
                    torch.from_numpy(c)[None, None],
                    size=fixed.shape,
                    mode="trilinear",
                    align_corners=True,
                )[0, 0]
            )
            for c in coarse
        ],
        -1,
    )
    moving = warp_image(fixed, fixed, field_to_transform(field, fixed))
    base = np.abs(moving.array - fixed.array).mean()
    affine = register_linear(fixed, moving, method="affine", metric="mse").transform
    for method in ("demons", "bspline"):
        if method == "demons":
            result = register_demons(
                fixed, moving, metric="mse", init=affine, iterations=(30, 30, 20)
            )
        else:
            result = register_bspline(
                fixed, moving, metric="mse", init=affine, iterations=15, grid_spacing_mm=8.0
            )
        err = np.abs(warp_image(moving, fixed, result.transform).array - fixed.array).mean()
        assert err < 0.6 * base, method
        stats, _ = deformation_quality(result.transform, fixed)
        assert stats["folding_percent"] < 0.5


def test_fixed_mask_is_used_and_empty_mask_is_refused():
    fixed = Image(blobs((48, 48), seed=5), (1.0, 1.0))
    moving = moved(fixed, sitk.TranslationTransform(2, (2.0, 1.0)))
    mask = fixed.with_array((fixed.array > fixed.array.mean()).astype(np.uint8))
    result = register_linear(fixed, moving, method="translation", metric="mse", fixed_mask=mask)
    assert np.allclose(result.transform.GetParameters(), (-2.0, -1.0), atol=0.1)
    with pytest.raises(MedsegError, match="mask is empty"):
        register_linear(fixed, moving, fixed_mask=fixed.with_array(np.zeros(fixed.shape, np.uint8)))


def test_bad_inputs_give_clear_errors():
    a2 = Image(blobs((32, 32)), (1.0, 1.0))
    a3 = Image(blobs((16, 16, 16)), (1.0, 1.0, 1.0))
    with pytest.raises(MedsegError, match="3D image cannot be registered to a 2D"):
        register(a2, a3)
    far = Image(a2.array, (1.0, 1.0), origin=(500.0, 500.0))
    with pytest.raises(MedsegError, match="does not overlap"):
        register(a2, far, init="none")
    # centred initialization brings the same pair together
    assert register(a2, far, method="translation", metric="mse").transform.GetParameters()[
        0
    ] == pytest.approx(500, abs=0.5)
    with pytest.raises(MedsegError, match="constant"):
        register(a2, a2.with_array(np.ones((32, 32), np.float32)))
    with pytest.raises(MedsegError, match="unknown method"):
        register(a2, a2, method="syn")


# ----------------------------------------------------------------------------- labels and files


def test_warped_labels_stay_integer_and_keep_the_label_set():
    labels = np.zeros((40, 40, 30), np.uint8)
    labels[8:20, 10:25, 5:15] = 1
    labels[22:32, 12:30, 12:25] = 2
    labels[5:9, 28:34, 20:26] = 7
    lab = Image(labels, (1.0, 1.0, 1.0))
    t = sitk.Euler3DTransform((19.5, 19.5, 14.5), 0.05, -0.04, 0.1, (1.3, -0.7, 0.4))
    for mode in ("nearest", "linear"):
        out = warp_labels(lab, lab, t, mode=mode)
        assert out.array.dtype == np.uint8
        assert set(np.unique(out.array)) == {0, 1, 2, 7}
        assert out.same_geometry(lab)
    with pytest.raises(MedsegError, match="non-integer"):
        warp_labels(lab.with_array(labels + 0.5), lab, t)


@pytest.mark.parametrize(
    "method,suffix", [("affine", ".tfm"), ("demons", ".h5"), ("bspline", ".h5")]
)
def test_written_transforms_reload_in_simpleitk_and_warp_the_same(tmp_path, method, suffix):
    fixed = Image(blobs((24, 24, 16), seed=6), (1.0, 1.0, 1.5))
    moving = moved(
        fixed, sitk.Euler3DTransform((11.5, 11.5, 11.25), 0.0, 0.0, 0.08, (1.0, 0.5, 0.0))
    )
    if method == "affine":
        result = register(fixed, moving, method=method, metric="mse")
    elif method == "demons":
        result = register_demons(fixed, moving, metric="mse", iterations=10)
    else:
        result = register_bspline(fixed, moving, metric="mse", iterations=5, grid_spacing_mm=10.0)
    path = write_transform(result.transform, tmp_path / f"t{suffix}")
    with pytest.raises(MedsegError, match="already exists"):
        write_transform(result.transform, path)
    loaded = sitk.ReadTransform(str(path))  # plain SimpleITK, as a Slicer/ITK user would
    ours = warp_image(moving, fixed, result.transform).array
    theirs = from_sitk(
        sitk.Resample(
            to_sitk(moving), to_sitk(fixed), loaded, sitk.sitkLinear, 0.0, sitk.sitkFloat32
        )
    ).array
    np.testing.assert_allclose(theirs, ours, atol=1e-3)
    if method == "demons":
        with pytest.raises(MedsegError, match="needs an .h5"):
            write_transform(result.transform, tmp_path / "t.tfm")
    assert read_transform(path).GetDimension() == 3


def test_compose_applies_the_last_transform_first():
    a = sitk.TranslationTransform(2, (1.0, 0.0))
    b = sitk.Euler2DTransform((0.0, 0.0), np.pi / 2, (0.0, 0.0))
    p = compose(a, b).TransformPoint((1.0, 0.0))  # a(b(p)) = a((0, 1)) = (1, 1)
    assert np.allclose(p, (1.0, 1.0))


# ----------------------------------------------------------------------------- quality


def test_jacobian_matches_simpleitk_and_known_scalings():
    grid = Image(np.zeros((20, 22, 18), np.float32), (1.0, 2.0, 1.5))
    scale = sitk.ScaleTransform(3, (1.1, 0.9, 1.2))
    jac = jacobian_determinant(scale, grid)
    assert np.allclose(jac.array, 1.1 * 0.9 * 1.2, atol=1e-5)
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.3, grid.shape + (3,))
    ours = jacobian_of_field(field, grid)
    f = sitk.GetImageFromArray(field.transpose(2, 1, 0, 3).copy(), isVector=True)
    f.SetSpacing(grid.spacing)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(f)).transpose(2, 1, 0)
    inner = (slice(1, -1),) * 3  # borders: one-sided differences differ by convention
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)
    stats = jacobian_statistics(np.array([-0.5, 0.0, 1.0, 2.0]))
    assert stats["folding_percent"] == 50.0
    assert stats["std_log_jacobian"] == pytest.approx(np.std(np.log([1.0, 2.0])))


def test_jacobian_handles_flipped_directions():
    flipped = Image(
        np.zeros((16, 16, 12), np.float32), (1.0, 1.0, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    )
    t = sitk.AffineTransform(3)
    t.SetMatrix((1.2, 0.1, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.8))
    assert np.allclose(jacobian_determinant(t, flipped).array, 1.2 * 0.8, atol=1e-5)


def test_affine_has_exact_inverse_consistency():
    grid = Image(np.zeros((12, 12), np.float32), (1.0, 1.0))
    t = sitk.Euler2DTransform((5.0, 5.0), 0.3, (1.0, 2.0))
    stats, _ = deformation_quality(t, grid)
    assert stats["inverse_consistency_max_mm"] < 1e-9
    assert stats["folding_percent"] == 0


# ----------------------------------------------------------------------------- learned pieces


def test_scaling_and_squaring_has_no_folding_where_the_plain_field_folds():
    torch.manual_seed(0)
    coarse = torch.randn(1, 3, 4, 4, 4) * 6.0
    v = F.interpolate(coarse, size=(32, 32, 32), mode="trilinear", align_corners=True)
    grid = Image(np.zeros((32, 32, 32), np.float32), (1.0, 1.0, 1.0))
    plain = jacobian_of_field(v[0].movedim(0, -1).double().numpy(), grid)
    assert (plain <= 0).mean() > 0.01  # the velocity itself, used as a displacement, folds
    disp = integrate_velocity(v, steps=7)
    jac = jacobian_of_field(disp[0].movedim(0, -1).double().numpy(), grid)
    assert (jac[2:-2, 2:-2, 2:-2] <= 0).sum() == 0
    inverse = integrate_velocity(-v, steps=7)
    roundtrip = inverse + warp(disp, inverse)  # disp o inverse should be the identity
    assert roundtrip[..., 4:-4, 4:-4, 4:-4].abs().mean() < 0.05


def test_warp_matches_a_known_translation():
    img = torch.from_numpy(blobs((20, 24, 16)))[None, None]
    disp = torch.zeros(1, 3, 20, 24, 16)
    disp[:, 0] = 2.0  # sample two voxels further along the first axis
    out = warp(img, disp)
    assert torch.allclose(out[0, 0, :-2], img[0, 0, 2:], atol=1e-4)


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


def test_network_starts_near_identity_and_checks_sizes():
    net = VelocityUNet(ndim=2, features=(8, 16, 16), decoder=(16, 16))
    x = torch.rand(1, 1, 32, 24)
    disp, v = net(x, x)
    assert disp.shape == (1, 2, 32, 24) and v.shape == (1, 2, 16, 12)
    assert disp.abs().max() < 1e-2
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 1, 30, 24), torch.rand(1, 1, 30, 24))


def test_train_resume_and_register_learned(phantom_dataset, tmp_path):
    config = RegistrationTrainConfig(
        features=(4, 8, 8),
        decoder=(8, 8),
        canvas_shape=(24, 24, 24),
        iterations_per_epoch=2,
        max_epochs=1,
        validation_pairs=1,
        num_threads=1,
    )
    out = tmp_path / "model"
    result = train_registration(phantom_dataset, out, config=config, show_progress=False)
    assert result.epochs == 1 and result.iterations == 2
    assert (out / "log.csv").exists() and (out / "weights_best.safetensors").exists()
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)  # the engine's state
    assert state["epoch"] == 1 and "rng" in state["task"]
    from dataclasses import replace

    again = train_registration(
        phantom_dataset, out, config=replace(config, max_epochs=2), show_progress=False
    )
    assert again.iterations == 4  # resumed from checkpoint_last.pt, one more epoch
    model = load_registration_model(out)
    assert load_registration_model(out / "weights_last.safetensors").ndim == 3
    spec = json.loads((out / "registration_model.json").read_text())
    images = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))
    f, m = read_image(images[0]), read_image(images[1])
    forward, inverse = register_learned(f, m, model, return_inverse=True)
    warped = warp_image(m, f, forward)
    assert warped.same_geometry(f) and spec["model"] == "voxelmorph"
    stats, _ = deformation_quality(forward, f, inverse=inverse)
    assert stats["folding_percent"] == 0.0
    assert stats["inverse_consistency_mean_mm"] < 0.5

    from medseg.cli.main import main

    reg_out = tmp_path / "reg"
    args = ["register", str(images[0]), str(images[1]), "-o", str(reg_out), "--method", "learned"]
    assert main(args) == 2  # no --model
    assert main([*args, "--model", str(out), "--no-report"]) == 0
    bf16 = load_registration_model(out, precision="bf16")
    d32 = transform_to_field(register_learned(f, m, model), f)
    d16 = transform_to_field(register_learned(f, m, bf16), f)
    assert np.abs(d16 - d32).max() < 0.05 + 0.05 * np.abs(d32).max()
    quality = json.loads((reg_out / "quality.json").read_text())
    assert quality["quality"]["folding_percent"] == 0.0
    assert sitk.ReadTransform(str(reg_out / "transform.h5")).GetDimension() == 3
    cli_model = tmp_path / "cli_model"
    train_args = [
        "train-registration",
        str(phantom_dataset),
        "-o",
        str(cli_model),
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "1",
        "--threads",
        "1",
    ]
    assert main(train_args) == 0
    assert json.loads((cli_model / "train_result.json").read_text())["iterations"] == 1


def test_a_registration_model_of_the_earlier_format_is_converted(tmp_path):
    """checkpoint_best.pt (a pickle) of an earlier version: read with weights_only=True,
    converted once to safetensors, same network."""
    config = RegistrationTrainConfig(features=(4, 8, 8), decoder=(8, 8), canvas_shape=(16, 16))
    torch.manual_seed(0)
    net = build_registration_network(config, 2)
    torch.save(
        {
            "model": net.state_dict(),
            "config": to_jsonable(config),
            "ndim": 2,
            "num_classes": 2,
            "epoch": 3,
        },
        tmp_path / "checkpoint_best.pt",
    )
    write_json_atomic(config, tmp_path / "registration_config.json")
    write_json_atomic({"model": "voxelmorph", "ndim": 2}, tmp_path / "registration_model.json")
    loaded = load_registration_model(tmp_path, device="cpu")
    assert (tmp_path / "weights_best.safetensors").exists()
    state = net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.network.state_dict().items())
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():  # (channels-last after loading: equal up to rounding)
        assert torch.allclose(loaded.network(x, x)[0], net.eval()(x, x)[0], atol=1e-6)
    with pytest.raises(MedsegError, match="no trained registration model"):
        load_registration_model(tmp_path / "missing", device="cpu")


# ----------------------------------------------------------------------------- atlases


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


# ----------------------------------------------------------------------------- CLI


def test_cli_register_and_atlas_segment(tmp_path, phantom_dataset):
    from medseg.cli.main import main

    fixed = Image(blobs((48, 40), seed=7), (1.0, 1.0))
    moving = moved(fixed, sitk.Euler2DTransform((23.5, 19.5), 0.1, (2.0, -1.0)))
    fl = fixed.with_array((fixed.array > 60).astype(np.uint8))
    ml = moving.with_array((moving.array > 60).astype(np.uint8))
    paths = {}
    for name, img in (("f", fixed), ("m", moving), ("fl", fl), ("ml", ml)):
        paths[name] = write_image(img, tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    args = [
        "register",
        str(paths["f"]),
        str(paths["m"]),
        "-o",
        str(out),
        "--method",
        "rigid",
        "--metric",
        "mse",
        "--labels",
        str(paths["ml"]),
        "--fixed-labels",
        str(paths["fl"]),
    ]
    assert main(args) == 0
    quality = json.loads((out / "quality.json").read_text())
    assert quality["dice_mean"] > 0.95
    for name in (
        "transform.tfm",
        "warped.nii.gz",
        "warped_labels.nii.gz",
        "report.html",
        "checkerboard.png",
    ):
        assert (out / name).exists(), name
    assert read_image(out / "warped_labels.nii.gz").array.dtype == np.uint8
    assert main(args) == 2  # refuses to overwrite
    assert main([*args, "--overwrite", "--method", "demons"]) == 0
    assert (out / "jacobian.nii.gz").exists() and (out / "transform.h5").exists()
    other = write_image(Image(blobs((16, 16, 16)), (1.0, 1.0, 1.0)), tmp_path / "v.nii.gz")
    assert main(["register", str(paths["f"]), str(other), "-o", str(tmp_path / "bad")]) == 2
    empty = write_image(
        fixed.with_array(np.zeros(fixed.shape, np.uint8)), tmp_path / "empty.nii.gz"
    )
    assert (
        main(
            [
                "register",
                str(paths["f"]),
                str(paths["m"]),
                "-o",
                str(tmp_path / "e"),
                "--fixed-mask",
                str(empty),
            ]
        )
        == 2
    )
    target = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))[0]
    seg = tmp_path / "seg.nii.gz"
    assert (
        main(
            [
                "atlas-segment",
                str(target),
                "--atlases",
                str(phantom_dataset),
                "-o",
                str(seg),
                "--method",
                "affine",
                "--max-atlases",
                "3",
            ]
        )
        == 0
    )
    ref = read_image(phantom_dataset / "labelsTr" / target.name.replace("_0000", "")).array
    pred = read_image(seg).array
    assert pred.shape == ref.shape
    assert 2 * np.sum((pred > 0) & (ref > 0)) / (np.sum(pred > 0) + np.sum(ref > 0)) > 0.5


def test_random_sampling_is_reproducible_with_the_same_seed():
    fixed = Image(blobs((24, 24, 20), seed=8), (1.0, 1.0, 1.0))
    moving = moved(fixed, sitk.TranslationTransform(3, (1.0, -1.5, 0.5)))
    runs = [
        register_linear(
            fixed, moving, method="affine", metric="mattes", sampling_fraction=0.2, seed=0
        )
        for _ in range(2)
    ]
    # same sample; only multi-threaded summation order may differ
    np.testing.assert_allclose(
        runs[0].transform.GetParameters(), runs[1].transform.GetParameters(), atol=1e-6
    )
