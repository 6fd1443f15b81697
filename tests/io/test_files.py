"""Image files in and out: exact round trips, the LPS/RAS axis convention, DICOM, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io import Image, read_image, write_image

DATASETS = Path(__file__).parents[2] / ".." / "shared" / "datasets"
CT = DATASETS / "TotalSegmentator_example_CT" / "imagesTr" / "example_ct_sm.nii.gz"
MR = DATASETS / "TotalSegmentator_example_MR" / "imagesTr" / "example_mr_sm.nii.gz"
HIPPO = DATASETS / "Task04_Hippocampus" / "imagesTr" / "hippocampus_004.nii.gz"
HIPPO_LABEL = DATASETS / "Task04_Hippocampus" / "labelsTr" / "hippocampus_004.nii.gz"
DICOM = DATASETS / "TotalSegmentator_example_CT" / "extras" / "example_ct_dicom"

needs_datasets = pytest.mark.skipif(
    not DATASETS.is_dir(), reason=f"shared datasets not found at {DATASETS.resolve()}"
)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation_3d() -> np.ndarray:
    """An oblique rotation (no axis aligned with the world axes)."""
    a, b, c = np.radians([30.0, -20.0, 10.0])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def rotation_2d(angle: float = 0.4) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def oblique_3d(dtype: type) -> Image:
    rng = np.random.default_rng(0)
    values = (
        rng.normal(0, 300, (7, 6, 5))
        if np.dtype(dtype).kind != "u"
        else rng.integers(0, 250, (7, 6, 5))
    )
    return Image(
        np.asarray(values).astype(dtype),
        spacing=(0.7, 1.3, 2.5),
        origin=(-12.3, 30.7, 101.1),
        direction=tuple(rotation_3d().ravel()),
    )


def assert_same_geometry(a: Image, b: Image, *, rtol: float, atol: float) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=rtol, atol=atol)


# NIfTI stores geometry as float32: ~1e-6 relative; NRRD and MHA store it as text, exactly.
TOLERANCE = {".nii.gz": 1e-6, ".nii": 1e-6, ".nrrd": 1e-12, ".mha": 1e-12}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_round_trip_3d_oblique(tmp_path: Path, suffix: str, dtype: type) -> None:
    image = oblique_3d(dtype)
    path = write_image(image, tmp_path / f"image{suffix}")
    back = read_image(path)
    assert back.array.dtype == image.array.dtype
    assert back.shape == (7, 6, 5)
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image, rtol=TOLERANCE[suffix], atol=TOLERANCE[suffix])
    # the direction really is oblique: no axis is aligned with a world axis
    assert np.all(np.abs(back.direction_matrix) > 0.1)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_round_trip_2d_oblique(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    image = Image(
        rng.integers(0, 60000, (9, 7)).astype(np.uint16),
        spacing=(0.5, 0.3),
        origin=(3.5, -2.25),
        direction=tuple(rotation_2d().ravel()),
    )
    back = read_image(write_image(image, tmp_path / f"slice{suffix}"))
    assert back.ndim == 2
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image, rtol=TOLERANCE[suffix], atol=TOLERANCE[suffix])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip_png(tmp_path: Path, dtype: type) -> None:
    """PNG keeps pixels, type and spacing (pHYs); it has no origin or direction to keep."""
    rng = np.random.default_rng(2)
    high = np.iinfo(dtype).max
    array = rng.integers(0, high, (11, 8)).astype(dtype)
    array[0, 0] = high  # the full range, so uint16 is not narrowed to uint8
    image = Image(array, spacing=(0.5, 0.25))
    back = read_image(write_image(image, tmp_path / "slice.png"))
    assert back.shape == (11, 8)
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.spacing, (0.5, 0.25), rtol=1e-6)
    assert back.origin == (0.0, 0.0)
    assert back.direction == (1.0, 0.0, 0.0, 1.0)


@needs_datasets
@pytest.mark.integration
@pytest.mark.parametrize(
    "path", [CT, MR, HIPPO, HIPPO_LABEL], ids=["ct", "mr", "hippocampus", "hippocampus-label"]
)
def test_round_trip_real_files(tmp_path: Path, path: Path) -> None:
    image = read_image(path)
    back = read_image(write_image(image, tmp_path / "copy.nii.gz"))
    assert back.array.dtype == image.array.dtype
    np.testing.assert_array_equal(back.array, image.array)
    assert_same_geometry(back, image, rtol=1e-6, atol=1e-6)


@needs_datasets
@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "axcodes", "direction"),
    [
        (CT, ("R", "A", "S"), np.diag([-1.0, -1.0, 1.0])),
        (MR, ("L", "P", "S"), np.eye(3)),
        (HIPPO, ("R", "A", "S"), np.diag([-1.0, -1.0, 1.0])),
    ],
    ids=["ct-ras", "mr-lps", "hippocampus-ras"],
)
def test_axis_convention_matches_nibabel(path: Path, axcodes: tuple, direction: np.ndarray) -> None:
    """ITK is LPS, nibabel RAS: ITK direction @ diag(spacing) = diag(-1,-1,1) @ affine[:3, :3]."""
    image = read_image(path)
    ref = nib.load(str(path))
    assert nib.aff2axcodes(ref.affine) == axcodes
    # same voxel order: Image axes are (x, y, z), as nibabel's (i, j, k)
    assert image.shape == ref.shape
    np.testing.assert_array_equal(image.array, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(
        image.direction_matrix @ np.diag(image.spacing),
        LPS_FROM_RAS @ ref.affine[:3, :3],
        atol=1e-5,
    )
    np.testing.assert_allclose(image.origin, LPS_FROM_RAS @ ref.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(image.direction_matrix, direction, atol=1e-6)


@needs_datasets
@pytest.mark.integration
def test_world_coordinates_agree_with_nibabel() -> None:
    """A voxel far from the origin lands at the same physical point in both libraries."""
    image = read_image(MR)
    ref = nib.load(str(MR))
    index = np.array([100.0, 80.0, 15.0])
    ras = ref.affine @ np.append(index, 1.0)
    np.testing.assert_allclose(image.index_to_world(index), LPS_FROM_RAS @ ras[:3], atol=1e-3)


@needs_datasets
@pytest.mark.integration
def test_dicom_series_jpeg2000() -> None:
    image = read_image(DICOM)
    assert image.shape == (512, 512, 20)
    assert image.array.dtype.kind == "i"  # HU after rescale slope 1 / intercept: signed integers
    assert 0.3 < image.spacing[0] < 1.5 and image.spacing[0] == pytest.approx(image.spacing[1])
    assert 0.5 <= image.spacing[2] <= 10.0
    np.testing.assert_allclose(
        image.direction_matrix @ image.direction_matrix.T, np.eye(3), atol=1e-6
    )
    values = image.array
    assert values.min() <= -1000 + 50  # air, in Hounsfield units (rescale slope/intercept applied)
    assert values.max() > 500  # bone
    body = values[values > -500]
    assert 0.05 < body.size / values.size < 0.95
    assert -200 < np.median(body) < 200  # soft tissue around water


def test_write_refuses_overwrite_and_leaves_no_temp_files(tmp_path: Path) -> None:
    first = oblique_3d(np.int16)
    path = write_image(first, tmp_path / "out.nii.gz")
    before = path.read_bytes()
    second = first.with_array(first.array + 1)
    with pytest.raises(MedsegError, match="already exists"):
        write_image(second, path)
    assert path.read_bytes() == before
    write_image(second, path, overwrite=True)
    np.testing.assert_array_equal(read_image(path).array, second.array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_write_float_png_is_refused(tmp_path: Path) -> None:
    image = Image(np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3), spacing=(1.0, 1.0))
    with pytest.raises(MedsegError, match="floating point"):
        write_image(image, tmp_path / "float.png")
    assert list(tmp_path.iterdir()) == []


def test_write_3d_png_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="2D"):
        write_image(oblique_3d(np.uint8), tmp_path / "volume.png")
    assert list(tmp_path.iterdir()) == []


def _one_line_error_naming(path: Path) -> str:
    with pytest.raises(MedsegError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_missing_file_error(tmp_path: Path) -> None:
    message = _one_line_error_naming(tmp_path / "nowhere.nii.gz")
    assert "not found" in message


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_truncated_file_error(tmp_path: Path, suffix: str) -> None:
    """ITK alone zero-fills a truncated NIfTI; read_image must refuse it instead."""
    path = write_image(oblique_3d(np.float32), tmp_path / f"cut{suffix}")
    _one_line_error_naming(_truncate(path))


def test_truncated_png_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = write_image(
        Image(rng.integers(0, 255, (64, 64)).astype(np.uint8), (1.0, 1.0)), tmp_path / "cut.png"
    )
    _one_line_error_naming(_truncate(path))


def test_gzip_without_its_end_error(tmp_path: Path) -> None:
    """A .nii.gz whose gzip stream stops early but whose header is whole."""
    raw = tmp_path / "whole.nii"
    write_image(oblique_3d(np.float32), raw)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(raw.read_bytes()[:-200]))
    message = _one_line_error_naming(path)
    assert "truncated" in message


@pytest.mark.parametrize("content", [b"", b"not an image at all" * 50], ids=["zero-bytes", "text"])
def test_corrupt_file_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(content)
    _one_line_error_naming(path)


def test_random_bytes_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(4).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _one_line_error_naming(path)


def test_sitk_itself_zero_fills_truncated_nifti(tmp_path: Path) -> None:
    """Documents why medseg checks NIfTI length itself (if ITK starts failing, fine too)."""
    path = _truncate(write_image(oblique_3d(np.float32), tmp_path / "cut.nii"))
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        return
    assert np.count_nonzero(array.ravel()[-10:]) == 0


def test_nan_nifti_with_a_header_only_itk_accepts_gives_a_medseg_error(tmp_path: Path):
    # Found by the atheris run of benchmarks/reliability.py: a damaged magic string makes ITK
    # read the file as Analyze while nibabel refuses it, so its NaN voxels cannot be restored.
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    path = tmp_path / "case.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[344:348] = b"xx1\0"
    path.write_bytes(bytes(raw))
    sitk.ReadImage(str(path))  # ITK alone would hand back zeros where the NaN is
    with pytest.raises(MedsegError, match=r"case\.nii: cannot read image .*damaged"):
        read_image(path)


@pytest.mark.parametrize("vox_offset", [float("nan"), -4.0e20])
def test_a_damaged_vox_offset_gives_an_image_or_a_medseg_error(tmp_path: Path, vox_offset):
    # Found by the atheris run: a NaN vox_offset crashed the NaN scan (int(nan)) and a huge
    # negative one escaped as nibabel's HeaderDataError.
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    path = tmp_path / "case.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[108:112] = np.float32(vox_offset).tobytes()
    path.write_bytes(bytes(raw))
    try:
        read_image(path)
    except MedsegError as exc:
        assert "case.nii" in str(exc)
