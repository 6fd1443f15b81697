"""Reading and writing images with SimpleITK, keeping the geometry exactly."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.io.image import Image
from medseg.io.sanity import (
    NON_IMAGE_MODALITIES,
    DicomSeriesError,
    check_header,
    check_slice_geometry,
    dicom_length_problem,
    gdcm_slice_header,
    nifti_has_nonfinite,
    sub_byte_scale,
)

IMAGE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
)
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".png")
_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def image_suffix(path: str | os.PathLike) -> str:
    """The file's image suffix (``.nii.gz`` counts as one), lower case, or ``""``."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: str | os.PathLike) -> str:
    """The file name without its image suffix."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def from_sitk(image: sitk.Image) -> Image:
    """Convert a SimpleITK image (scalar pixels) to an :class:`Image`."""
    array = sitk.GetArrayFromImage(image)
    array = np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1]))
    return Image(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def to_sitk(image: Image) -> sitk.Image:
    """Convert an :class:`Image` to a SimpleITK image with the same geometry."""
    array = image.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    out = sitk.GetImageFromArray(
        np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1]))
    )
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    out.SetDirection(image.direction)
    return out


def _nifti_expected_size(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file (uncompressed) must hold according to its header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            if not math.isfinite(vox_offset):  # damaged: no size to check against
                return None
            offset = int(vox_offset)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:  # NIfTI-2
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1 : dims[0] + 1]):
        return None
    return max(offset, 0) + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8


def nifti_truncation(path: str | os.PathLike) -> str | None:
    """Why a NIfTI file holds less voxel data than its header declares, or None.

    ITK reads a truncated ``.nii``/``.nii.gz`` without complaint and fills the
    missing voxels with zeros, so completeness is checked here: the file size
    (``.nii``) or the gzip stream (``.nii.gz``: its size field, and a full
    decompression only when that field disagrees).
    """
    path = Path(path)
    gz = image_suffix(path) == ".nii.gz"
    try:
        with open(path, "rb") as f:
            header = f.read(1 << 16 if gz else 540)
        if gz:  # zlib, not gzip: it hands over what a cut stream holds instead of raising
            header = zlib.decompressobj(wbits=31).decompress(header, 540)
    except (OSError, zlib.error):
        return None
    expected = _nifti_expected_size(header)
    if expected is None:  # not NIfTI enough to tell: ITK's own reading decides
        return None
    if not gz:
        size = path.stat().st_size
        return None if size >= expected else f"truncated file: {size} of {expected} bytes"
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
            return None
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        return f"truncated or corrupt gzip data ({exc})"
    return None if total >= expected else f"truncated data: {total} of {expected} bytes"


def _with_stored_nonfinite(image: sitk.Image, path: Path) -> sitk.Image:
    """``image`` with the NaN and infinite voxels that the NIfTI file stores (nibabel's read)."""
    array = sitk.GetArrayFromImage(image)
    try:  # ITK tolerates headers nibabel refuses; then the stored values cannot be trusted
        stored = np.asanyarray(nib.load(str(path)).dataobj)
        stored = stored.T.reshape(array.shape)  # NIfTI (i, j, k[, c]) -> ITK's (..., k, j, i)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        ValueError,
        OSError,
        EOFError,
    ) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise MedsegError(
            f"{path}: cannot read image (stores NaN or infinite voxels, and its NIfTI "
            f"header is damaged: {detail})"
        ) from None
    bad = ~np.isfinite(stored)
    array[bad] = stored[bad]
    out = sitk.GetImageFromArray(array, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise MedsegError(f"{path}: file not found")
    check_header(path)  # absurd sizes, zero/NaN spacing, singular directions, PNG encodings
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        detail = next(
            (line for line in reason if "ERROR" in line or "rror" in line),
            reason[-1] if reason else "",
        )
        raise MedsegError(f"{path}: cannot read image ({detail.strip()[:200]})") from None
    if image_suffix(path) in (".nii", ".nii.gz"):
        problem = nifti_truncation(path)
        if problem:  # ITK zero-fills what is missing instead of failing
            raise MedsegError(f"{path}: cannot read image ({problem})")
        if nifti_has_nonfinite(path):  # ITK reads NaN and inf as 0: put them back
            image = _with_stored_nonfinite(image, path)
    scale = sub_byte_scale(path) if image_suffix(path) == ".png" else 1
    if scale > 1:  # ITK stretched a 1/2/4-bit grey PNG to 0..255: back to the stored values
        image = sitk.Cast(sitk.Divide(image, scale), image.GetPixelID())
    return image


def read_image_channels(path: str | os.PathLike) -> list[Image]:
    """Read one image file; a vector image (RGB PNG) becomes one image per component.

    Grey images stored as RGB (all components equal) give one channel.
    """
    path = Path(path)
    if path.is_dir():
        return [read_dicom_series(path)]
    image = _read_sitk(path)
    if image.GetDimension() == 4:  # MSD multi-modal volumes: channels on the 4th axis
        size = list(image.GetSize())
        n = size[3]
        size[3] = 0
        return [from_sitk(sitk.Extract(image, size, [0, 0, 0, i])) for i in range(n)]
    if image.GetDimension() not in (2, 3):
        raise MedsegError(
            f"{path}: {image.GetDimension()}D images are not supported (2D or 3D only)"
        )
    n_components = image.GetNumberOfComponentsPerPixel()
    if n_components == 1:
        return [from_sitk(image)]
    components = [sitk.VectorIndexSelectionCast(image, i) for i in range(n_components)]
    if n_components == 4:  # RGBA: drop alpha
        components = components[:3]
    arrays = [sitk.GetArrayViewFromImage(c) for c in components]
    if all(np.array_equal(arrays[0], a) for a in arrays[1:]):
        components = components[:1]
    return [from_sitk(c) for c in components]


def read_image(path: str | os.PathLike) -> Image:
    """Read a NIfTI, NRRD, MHA/MHD, PNG/JPEG file or a DICOM series folder.

    Colour 2D images are converted to grey (ITU-R 601 luminance).
    """
    channels = read_image_channels(path)
    if len(channels) == 1:
        return channels[0]
    weights = (0.299, 0.587, 0.114)
    grey = sum(w * c.array.astype(np.float32) for w, c in zip(weights, channels))
    return channels[0].with_array(grey.astype(np.float32))


def list_dicom_series(folder: str | os.PathLike) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series in a folder."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None) -> Image:
    """Read a DICOM series (sorted by slice position, compressed syntaxes via GDCM).

    With several series in the folder, ``series_uid`` picks one; without it the folder
    must hold one image series (SEG, RTSTRUCT, SR... are ignored). The slices go through
    the same geometry checks as :func:`medseg.dicom.read_series` (see
    :func:`medseg.io.sanity.check_slice_geometry`): gaps, duplicates, mixed orientation and
    gantry tilt are refused.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedsegError(f"{folder}: not a folder of DICOM files")
    for file in sorted(folder.iterdir()):  # before GDCM allocates what a damaged length says
        problem = dicom_length_problem(file) if file.is_file() else None
        if problem:
            raise DicomSeriesError(f"{file}: damaged DICOM file ({problem})")
    series = list_dicom_series(folder)
    if not series:
        raise DicomSeriesError(f"{folder}: no DICOM series found")
    if series_uid is not None and series_uid not in series:
        raise DicomSeriesError(f"{folder}: no series {series_uid} (found {', '.join(series)})")
    headers = {}
    for candidate in [series_uid] if series_uid else series:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), candidate)
        slices = [gdcm_slice_header(f) for f in files]
        if series_uid or slices[0][1] not in NON_IMAGE_MODALITIES:
            headers[candidate] = [h for h, _ in slices]
    if len(headers) != 1:
        found = ", ".join(series)
        raise DicomSeriesError(
            f"{folder}: {len(headers)} image series found ({found}); put each series in a "
            "folder of its own"
        )
    uid, slices = next(iter(headers.items()))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(h.file) for h in check_slice_geometry(folder, slices)])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise MedsegError(
            f"{folder}: cannot read DICOM series {uid} ({str(exc).strip().splitlines()[-1][:200]})"
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedsegError(f"{folder}: colour DICOM series are not supported")
    return from_sitk(image)


def _written_nifti_problem(path: Path) -> str | None:
    """Why a NIfTI file just written is incomplete (a header that does not parse, or data
    shorter than it declares), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if image_suffix(path) == ".nii.gz":
            head = zlib.decompressobj(wbits=31).decompress(head, 540)
    except (OSError, zlib.error) as exc:
        return f"unreadable ({exc})"
    if _nifti_expected_size(head) is None:
        return "no complete NIfTI header"
    return nifti_truncation(path)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise MedsegError(f"{path}: already exists (use --overwrite to replace it)")
    if not image_suffix(path) or image_suffix(path) not in WRITE_SUFFIXES:
        raise MedsegError(
            f"{path}: cannot write this format (use one of {', '.join(WRITE_SUFFIXES)})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)


def write_image(
    image: Image, path: str | os.PathLike, *, overwrite: bool = False, compress: bool = True
) -> Path:
    """Write an image atomically (temporary file, then rename).

    PNG output needs a 2D image; floating point data is rejected there, since
    PNG would round it.
    """
    path = Path(path)
    _check_output(path, overwrite)
    array = image.array
    if image_suffix(path) in _2D_SUFFIXES:
        if image.ndim != 2:
            raise MedsegError(f"{path}: PNG output needs a 2D image, got shape {image.shape}")
        if array.dtype.kind == "f":
            raise MedsegError(
                f"{path}: PNG cannot store floating point values; cast to an integer type first"
            )
        if array.dtype.kind in "iub" and array.size and (array.min() < 0 or array.max() > 65535):
            raise MedsegError(f"{path}: values outside 0..65535 do not fit in a PNG")
        array = array.astype(np.uint8 if array.size == 0 or array.max() <= 255 else np.uint16)
        image = image.with_array(array)
    with atomic_path(path, suffix=image_suffix(path) or path.suffix) as tmp:
        sitk.WriteImage(to_sitk(image), str(tmp), useCompression=compress)
        # ITK's NIfTI writer reports a short write (a full disk) on stderr only
        problem = _written_nifti_problem(tmp) if image_suffix(path) in (".nii", ".nii.gz") else None
        if problem:
            raise MedsegError(f"{path}: incomplete write ({problem})")
    return path
