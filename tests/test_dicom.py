"""DICOM series reading with checks, DICOM SEG round trips (highdicom, dciodvfy), codes, de-identification."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import numpy as np
import pydicom
import pytest
from conftest import shared_dataset
from dicom_factory import PATIENT, phantom_volume, write_series

from medseg.dicom import (
    DicomSeriesError,
    code_for_label,
    deidentify_folder,
    read_seg_labels,
    read_series,
    write_seg,
)
from medseg.errors import MedsegError
from medseg.io.files import read_dicom_series

SPACING, ORIGIN = (0.8, 0.8, 2.5), (-10.0, -20.0, 30.0)


def dciodvfy_errors(path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    volume, ball = phantom_volume()
    folder = tmp_path_factory.mktemp("series")
    write_series(folder, volume, spacing=SPACING, origin=ORIGIN)
    return folder, volume, ball


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


def test_seg_round_trip_is_voxel_exact_and_valid(series_dir, tmp_path):
    import highdicom as hd

    folder, _, ball = series_dir
    series = read_series(folder)
    label = ball.copy()
    label[:4, :4, :3] = 3  # a second label, value 3: segments are numbered 1..N
    out = write_seg(
        series.image.with_array(label),
        series,
        tmp_path / "seg.dcm",
        labels={1: "liver", 3: "tumour"},
        model_name="tiny-unet",
    )
    assert dciodvfy_errors(out) == []
    back, names = read_seg_labels(out, series)
    assert names == {1: "liver", 2: "tumour"}
    assert np.array_equal(back.array, np.where(label == 3, 2, label))
    seg = hd.seg.segread(str(out))
    liver, tumour = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED-CT Liver
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    algo = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "tiny-unet" and algo.AlgorithmVersion.startswith("medseg")
    refs = {
        r.ReferencedSOPInstanceUID
        for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert refs == {str(ds.SOPInstanceUID) for ds in series.datasets}
    assert seg.StudyInstanceUID == series.study_uid
    with pytest.raises(MedsegError, match="already exists"):
        write_seg(series.image.with_array(label), series, out, labels={1: "liver"})


def test_label_codes_table_and_fallback(tmp_path):
    assert code_for_label("kidney_left").type[1] == "64033007"
    assert code_for_label("Fetal head").type[2] == "Head"
    assert code_for_label("unheard-of blob").source == "fallback"
    table = tmp_path / "codes.json"
    table.write_text(
        '{"blob": {"category": ["SCT", "91723000", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}}'
    )
    from medseg.dicom import load_code_table

    assert code_for_label("blob", load_code_table(table)).type[1] == "10200004"
    table.write_text('{"blob": {"type": "liver"}}')
    with pytest.raises(MedsegError, match="blob"):
        load_code_table(table)


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


@pytest.mark.integration
def test_shared_jpeg2000_series_reads_like_gdcm():
    folder = shared_dataset("TotalSegmentator_example_CT") / "extras" / "example_ct_dicom"
    series = read_series(folder)
    reference = read_dicom_series(folder)
    assert series.image.shape == (512, 512, 20) and series.image.same_geometry(reference)
    assert np.array_equal(series.image.array, reference.array)
    assert series.datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"


def test_rtstruct_is_valid_and_outlines_the_labels(series_dir, tmp_path):
    from medseg.dicom.rtstruct import rasterize_rtstruct, write_rtstruct

    folder, _, ball = series_dir
    series = read_series(folder)
    label = ball.copy()
    label[1:6, 1:6, 2:5] = 2
    out = write_rtstruct(
        series.image.with_array(label),
        series,
        tmp_path / "rt.dcm",
        labels={1: "liver", 2: "lesion"},
    )
    assert dciodvfy_errors(out) == []
    masks = rasterize_rtstruct(out, series)
    assert set(masks) == {"liver", "lesion"}
    for name, value in (("liver", 1), ("lesion", 2)):
        truth = label == value
        dice = 2 * np.sum(masks[name] & truth) / (masks[name].sum() + truth.sum())
        assert dice > 0.9, (name, dice)  # outlines at the 0.5 iso-line, filled back
