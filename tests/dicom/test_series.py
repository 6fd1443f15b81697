"""DICOM series reading with checks, DICOM SEG round trips (highdicom, dciodvfy), codes, de-identification."""

from __future__ import annotations

import zipfile

import numpy as np
import pydicom
import pytest
from conftest import shared_dataset
from dicom_factory import phantom_volume, write_series
from helpers.dicom import ORIGIN, SPACING

from medseg.dicom import (
    DicomSeriesError,
    read_series,
)
from medseg.io.files import read_dicom_series


def test_reads_sorted_series_with_geometry(series_dir, tmp_path):
    folder, volume, _ = series_dir
    series = read_series(folder)
    assert np.array_equal(series.image.array, volume)  # file names are shuffled: sorted by position
    assert np.allclose(series.image.spacing, SPACING) and np.allclose(series.image.origin, ORIGIN)
    zs = [float(ds.ImagePositionPatient[2]) for ds in series.datasets]
    assert zs == sorted(zs)
    assert series.image.same_geometry(read_dicom_series(folder))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"export/{f.name}")
    assert np.array_equal(read_series(archive).image.array, volume)


def test_jpeg_ls_series_decodes_losslessly(tmp_path):
    volume, _ = phantom_volume(seed=3)
    volume = np.abs(volume)  # JPEG-LS lossless of unsigned data
    write_series(tmp_path, volume, jpeg_ls=True)
    ds = pydicom.dcmread(next(tmp_path.iterdir()))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    assert np.array_equal(read_series(tmp_path).image.array, volume)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"z_positions": [0, 2.5, 5, 10, 12.5, 15]}, "missing slice(s) (1 missing)"),
        ({"z_positions": [0, 2.5, 5, 7.0, 9.5, 12]}, "inconsistent slice spacing"),
        ({"shear_per_slice": 0.6}, "gantry tilt"),
        ({"z_positions": [0, 2.5, 2.5, 5, 7.5, 10]}, "same position"),
    ],
)
def test_refuses_broken_series(tmp_path, kwargs, message):
    volume, _ = phantom_volume(shape=(8, 8, 6))
    write_series(tmp_path, volume, **kwargs)
    with pytest.raises(DicomSeriesError, match=r"\S") as info:
        read_series(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mixed_series_need_a_choice(tmp_path):
    volume, _ = phantom_volume(shape=(8, 8, 4))
    study = pydicom.uid.generate_uid()
    write_series(tmp_path / "a", volume, study_uid=study, series_uid="1.2.3.4")
    write_series(tmp_path / "b", volume + 1, study_uid=study, series_uid="1.2.3.5", modality="MR")
    with pytest.raises(DicomSeriesError, match="2 series found"):
        read_series(tmp_path)
    assert np.array_equal(read_series(tmp_path, series_uid="1.2.3.5").image.array, volume + 1)
    assert read_series(tmp_path, modality="CT").series_uid == "1.2.3.4"
    with pytest.raises(DicomSeriesError, match="no series 9.9"):
        read_series(tmp_path, series_uid="9.9")


@pytest.mark.integration
def test_shared_jpeg2000_series_reads_like_gdcm():
    folder = shared_dataset("TotalSegmentator_example_CT") / "extras" / "example_ct_dicom"
    series = read_series(folder)
    reference = read_dicom_series(folder)
    assert series.image.shape == (512, 512, 20) and series.image.same_geometry(reference)
    assert np.array_equal(series.image.array, reference.array)
    assert series.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
