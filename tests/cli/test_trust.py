"""``medseg calibrate`` / ``explain`` / ``predict --mc-dropout``: one-line errors, exit code 2."""

from __future__ import annotations

import numpy as np
from helpers.inference import make_model_dir, write_cases

from medseg.cli.main import main
from medseg.io import Image, write_image


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_trust_commands_fail_in_one_line(tmp_path, capsys):
    model = make_model_dir(tmp_path)
    cases = write_cases(tmp_path / "in", 1)
    image = str(cases / "case_00.nii.gz")
    err = one_line_error(capsys, ["explain", str(model), image, "--class", "spleen",
                                  "-o", str(tmp_path / "x")])  # fmt: skip
    assert "class 'spleen' is not in the model" in err
    other = write_image(Image(np.ones((5, 5, 5), np.uint8), (1.0,) * 3), tmp_path / "m.nii.gz")
    err = one_line_error(capsys, ["explain", str(model), image, "--class", "1", "--region",
                                  str(other), "-o", str(tmp_path / "x")])  # fmt: skip
    assert "another geometry than the image" in err
    err = one_line_error(capsys, ["--device", "cpu", "predict", str(model), str(cases), "-o",
                                  str(tmp_path / "o"), "--mc-dropout", "3"])  # fmt: skip
    assert "no dropout layers" in err
    err = one_line_error(capsys, ["calibrate", str(model)])
    assert "splits.json: missing" in err
