"""De-identification on ingest: the DICOM PS3.15 Basic Application Level Confidentiality Profile.

dicognito applies the profile's actions (names, IDs, dates, addresses and free text replaced
by dummies; UIDs remapped). One anonymizer handles a whole study, so every UID is mapped the
same way in all its files: the series stays a series and references stay valid. Blank
study, series and frame-of-reference UIDs (some exports blank them) get one new UID each. Private
tags are removed (the profile's default) and the result is marked as de-identified.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pydicom

from medseg.dicom.seg import save_dataset_atomic
from medseg.dicom.series import dicom_folder, repair_header
from medseg.errors import MedsegError

BASIC_PROFILE = ("DCM", "113100", "Basic Application Confidentiality Profile")


def _anonymizer(seed: str | None):
    from dicognito.anonymizer import Anonymizer

    return Anonymizer(seed=seed)


_STUDY_LEVEL_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def _fill_empty_uids(ds: pydicom.Dataset, fills: dict[str, str]) -> None:
    """Give blanked UIDs a value, shared by all files of one call (some exports blank them)."""
    repair_header(ds)
    for keyword in _STUDY_LEVEL_UIDS:
        if keyword in ds and not ds.get(keyword):
            setattr(ds, keyword, fills.setdefault(keyword, pydicom.uid.generate_uid()))


def _mark(ds: pydicom.Dataset) -> None:
    import dicognito
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds.remove_private_tags()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = f"PS3.15 Basic Profile (medseg, dicognito {dicognito.__version__})"
    code = Dataset()
    code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning = BASIC_PROFILE
    ds.DeidentificationMethodCodeSequence = Sequence([code])


def deidentify_datasets(
    datasets: Iterable[pydicom.Dataset], *, seed: str | None = None
) -> list[pydicom.Dataset]:
    """De-identify datasets in place with one shared anonymizer (consistent UIDs and dummies).

    ``seed`` makes the mapping reproducible (the same seed maps the same UID the same way
    across runs; keep it secret, since it allows re-linking).
    """
    anonymizer = _anonymizer(seed)
    fills: dict[str, str] = {}
    out = []
    for ds in datasets:
        _fill_empty_uids(ds, fills)
        anonymizer.anonymize(ds)
        _mark(ds)
        out.append(ds)
    return out


def deidentify_folder(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    seed: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """De-identify every DICOM file under ``source`` (folder or zip) into ``output``.

    Files are named ``<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` after de-identification,
    so no original identifier survives in the paths either. Non-DICOM files are skipped.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise MedsegError(f"{output}: already exists and is not empty (use --overwrite)")
    anonymizer = _anonymizer(seed)
    fills: dict[str, str] = {}
    written = []
    with dicom_folder(source) as folder:
        for file in sorted(Path(folder).rglob("*")):
            if not file.is_file() or file.name.startswith("."):
                continue
            try:
                ds = pydicom.dcmread(file)
            except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
                continue
            _fill_empty_uids(ds, fills)
            anonymizer.anonymize(ds)
            _mark(ds)
            dest = output / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            written.append(save_dataset_atomic(ds, dest, overwrite=overwrite))
    if not written:
        raise MedsegError(f"{source}: no DICOM files found")
    return written
