"""Geometry shared by the registration methods: canvases, centring, displacement fields, warping.

Every method's result is a SimpleITK transform that maps points of the fixed image
to points of the moving image (ITK's convention, the one 3D Slicer and ANTs read).
Warping resamples the moving image on the fixed image's grid through it.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.files import from_sitk, to_sitk
from medseg.io.image import Image

LABEL_MODES = ("nearest", "linear")  # label interpolation of warp_labels


def centre(image: Image) -> np.ndarray:
    """World coordinates of the image's geometric centre."""
    return image.index_to_world((np.asarray(image.shape, dtype=float) - 1) / 2)


def check_pair(
    fixed: Image, moving: Image, *, names: tuple[str, str] = ("fixed", "moving")
) -> None:
    """Raise a clear error for pairs that cannot be registered."""
    if fixed.ndim != moving.ndim:
        raise MedsegError(
            f"{names[1]}: a {moving.ndim}D image cannot be registered to a {fixed.ndim}D {names[0]} image"
        )
    for name, image in zip(names, (fixed, moving)):
        if min(image.shape) < 4:
            raise MedsegError(f"{name}: image of shape {image.shape} is too small to register")
        a = np.asarray(image.array, dtype=np.float64)
        if not np.isfinite(a).all():
            raise MedsegError(f"{name}: image holds NaN or infinite values")
        if a.max() == a.min():
            raise MedsegError(f"{name}: image is constant (nothing to align)")


def check_overlap(
    fixed: Image, moving: Image, *, names: tuple[str, str] = ("fixed", "moving")
) -> None:
    """Raise when the physical extents of the two images do not intersect at all.

    Centred initialization fixes this for most uses; the check guards ``init="none"``.
    """

    def box(image: Image) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in image.shape], indexing="ij"))
        pts = image.index_to_world(corners.reshape(image.ndim, -1).T)
        return pts.min(0), pts.max(0)

    (lo1, hi1), (lo2, hi2) = box(fixed), box(moving)
    if np.any(hi1 <= lo2) or np.any(hi2 <= lo1):
        raise MedsegError(
            f"{names[1]}: its field of view does not overlap the {names[0]} image's "
            "(use centred initialization, or fix the origins)"
        )


def canvas_geometry(reference: Image, shape: tuple[int, ...]) -> Image:
    """An all-zero image of ``shape`` with the reference's spacing and direction, same centre.

    (Only its geometry is used; ``np.zeros`` costs nothing until written.)
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(reference.spacing)
    origin = centre(reference) - reference.direction_matrix @ (
        spacing * (np.asarray(shape, dtype=float) - 1) / 2
    )
    return Image(np.zeros(shape, np.float32), reference.spacing, tuple(origin), reference.direction)


def resample_on(
    moving: Image,
    grid: Image,
    transform: sitk.Transform,
    *,
    interpolator: int = sitk.sitkLinear,
    pixel_type: int = sitk.sitkFloat32,
) -> np.ndarray:
    """``moving`` resampled on ``grid``'s geometry (without building a reference image)."""
    out = sitk.Resample(
        to_sitk(moving),
        [int(s) for s in grid.shape],
        transform,
        interpolator,
        grid.origin,
        grid.spacing,
        grid.direction,
        0.0,
        pixel_type,
    )
    return from_sitk(out).array


def centring_transform(fixed: Image, moving: Image) -> sitk.TranslationTransform:
    """The translation that maps the fixed image's centre onto the moving image's centre."""
    return sitk.TranslationTransform(
        fixed.ndim, tuple(float(v) for v in centre(moving) - centre(fixed))
    )


