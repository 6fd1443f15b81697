"""Checks of an input before its voxels are used: headers, PNG encodings, DICOM slice geometry, NaN.

Every reader of medseg goes through these checks, so that the CLI, the API, the service and
the PACS path refuse the same inputs with the same one-line message naming the file:

- :func:`check_header`: NIfTI, NRRD, MHA/MHD and PNG headers are read (without the voxels) and
  refused when the size is absurd (more than :func:`max_voxels` voxels: checked before the
  array is allocated), when a spacing is zero, negative or not finite, or when the direction
  matrix is singular or not finite. NIfTI headers are also checked on the raw fields, since
  ITK silently replaces a NaN or zero ``pixdim`` by 1.
- :func:`png_info` / :func:`check_png`: palette and grey+alpha PNGs are refused (their values
  are not intensities), sub-byte grey PNGs are read back to their stored values.
- :func:`check_slice_geometry`: the slices of a DICOM series, sorted along the slice normal and
  refused when slices are missing, duplicated, sheared (gantry tilt) or differently oriented.
  Both DICOM readers (``medseg.io.files.read_dicom_series``, headers via GDCM, and
  ``medseg.dicom.read_series``, headers via pydicom) call it.
- :func:`check_finite`: NaN or infinite voxels at prediction, refused or set to zero.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import Image

__all__ = [
    "NAN_POLICIES",
    "NON_IMAGE_MODALITIES",
    "SPACING_TOLERANCE",
    "DicomSeriesError",
    "InputError",
    "SliceHeader",
    "check_finite",
    "check_header",
    "check_png",
    "check_slice_geometry",
    "max_voxels",
    "nifti_has_nonfinite",
    "nifti_header_problem",
    "png_info",
]

# Non-image objects that share a study with the images (our own SEG output among them).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "KO", "PR", "RTPLAN", "REG", "DOC"})
SPACING_TOLERANCE = 0.01  # relative deviation of one slice gap from the median
NAN_POLICIES = ("refuse", "zero")
# More voxels than this in one file is taken as a broken or hostile header (2^31: a 1290^3
# volume, 8 GiB as float32); MEDSEG_MAX_VOXELS raises the limit for truly huge images.
DEFAULT_MAX_VOXELS = 1 << 31
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SITK_HEADER_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png")


class InputError(MedsegError):
    """An input file that medseg refuses to read (one line naming the file and the problem)."""


class DicomSeriesError(InputError):
    """A DICOM series that cannot be turned into one volume."""


def max_voxels() -> int:
    """The most voxels (times components) one input file may declare (``MEDSEG_MAX_VOXELS``)."""
    value = os.environ.get("MEDSEG_MAX_VOXELS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_VOXELS


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in _SITK_HEADER_SUFFIXES if name.endswith(s)), "")


def _nifti_header_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(1 << 16 if path.name.lower().endswith(".gz") else 540)
    if path.name.lower().endswith(".gz"):
        # zlib hands over what a cut stream holds instead of raising
        head = zlib.decompressobj(wbits=31).decompress(head, 540)
    return head


def nifti_header_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a NIfTI-1/2 header's geometry fields, or None.

    ITK replaces a zero, negative or non-finite ``pixdim`` by 1 without a word, so these are
    checked on the raw header: the spacings the image will get (``pixdim`` when the qform is
    used, the ``srow`` matrix when the sform is) must be finite and positive, and the matrix
    regular.
    """
    try:
        head = _nifti_header_bytes(Path(path))
    except (OSError, zlib.error):
        return None  # ITK's own reading reports an unreadable file
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            qcode, scode = struct.unpack(endian + "2h", head[252:256])
            quatern = struct.unpack(endian + "6f", head[256:280])
            srow = struct.unpack(endian + "12f", head[280:328])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            qcode, scode = struct.unpack(endian + "2i", head[344:352])
            quatern = struct.unpack(endian + "6d", head[352:400])
            srow = struct.unpack(endian + "12d", head[400:496])
            break
    else:
        return None  # not NIfTI enough to tell
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        return f"invalid number of dimensions {ndim} in the NIfTI header"
    sizes = dims[1 : ndim + 1]
    if any(s <= 0 for s in sizes):
        return f"image size {tuple(sizes)} has an empty or negative axis"
    spatial = min(ndim, 3)
    if qcode > 0 or scode <= 0:  # ITK takes the spacing from pixdim
        bad = [p for p in pixdim[1 : spatial + 1] if not (math.isfinite(p) and p != 0)]
        if bad:
            return f"voxel spacing (pixdim) {tuple(pixdim[1 : spatial + 1])} is not finite and non-zero"
        if qcode > 0 and not all(math.isfinite(q) for q in quatern):
            return "the qform (quaternion and offset) is not finite"
    if scode > 0:
        matrix = np.asarray(srow, dtype=float).reshape(3, 4)
        if not np.all(np.isfinite(matrix)):
            return "the sform matrix is not finite"
        if abs(np.linalg.det(matrix[:, :3])) < 1e-12:
            return "the sform matrix is singular (zero spacing or collinear axes)"
    return None


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def nifti_has_nonfinite(path: str | os.PathLike) -> bool:
    """Whether a float NIfTI file stores NaN or infinite voxels.

    ITK's NIfTI reader turns them into 0 without a word, so the stored values are scanned
    here (streamed: the file is never held in memory twice; integer files are skipped).
    """
    path = Path(path)
    try:
        head = _nifti_header_bytes(path)
    except (OSError, zlib.error):
        return False
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            if not math.isfinite(vox_offset):  # a damaged header; the reader refuses it
                return False
            offset = int(vox_offset)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return False
    if datatype not in _NIFTI_FLOATS:
        return False
    dtype = np.dtype(endian + _NIFTI_FLOATS[datatype])
    chunk = dtype.itemsize << 20
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            f.seek(max(offset, 0))
            while block := f.read(chunk):
                usable = len(block) - len(block) % dtype.itemsize
                if not np.isfinite(np.frombuffer(block[:usable], dtype=dtype)).all():
                    return True
    except (OSError, EOFError, zlib.error):
        return False  # truncation is reported by the reader's own check
    return False


