"""Registration on real images from ../shared/datasets: known transforms recovered, ITK ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_dataset

from medseg.io import read_image
from medseg.io.files import from_sitk, to_sitk
from medseg.registration.classical import linear_parameters, register_linear
from medseg.registration.fields import warp_labels

pytestmark = pytest.mark.integration


def _moved(image, s):
    """moving(y) = image(S(y)), so the registration should return S^-1."""
    return from_sitk(
        sitk.Resample(to_sitk(image), to_sitk(image), s, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    )


def _max_error(t, ref, image, margin=0.25):
    grids = np.meshgrid(
        *[np.linspace(margin * (s - 1), (1 - margin) * (s - 1), 4) for s in image.shape],
        indexing="ij",
    )
    pts = image.index_to_world(np.stack([g.ravel() for g in grids], -1))
    return max(
        float(np.linalg.norm(np.subtract(t.TransformPoint(tuple(p)), ref.TransformPoint(tuple(p)))))
        for p in pts
    )


def test_known_rigid_transform_on_a_real_2d_slice():
    root = shared_dataset("ITK_BrainSlices_registration")
    fixed = read_image(root / "images" / "BrainProtonDensitySliceBorder20.png")
    s = sitk.Euler2DTransform((110.0, 128.0), np.radians(-6.0), (4.0, -7.5))
    result = register_linear(fixed, _moved(fixed, s), method="rigid", metric="mse")
    assert _max_error(result.transform, s.GetInverse(), fixed) < 0.1


def test_known_affine_transform_on_a_real_3d_hippocampus_image():
    root = shared_dataset("Task04_Hippocampus")
    fixed = read_image(root / "imagesTr" / "hippocampus_004.nii.gz")
    labels = read_image(root / "labelsTr" / "hippocampus_004.nii.gz")
    s = sitk.AffineTransform(3)
    s.SetCenter(tuple(fixed.index_to_world((np.array(fixed.shape) - 1) / 2)))
    s.SetMatrix((1.04, 0.03, 0.0, -0.02, 0.97, 0.03, 0.01, 0.0, 1.03))
    s.SetTranslation((1.2, -0.8, 1.5))
    moving = _moved(fixed, s)
    result = register_linear(fixed, moving, method="affine", metric="mse", sampling_fraction=None)
    assert _max_error(result.transform, s.GetInverse(), fixed) < 0.3
    # the labels warped there and back keep their values and most of their voxels
    there = warp_labels(labels, fixed, s)
    back = warp_labels(there, fixed, result.transform)
    assert set(np.unique(back.array)) == set(np.unique(labels.array))
    assert back.array.dtype == labels.array.dtype
    assert np.mean(back.array[labels.array > 0] == labels.array[labels.array > 0]) > 0.85


def test_itk_ground_truth_translation_multimodal():
    root = shared_dataset("ITK_BrainSlices_registration")
    fixed = read_image(root / "images" / "BrainT1SliceBorder20.png")
    moving = read_image(root / "images" / "BrainProtonDensitySliceShifted13x17y.png")
    result = register_linear(fixed, moving, method="translation", metric="mattes")
    assert np.allclose(linear_parameters(result.transform)["translation"], (13.0, 17.0), atol=0.05)
