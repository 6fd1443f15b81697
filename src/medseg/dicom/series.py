"""Reading one DICOM series from a folder or a zip, with the checks a PACS export needs.

Headers are read with pydicom (to select and check the series); pixels are decoded by
SimpleITK's GDCM, which handles JPEG 2000, JPEG-LS and the other compressed transfer
syntaxes, from the file list in the order checked here.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import SimpleITK as sitk

from medseg.io.files import from_sitk
from medseg.io.image import Image

# One set of slice checks for both DICOM readers (this one and medseg.io.read_dicom_series);
# NON_IMAGE_MODALITIES and SPACING_TOLERANCE stay importable from here.
from medseg.io.sanity import (  # noqa: F401
    NON_IMAGE_MODALITIES,
    SPACING_TOLERANCE,
    DicomSeriesError,
    SliceHeader,
    check_slice_geometry,
)


@dataclass(frozen=True, eq=False)
class SeriesInfo:
    """One series found in a folder (headers only)."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """A checked series: the volume, and the headers of its slices in volume order (z)."""

    image: Image
    datasets: tuple[pydicom.Dataset, ...]
    files: tuple[Path, ...]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def modality(self) -> str:
        return str(self.datasets[0].get("Modality", ""))


def repair_header(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Fill an empty SOP Class/Instance UID from the file meta header (some exports blank them)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip, refusing members that would land outside ``target`` (zip slip)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            root = target.resolve()
            members = zf.infolist()
            # a zip bomb: zipfile stops each member at its declared size, so these bound it
            total = sum(m.file_size for m in members)
            if len(members) > MAX_ZIP_MEMBERS or total > MAX_ZIP_BYTES:
                raise DicomSeriesError(
                    f"{archive}: {len(members)} members, {total} bytes unpacked: more than "
                    f"the limit of {MAX_ZIP_MEMBERS} members or {MAX_ZIP_BYTES} bytes"
                )
            for member in members:
                dest = (target / member.filename).resolve()
                if not dest.is_relative_to(root):
                    raise DicomSeriesError(
                        f"{archive}: member {member.filename!r} escapes the archive"
                    )
            zf.extractall(target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise DicomSeriesError(f"{archive}: not a readable zip file ({exc})") from None
    except (RuntimeError, NotImplementedError, zlib.error) as exc:  # encrypted, unknown method
        raise DicomSeriesError(f"{archive}: cannot unpack the zip file ({exc})") from None


@contextmanager
def dicom_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder holding the DICOM files of ``path`` (a folder, or a zip extracted to a temp dir)."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.exists():
        raise DicomSeriesError(f"{path}: not found")
    if not zipfile.is_zipfile(path):
        raise DicomSeriesError(f"{path}: neither a folder nor a zip of DICOM files")
    tmp = Path(tempfile.mkdtemp(prefix="medseg-dicom-"))
    try:
        _safe_extract(path, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_BYTES = 16 << 30  # unpacked; a CT study is rarely above 2 GB

# Header values longer than this are not read until used: a damaged length field must not
# make pydicom allocate gigabytes (found by fuzzing) while we look for a few small tags.
HEADER_DEFER = "256 KB"
UNDEFINED_LENGTH = 0xFFFFFFFF


def _is_part10(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


class _BoundedFile(io.FileIO):
    """A file whose reads never ask for more than what is left in it.

    pydicom reads a value with ``read(declared_length)``, which allocates that many bytes
    first: a damaged length field (gigabytes, found by fuzzing) would be allocated before the
    short read is noticed.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self.size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self.size - self.tell()))
        return super().read(size)