def png_info(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """``(width, height, bit_depth, colour_type)`` from a PNG's IHDR chunk, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(33)
    except OSError:
        return None
    if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, colour


def check_png(path: str | os.PathLike) -> str | None:
    """What medseg refuses in a PNG's encoding, or None (see the module docstring)."""
    info = png_info(path)
    if info is None:
        return None
    width, height, depth, colour = info
    if colour not in _PNG_COLOUR or depth not in (1, 2, 4, 8, 16):
        return f"invalid PNG header (bit depth {depth}, colour type {colour})"
    if width == 0 or height == 0:
        return f"empty PNG ({width} x {height})"
    if width * height * 4 > max_voxels():
        return f"PNG of {width} x {height} pixels is larger than the limit of {max_voxels()} voxels"
    if colour == 3:
        return (
            "palette (indexed-colour) PNG: its values are colour-table indices, not intensities; "
            "save it as greyscale (8 or 16 bit) first"
        )
    if colour == 4:
        return "grey+alpha PNG is not supported; save it as greyscale without alpha"
    return None


def check_header(path: str | os.PathLike) -> None:
    """Refuse a NIfTI/NRRD/MHA/PNG file whose header is absurd, before any voxel is read.

    Raises
    ------
    InputError
        One line naming the file: unreadable header, absurd size, zero or non-finite
        spacing, singular or non-finite direction, or a refused PNG encoding.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not suffix or not path.is_file():
        return
    problem = None
    if suffix in _NIFTI_SUFFIXES:
        problem = nifti_header_problem(path)
    elif suffix == ".png":
        problem = check_png(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "rror" in line), lines[-1] if lines else "")
        raise InputError(f"{path}: cannot read image header ({detail.strip()[:200]})") from None
    size = reader.GetSize()
    if any(s <= 0 for s in size):
        raise InputError(f"{path}: image size {size} has an empty axis")
    voxels = int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents())
    if voxels > max_voxels():
        raise InputError(
            f"{path}: the header declares {size} x {reader.GetNumberOfComponents()} values, "
            f"more than the limit of {max_voxels()} (set MEDSEG_MAX_VOXELS to allow more)"
        )
    spatial = min(len(size), 3)
    spacing = reader.GetSpacing()[:spatial]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{path}: voxel spacing {spacing} is not finite and positive")
    if not all(math.isfinite(o) for o in reader.GetOrigin()):
        raise InputError(f"{path}: origin {reader.GetOrigin()} is not finite")
    n = len(size)
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(n, n)[:spatial, :spatial]
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"{path}: the direction matrix is singular or not finite")


def sub_byte_scale(path: str | os.PathLike) -> int:
    """The factor by which ITK scaled a 1, 2 or 4-bit grey PNG's values up to 8 bits (else 1)."""
    info = png_info(path)
    if info is None or info[3] != 0 or info[2] >= 8:
        return 1
    return 255 // (2 ** info[2] - 1)


def check_finite(
    channels: Sequence[Image], *, source: str | os.PathLike, policy: str = "refuse"
) -> list[Image]:
    """Refuse (``"refuse"``) or zero (``"zero"``, with a warning) NaN and infinite voxels.

    Parameters
    ----------
    channels
        The channels of one case.
    source
        The file (or files) they came from, named in the error and the warning.
    policy
        ``"refuse"``: raise :class:`InputError`; ``"zero"``: set those voxels to 0 and print
        one warning line with the file and the voxel count on stderr.

    Returns
    -------
    list of Image
        ``channels`` (the same objects when every voxel is finite).
    """
    if policy not in NAN_POLICIES:
        raise MedsegError(f"unknown NaN policy {policy!r} (use one of {', '.join(NAN_POLICIES)})")
    out = []
    for channel in channels:
        array = channel.array
        if array.dtype.kind not in "fc":
            out.append(channel)
            continue
        bad = ~np.isfinite(array)
        count = int(bad.sum())
        if not count:
            out.append(channel)
            continue
        if policy == "refuse":
            raise InputError(
                f"{source}: {count} voxel(s) are NaN or infinite "
                "(use --nan-policy zero to set them to 0)"
            )
        print(
            f"medseg: warning: {source}: {count} NaN or infinite voxel(s) set to 0",
            file=sys.stderr,
        )
        out.append(channel.with_array(np.where(bad, 0, array).astype(array.dtype)))
    return out


@dataclass(frozen=True)
class SliceHeader:
    """The geometry fields of one DICOM slice (from pydicom or from GDCM)."""

    file: Path
    position: tuple[float, float, float]
    orientation: tuple[float, ...]  # ImageOrientationPatient: row then column cosines
    rows: int
    columns: int
    tilt: float = 0.0  # GantryDetectorTilt in degrees


def check_slice_geometry(
    source: str | os.PathLike, slices: Sequence[SliceHeader]
) -> list[SliceHeader]:
    """The slices sorted along the slice normal, after the geometry checks.

    Raises
    ------
    DicomSeriesError
        Mixed orientation or slice size, two slices at one position, gantry tilt, missing
        slices or inconsistent spacing: one line naming the slice file (or the series).
    """
    if not slices:
        raise DicomSeriesError(f"{source}: no DICOM slices")
    first = slices[0]
    orientation = np.asarray(first.orientation, dtype=float)
    if orientation.shape != (6,) or not np.all(np.isfinite(orientation)):
        raise DicomSeriesError(f"{first.file}: invalid ImageOrientationPatient")
    normal = np.cross(orientation[:3], orientation[3:])
    if np.linalg.norm(normal) < 1e-3:
        raise DicomSeriesError(f"{first.file}: ImageOrientationPatient has parallel axes")
    shape = (first.rows, first.columns)
    for item in slices:
        if item.rows <= 0 or item.columns <= 0:
            raise DicomSeriesError(f"{item.file}: empty slice ({item.rows} x {item.columns})")
        position = np.asarray(item.position, dtype=float)
        if position.shape != (3,) or not np.all(np.isfinite(position)):
            raise DicomSeriesError(f"{item.file}: invalid ImagePositionPatient")
    for item in slices[1:]:
        other = np.asarray(item.orientation, dtype=float)
        if other.shape != (6,) or not np.allclose(other, orientation, atol=1e-4):
            raise DicomSeriesError(
                f"{item.file}: slice orientation differs from the rest of the series"
            )
        if (item.rows, item.columns) != shape:
            raise DicomSeriesError(f"{item.file}: slice size differs from the rest of the series")
    positions = {id(s): np.asarray(s.position, dtype=float) for s in slices}
    items = sorted(slices, key=lambda s: float(positions[id(s)] @ normal))
    if len(items) < 2:
        return items
    steps = np.diff([positions[id(s)] for s in items], axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < 1e-3):
        dup = items[int(np.argmin(np.abs(along))) + 1].file
        raise DicomSeriesError(
            f"{dup}: two slices at the same position (duplicate or mixed series)"
        )
    tilt = np.linalg.norm(steps - along[:, None] * normal, axis=1) / np.abs(along)
    tilt_tag = float(first.tilt or 0)
    if np.max(tilt) > 1e-3 or abs(tilt_tag) > 1e-3:
        angle = max(np.degrees(np.arctan(np.max(tilt))), abs(tilt_tag))
        raise DicomSeriesError(
            f"{source}: gantry tilt of {angle:.1f} degrees (slices are sheared; resample the "
            "series to an orthogonal grid first)"
        )
    median = float(np.median(along))
    deviation = np.abs(along - median) / median
    if np.max(deviation) > SPACING_TOLERANCE:
        i = int(np.argmax(deviation))
        ratio = along[i] / median
        kind = (
            f"missing slice(s) ({round(ratio) - 1} missing)"
            if abs(ratio - round(ratio)) < SPACING_TOLERANCE and round(ratio) >= 2
            else "inconsistent slice spacing"
        )
        raise DicomSeriesError(
            f"{items[i + 1].file}: {kind}: gap of {along[i]:.3f} mm after {items[i].file.name}, "
            f"the series' median is {median:.3f} mm"
        )
    return items


def _numbers(text: str, count: int, file: Path, tag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.strip().split("\\"))
    except ValueError:
        values = ()
    if len(values) != count:
        raise DicomSeriesError(f"{file}: invalid {tag} {text.strip()[:60]!r}")
    return values


_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_UNWALKED_SYNTAXES = ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")  # big endian, deflated


def dicom_length_problem(path: str | os.PathLike) -> str | None:
    """A top-level DICOM element whose declared length runs past the end of the file, or None.

    GDCM allocates what a length field says before it reads: a damaged length (gigabytes,
    found by fuzzing) is refused here first. File meta and explicit or implicit VR little
    endian data sets are walked up to the pixel data or the first element of undefined length.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    size = len(data)
    if size < 132 or data[128:132] != b"DICM":
        return None  # not Part 10: GDCM decides
    at, explicit, meta_syntax, in_meta = 132, True, "", True
    while at + 8 <= size:
        group, element = struct.unpack_from("<HH", data, at)
        if in_meta and group != 2:  # the data set's own encoding starts here
            in_meta = False
            if meta_syntax in _UNWALKED_SYNTAXES:
                return None
            explicit = meta_syntax != _IMPLICIT_LE
        vr = data[at + 4 : at + 6]
        if explicit and vr.isalpha() and vr.isupper():
            if vr in _LONG_VRS:
                if at + 12 > size:
                    return f"element ({group:04X},{element:04X}) is cut off"
                length = struct.unpack_from("<I", data, at + 8)[0]
                at += 12
            else:
                length = struct.unpack_from("<H", data, at + 6)[0]
                at += 8
        else:
            length = struct.unpack_from("<I", data, at + 4)[0]
            at += 8
        if length == 0xFFFFFFFF:
            return None  # a sequence or encapsulated pixels: items follow; GDCM walks them
        if length > size - at:
            return (
                f"element ({group:04X},{element:04X}) declares {length} bytes, "
                f"only {size - at} are left in the file"
            )
        if group == 2 and element == 0x0010:
            meta_syntax = data[at : at + length].decode("ascii", "replace").strip("\x00 ")
        if (group, element) == (0x7FE0, 0x0010):
            return None
        at += length
    return None


def gdcm_slice_header(file: str | os.PathLike) -> tuple[SliceHeader, str]:
    """One slice's :class:`SliceHeader` and its Modality, read by GDCM (no pixel data)."""
    file = Path(file)
    problem = dicom_length_problem(file)
    if problem:
        raise DicomSeriesError(f"{file}: damaged DICOM file ({problem})")
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DicomSeriesError(f"{file}: unreadable DICOM header") from None

    def tag(key: str) -> str:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else ""

    for key, name in (
        ("0020|0032", "ImagePositionPatient"),
        ("0020|0037", "ImageOrientationPatient"),
    ):
        if not tag(key).strip():
            raise DicomSeriesError(f"{file}: no {name}: not a cross-sectional image slice")
    size = reader.GetSize()
    tilt_text = tag("0018|1120").strip()
    try:
        tilt = float(tilt_text) if tilt_text else 0.0
    except ValueError:
        tilt = 0.0
    header = SliceHeader(
        file=file,
        position=_numbers(tag("0020|0032"), 3, file, "ImagePositionPatient"),  # type: ignore[arg-type]
        orientation=_numbers(tag("0020|0037"), 6, file, "ImageOrientationPatient"),
        rows=int(size[1]),
        columns=int(size[0]),
        tilt=tilt,
    )
    return header, tag("0008|0060").strip().upper()
