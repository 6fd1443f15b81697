"""``predict`` with a stored temperature, probabilities, QC CSV and MC-dropout errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers.inference import make_model_dir, write_cases

from medseg.errors import MedsegError
from medseg.inference import Predictor, predict_batch
from medseg.inference.uncertainty import read_probabilities
from medseg.io import read_image


def write_calibration(model_dir, temperature, threshold=None):
    data = {"temperature": temperature}
    if threshold is not None:
        data["qc"] = {"score": "entropy_ratio", "threshold": threshold}
    (model_dir / "calibration.json").write_text(json.dumps(data))


def test_stored_temperature_divides_the_logits(tmp_path):
    model = make_model_dir(tmp_path)
    data = np.random.default_rng(0).normal(size=(1, 20, 18, 17)).astype(np.float32)
    raw = Predictor(model, device="cpu").logits(data)
    write_calibration(model, [2.0])
    scaled = Predictor(model, device="cpu").logits(data)
    assert torch.allclose(scaled, raw / 2.0, atol=1e-5)
    assert Predictor(model, device="cpu", calibrated=False).temperature is None
    write_calibration(model, [1.0, 2.0])  # neither 1 nor one per class (3)
    with pytest.raises(MedsegError, match="calibration.json: 2 temperatures"):
        Predictor(model, device="cpu")


def test_qc_csv_lists_every_case_and_probabilities_are_written(tmp_path):
    model = make_model_dir(tmp_path)
    write_calibration(model, [1.5], threshold=0.0)  # 0: every scored case is flagged
    cases = write_cases(tmp_path / "in", 3)
    out = tmp_path / "out"
    predictor = Predictor(model, device="cpu")
    predict_batch(predictor, cases, out, mirror_axes=(0,), probabilities="nifti", qc=True,
                  uncertainty=True, show_progress=False)  # fmt: skip
    rows = list(csv.DictReader((out / "qc.csv").read_text().splitlines()))
    assert [r["case_id"] for r in rows] == ["case_00", "case_01", "case_02"]
    assert all(r["review"] == "yes" and r["score_name"] == "entropy_ratio" for r in rows)
    probs = read_probabilities(out / "case_00_probabilities.nii.gz")
    label = read_image(out / "case_00.nii.gz").array
    assert probs.shape == (3, *label.shape)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-3)
    assert (out / "case_00_mutual_information.nii.gz").exists()  # 2 members (one flip)
    # a case predicted before without --qc is listed too, as unknown
    (out / "case_00.nii.gz").unlink()
    more = write_cases(tmp_path / "in2", 4)
    predict_batch(predictor, more, out, show_progress=False)
    predict_batch(predictor, more, out, qc=True, show_progress=False)
    rows = {r["case_id"]: r for r in csv.DictReader((out / "qc.csv").read_text().splitlines())}
    assert len(rows) == 4 and rows["case_03"]["review"] == "unknown"


def test_qc_needs_a_threshold_and_mc_dropout_needs_dropout(tmp_path):
    model = make_model_dir(tmp_path)
    cases = write_cases(tmp_path / "in", 1)
    predictor = Predictor(model, device="cpu")
    with pytest.raises(MedsegError, match="no review threshold for --qc"):
        predict_batch(predictor, cases, tmp_path / "out", qc=True, show_progress=False)
    with pytest.raises(MedsegError, match="has no dropout layers") as info:
        predict_batch(predictor, cases, tmp_path / "out", mc_samples=4, show_progress=False)
    assert "\n" not in str(info.value)