def _read_dataset(file: Path, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """``pydicom.dcmread``, with any failure as a one-line DicomSeriesError naming the file."""
    try:
        with _BoundedFile(file) as f:
            header = pydicom.dcmread(
                f, stop_before_pixels=stop_before_pixels, defer_size=HEADER_DEFER
            )
        size = file.stat().st_size
        for tag in tuple(header.keys()):  # raw elements keep their declared length
            length = getattr(header.get_item(tag), "length", 0) or 0
            if length != UNDEFINED_LENGTH and length > size:
                raise DicomSeriesError(
                    f"{file}: damaged DICOM file (element {tag} declares {length} bytes, "
                    f"the file has {size})"
                )
        if stop_before_pixels:
            return header
        with _BoundedFile(file) as f:
            return pydicom.dcmread(f)
    except DicomSeriesError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
        raise DicomSeriesError(f"{file}: unreadable DICOM file ({detail})") from None


def scan_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every DICOM series under ``folder`` (recursively), from the headers only.

    Files that are not DICOM are ignored; series are ordered by descending file count.
    """
    groups: dict[str, list[tuple[Path, tuple[str, str, str]]]] = {}
    for file in sorted(Path(folder).rglob("*")):
        if not file.is_file() or file.name.startswith("."):
            continue
        try:  # pydicom converts elements lazily: a damaged one fails on first access
            with _BoundedFile(file) as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True, defer_size=HEADER_DEFER)
            if "SeriesInstanceUID" not in ds:
                continue
            uid = str(ds.SeriesInstanceUID)
            about = tuple(
                str(ds.get(k, "")) for k in ("StudyInstanceUID", "Modality", "SeriesDescription")
            )
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types
            if _is_part10(file):  # a damaged DICOM file, not a stray one: never drop a slice
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
                raise DicomSeriesError(f"{file}: damaged DICOM file ({detail})") from None
            continue
        groups.setdefault(uid, []).append((file, about))
    infos = [
        SeriesInfo(
            series_uid=uid,
            study_uid=items[0][1][0],
            modality=items[0][1][1],
            description=items[0][1][2],
            files=tuple(f for f, _ in items),
        )
        for uid, items in groups.items()
    ]
    return sorted(infos, key=lambda s: -len(s.files))


def select_series(
    infos: list[SeriesInfo],
    *,
    source: str | os.PathLike,
    series_uid: str | None = None,
    modality: str | None = None,
) -> SeriesInfo:
    """The one image series that ``series_uid`` / ``modality`` name; refuse when ambiguous."""
    if not infos:
        raise DicomSeriesError(f"{source}: no DICOM series found")
    found = ", ".join(f"{s.series_uid} ({s.modality}, {len(s.files)} files)" for s in infos)
    candidates = infos
    if series_uid is not None:
        candidates = [s for s in candidates if s.series_uid == series_uid]
        if not candidates:
            raise DicomSeriesError(f"{source}: no series {series_uid} (found {found})")
    if modality is not None:
        candidates = [s for s in candidates if s.modality.upper() == modality.upper()]
        if not candidates:
            raise DicomSeriesError(f"{source}: no {modality} series (found {found})")
    else:
        candidates = [s for s in candidates if s.modality.upper() not in NON_IMAGE_MODALITIES]
        if not candidates:
            raise DicomSeriesError(f"{source}: no image series (found {found})")
    if len(candidates) > 1:
        raise DicomSeriesError(
            f"{source}: {len(candidates)} series found, choose one with --series-uid or "
            f"--modality ({found})"
        )
    return candidates[0]


def _sorted_checked(
    source: str | os.PathLike, info: SeriesInfo
) -> list[tuple[Path, pydicom.Dataset]]:
    """Slices sorted along the slice normal, after the geometry checks
    (:func:`medseg.io.sanity.check_slice_geometry`)."""
    items = [(f, _read_dataset(f, stop_before_pixels=True)) for f in info.files]
    headers = []
    for file, ds in items:
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
            if key not in ds:
                raise DicomSeriesError(f"{file}: no {key}: not a cross-sectional image slice")
        try:
            headers.append(
                SliceHeader(
                    file=file,
                    position=tuple(float(v) for v in ds.ImagePositionPatient),
                    orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                    rows=int(ds.Rows),
                    columns=int(ds.Columns),
                    tilt=float(ds.get("GantryDetectorTilt", 0) or 0),
                )
            )
        except Exception:  # noqa: BLE001 - a damaged element fails when pydicom converts it
            raise DicomSeriesError(f"{file}: invalid geometry tags") from None
    by_file = dict(items)
    return [(h.file, by_file[h.file]) for h in check_slice_geometry(source, headers)]


def read_series(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
) -> DicomSeries:
    """Read and check one DICOM series from a folder or a zip file.

    Parameters
    ----------
    path
        A folder (searched recursively) or a ``.zip`` of DICOM files.
    series_uid, modality
        Select the series when the source holds several (non-image objects such as SEG,
        RTSTRUCT or SR are ignored unless ``modality`` names them).

    Returns
    -------
    DicomSeries
        The volume (HU for CT: rescale slope and intercept applied) and its headers.

    Raises
    ------
    DicomSeriesError
        Several candidate series, missing slices, inconsistent spacing, gantry tilt,
        duplicate positions, or unreadable pixel data.
    """
    with dicom_folder(path) as folder:
        info = select_series(
            scan_series(folder), source=path, series_uid=series_uid, modality=modality
        )
        items = _sorted_checked(path, info)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f, _ in items])
        try:
            volume = reader.Execute()
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1][:200]
            raise DicomSeriesError(
                f"{path}: cannot decode series {info.series_uid} ({detail})"
            ) from None
        if volume.GetNumberOfComponentsPerPixel() != 1:
            raise DicomSeriesError(f"{path}: colour DICOM series are not supported")
        # Full datasets (with pixel data) are kept: highdicom references them.
        datasets = tuple(repair_header(_read_dataset(f)) for f, _ in items)
        files = tuple(Path(path) / f.relative_to(folder) for f, _ in items)
    return DicomSeries(image=from_sitk(volume), datasets=datasets, files=files)
