"""DICOM series reading with checks, DICOM SEG round trips (highdicom, dciodvfy), codes, de-identification."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_factory import PATIENT

from medseg.dicom import (
    deidentify_folder,
    read_series,
)
from medseg.errors import MedsegError


def test_deidentify_removes_identity_and_keeps_uids_consistent(series_dir, tmp_path):
    folder, volume, _ = series_dir
    originals = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    written = deidentify_folder(folder, tmp_path / "deid")
    assert len(written) == len(originals)
    outs = [pydicom.dcmread(f) for f in written]
    original_uids = {str(ds.StudyInstanceUID) for ds in originals} | {
        str(ds.SOPInstanceUID) for ds in originals
    }
    for ds in outs:
        text = str(ds)
        for value in (*PATIENT.values(), "Doe", "St Example Hospital", "ACC123"):
            assert value not in text
        assert ds.PatientIdentityRemoved == "YES"
        assert str(ds.SOPInstanceUID) not in original_uids
    assert len({str(ds.StudyInstanceUID) for ds in outs}) == 1
    assert len({str(ds.SeriesInstanceUID) for ds in outs}) == 1
    assert len({str(ds.FrameOfReferenceUID) for ds in outs}) == 1
    assert np.array_equal(read_series(tmp_path / "deid").image.array, volume)  # pixels untouched
    with pytest.raises(MedsegError, match="not empty"):
        deidentify_folder(folder, tmp_path / "deid")
