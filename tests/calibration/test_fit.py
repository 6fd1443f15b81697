"""``medseg calibrate`` end to end on a tiny two-fold model: only validation cases are used."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.inference import make_model_dir

from medseg import api
from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.io.dataset import load_dataset
from medseg.io.phantoms import write_phantom_dataset
from medseg.model_folder import ModelFolder, build_network, write_weights
from medseg.planning.plan import read_plan


@pytest.fixture(scope="module")
def two_fold_model(tmp_path_factory):
    """Two folds of a tiny random U-Net over 6 phantoms, without training (seconds)."""
    root = tmp_path_factory.mktemp("calibrate")
    data = write_phantom_dataset(root / "data", num_train=6, num_test=0, shape=(16, 16, 12))
    model = make_model_dir(root / "work")
    spec = load_dataset(data)
    (model / "dataset.json").write_text(json.dumps(spec.to_json()))
    ids = sorted(c.case_id for c in spec.cases)
    splits = [{"train": ids[3:], "val": ids[:3]}, {"train": ids[:3], "val": ids[3:]}]
    (model / "splits.json").write_text(json.dumps(splits))
    torch.manual_seed(1)
    other = build_network(read_plan(model), deep_supervision=False)
    write_weights(model / "fold_1", "best", other.state_dict(), metadata={"network": "unet"})
    return model


def test_calibrate_fits_on_validation_folds_and_predict_applies_it(two_fold_model, tmp_path):
    record = api.calibrate(two_fold_model, target_recall=1.0, show_progress=False)
    splits = json.loads((two_fold_model / "splits.json").read_text())
    validation = sorted(c for fold in splits for c in fold["val"])
    assert sorted(r["case_id"] for r in record["qc"]["cases"]) == validation
    assert record["fitted_on"]["cases"] == len(validation) == 6
    stored = ModelFolder.open(two_fold_model).calibration
    assert stored.temperature == tuple(record["temperature"]) and stored.temperature[0] > 0
    assert stored.qc_threshold == record["qc"]["threshold"]
    assert record["qc"]["recall"] == 1.0
    assert (two_fold_model / "calibration_report.html").read_text().count("<img") == 3
    with pytest.raises(MedsegError, match="already exists"):
        api.calibrate(two_fold_model, show_progress=False)
    with pytest.raises(MedsegError, match="unknown fit region"):
        api.calibrate(two_fold_model, fit_region="lungs", overwrite=True, show_progress=False)
    # the CLI: predict --qc with the stored threshold lists every case
    images = sorted((two_fold_model.parents[1] / "data" / "imagesTr").glob("*.nii.gz"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).write_bytes(image.read_bytes())
    code = main(["--quiet", "predict", str(two_fold_model), str(inputs), "-o",
                 str(tmp_path / "out"), "--qc", "--probabilities", "npz"])  # fmt: skip
    assert code == 0
    lines = (tmp_path / "out" / "qc.csv").read_text().splitlines()
    assert len(lines) == 1 + len(images)
    assert len(list((tmp_path / "out").glob("*_probabilities.npz"))) == len(images)
