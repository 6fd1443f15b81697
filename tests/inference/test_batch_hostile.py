"""`medseg predict` on hostile inputs: one-line errors naming the file, exit 2, no output.

The same checked readers serve the CLI, the API, the service and the PACS path (see
tests/io/test_sanity.py); here the whole command is run.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import phantom_volume, write_series
from helpers.inference import make_model_dir

from medseg.cli.main import main
from medseg.io import Image, read_image, write_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("hostile"))


def predict(model_dir, source, out, *extra):
    return main(["--quiet", "predict", str(model_dir), str(source), "-o", str(out), *extra])


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_dicom_gap_is_refused_by_predict(model_dir, tmp_path, capsys):
    volume, _ = phantom_volume(shape=(16, 16, 6))
    write_series(tmp_path / "series", volume, z_positions=[0, 2.5, 5, 10, 12.5, 15])
    assert predict(model_dir, tmp_path / "series", tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert "missing slice(s) (1 missing)" in line and str(tmp_path / "series") in line
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_nan_at_prediction_is_refused_with_the_file_named(model_dir, tmp_path, capsys):
    array = np.random.default_rng(0).normal(size=(20, 18, 17)).astype(np.float32)
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    path = write_image(Image(array, (1.0, 1.0, 1.0)), tmp_path / "in" / "case_00.nii.gz")
    assert predict(model_dir, tmp_path / "in", tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "2 voxel(s) are NaN or infinite" in line
    assert not (tmp_path / "out" / "case_00.nii.gz").exists()
    assert predict(model_dir, tmp_path / "in", tmp_path / "out", "--nan-policy", "zero") == 0
    err = capsys.readouterr().err
    assert f"warning: {path}: 2 NaN or infinite voxel(s) set to 0" in err
    assert read_image(tmp_path / "out" / "case_00.nii.gz").shape == (20, 18, 17)


def test_channel_count_mismatch_names_the_file(model_dir, tmp_path, capsys):
    two = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((17, 18, 20), np.float32))] * 2)
    path = tmp_path / "in" / "two.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(two, str(path))
    assert predict(model_dir, path, tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "expects 1 channel(s), got 2" in line


def test_2d_input_to_a_3d_model_names_the_file(model_dir, tmp_path, capsys):
    path = write_image(Image(np.zeros((20, 18), np.uint8), (1.0, 1.0)), tmp_path / "slice.png")
    assert predict(model_dir, path, tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "expects 3D images, got 2D" in line


def test_hostile_header_is_refused_by_predict(model_dir, tmp_path, capsys):
    path = tmp_path / "bad.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 60000 60000 60000\nElementType = MET_FLOAT\n"
        b"ElementDataFile = LOCAL\n" + b"\0" * 64
    )
    assert predict(model_dir, path, tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "limit" in line
