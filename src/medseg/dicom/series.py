"""Reading one DICOM series from a folder or a zip, with the checks a PACS export needs.

Headers are read with pydicom (to select and check the series); pixels are decoded by
SimpleITK's GDCM, which handles JPEG 2000, JPEG-LS and the other compressed transfer
syntaxes, from the file list in the order checked here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
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
            for member in zf.infolist():
                dest = (target / member.filename).resolve()
                if not dest.is_relative_to(root):
                    raise DicomSeriesError(
                        f"{archive}: member {member.filename!r} escapes the archive"
                    )
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise DicomSeriesError(f"{archive}: not a readable zip file ({exc})") from None


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


def scan_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every DICOM series under ``folder`` (recursively), from the headers only.

    Files that are not DICOM are ignored; series are ordered by descending file count.
    """
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for file in sorted(Path(folder).rglob("*")):
        if not file.is_file() or file.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in ds:
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((file, ds))
    infos = [
        SeriesInfo(
            series_uid=uid,
            study_uid=str(items[0][1].get("StudyInstanceUID", "")),
            modality=str(items[0][1].get("Modality", "")),
            description=str(items[0][1].get("SeriesDescription", "")),
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
    items = [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in info.files]
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
        except (TypeError, ValueError):
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
        datasets = tuple(repair_header(pydicom.dcmread(f)) for f, _ in items)
        files = tuple(Path(path) / f.relative_to(folder) for f, _ in items)
    return DicomSeries(image=from_sitk(volume), datasets=datasets, files=files)
