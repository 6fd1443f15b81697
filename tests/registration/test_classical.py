"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from helpers.registration import blobs, moved

from medseg.errors import MedsegError
from medseg.io import Image
from medseg.io.files import from_sitk, to_sitk
from medseg.registration.classical import (
    read_transform,
    register,
    register_bspline,
    register_demons,
    register_linear,
    write_transform,
)
from medseg.registration.fields import (
    field_to_transform,
    warp_image,
    warp_labels,
)
from medseg.registration.quality import (
    deformation_quality,
)


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