def resample(
    moving: Image | sitk.Image,
    reference: Image | sitk.Image,
    transform: sitk.Transform | None = None,
    *,
    interpolator: int = sitk.sitkLinear,
    default: float = 0.0,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``moving`` on the reference grid through ``transform`` (fixed -> moving points)."""
    m = to_sitk(moving) if isinstance(moving, Image) else moving
    r = to_sitk(reference) if isinstance(reference, Image) else reference
    if transform is None:
        transform = sitk.Transform(r.GetDimension(), sitk.sitkIdentity)
    out_type = m.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(m, r, transform, interpolator, float(default), out_type)


def warp_image(moving: Image, fixed: Image, transform: sitk.Transform, *, order: int = 1) -> Image:
    """The moving image resampled on the fixed grid (``order`` 0 nearest, 1 linear, 3 B-spline)."""
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    out = resample(moving, fixed, transform, interpolator=interp, pixel_type=sitk.sitkFloat32)
    array = from_sitk(out).array
    if moving.array.dtype.kind in "iub" and order == 0:
        array = array.astype(moving.array.dtype)
    return fixed.with_array(array.astype(np.float32) if array.dtype.kind == "f" else array)


def warp_labels(
    labels: Image, fixed: Image, transform: sitk.Transform, *, mode: str = "nearest"
) -> Image:
    """Warp a label map on the fixed grid, keeping integer labels.

    ``mode="nearest"`` resamples by nearest neighbour; ``mode="linear"`` resamples
    each label's one-hot mask linearly and takes the arg-max (smoother borders).
    """
    array = np.asarray(labels.array)
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise MedsegError("labels: the label map holds non-integer values")
        array = array.astype(np.int32)
    if array.dtype.kind not in "iub":
        raise MedsegError(f"labels: unsupported label type {array.dtype}")
    source = labels.with_array(array.astype(np.int32))
    if mode == "nearest":
        out = resample(
            source,
            fixed,
            transform,
            interpolator=sitk.sitkNearestNeighbor,
            pixel_type=sitk.sitkInt32,
        )
        warped = from_sitk(out).array
    elif mode == "linear":
        values = np.unique(array)
        best = np.full(fixed.shape, -1.0, dtype=np.float32)
        warped = np.zeros(fixed.shape, dtype=np.int32)
        for v in values:
            mask = labels.with_array((array == v).astype(np.float32))
            default = 1.0 if v == 0 else 0.0  # outside the moving image is background
            p = from_sitk(
                resample(mask, fixed, transform, default=default, pixel_type=sitk.sitkFloat32)
            ).array
            take = p > best
            warped[take], best[take] = v, p[take]
    else:
        raise MedsegError(f"unknown label interpolation {mode!r} (use {' or '.join(LABEL_MODES)})")
    dtype = labels.array.dtype if labels.array.dtype.kind in "iu" else np.int32
    return fixed.with_array(warped.astype(dtype))


def field_to_transform(field: np.ndarray, grid: Image) -> sitk.DisplacementFieldTransform:
    """A displacement field ``(*shape, D)`` in world mm on ``grid`` as an ITK transform."""
    f = np.asarray(field, dtype=np.float64)
    order = tuple(range(grid.ndim))[::-1] + (grid.ndim,)
    image = sitk.GetImageFromArray(np.ascontiguousarray(f.transpose(order)), isVector=True)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return sitk.DisplacementFieldTransform(image)


def transform_to_field(transform: sitk.Transform, grid: Image) -> np.ndarray:
    """The transform's displacement ``T(x) - x`` (world mm) at every voxel of ``grid``: ``(*shape, D)``."""
    ref = to_sitk(grid.with_array(np.zeros(grid.shape, dtype=np.float32)))
    f = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        ref.GetSize(),
        ref.GetOrigin(),
        ref.GetSpacing(),
        ref.GetDirection(),
    )
    array = sitk.GetArrayFromImage(f)
    return np.ascontiguousarray(array.transpose(tuple(range(grid.ndim))[::-1] + (grid.ndim,)))


def voxel_to_world_displacement(disp_vox: np.ndarray, grid: Image) -> np.ndarray:
    """Convert a displacement in voxel units along the grid's axes ``(*shape, D)`` to world mm."""
    scaled = disp_vox * np.asarray(grid.spacing)
    return scaled @ grid.direction_matrix.T


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """``compose(A, B)(x) = A(B(x))``: B is applied first (ITK's stack order)."""
    dim = transforms[0].GetDimension()
    out = sitk.CompositeTransform(dim)
    for t in transforms:
        out.AddTransform(t)
    return out
