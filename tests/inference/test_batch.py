"""Prediction with channels missing (issue 22): any non-empty subset of a model's channels
when it was trained with modality dropout, a one-line refusal naming the channel otherwise."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from helpers.multimodal import make_two_channel_model_dir, t1_image

from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.inference import Predictor, predict_batch
from medseg.inference.batch import channel_number, select_channels
from medseg.io import Image, write_image


def case_channels() -> list[Image]:
    t1 = t1_image(shape=(20, 18, 16))
    t2 = t1.with_array((1000 - t1.array).astype(np.float32))
    return [t1, t2]


def write_case(folder: Path, case: str, channels: list[int]) -> None:
    images = case_channels()
    for c in channels:
        write_image(images[c], folder / f"{case}_{c:04d}.nii.gz")


@pytest.mark.parametrize("network", ["late_fusion", "unet"])
def test_a_model_trained_with_dropout_predicts_with_every_non_empty_subset(tmp_path, network):
    predictor = Predictor(
        make_two_channel_model_dir(tmp_path, network=network), device="cpu", num_threads=1
    )
    channels = case_channels()
    names = ("T1", "T2")
    for k in (1, 2):
        for kept in itertools.combinations(range(2), k):
            missing = [names[c] for c in range(2) if c not in kept]
            given = [channels[c] for c in kept]
            data, _ = predictor.prepare(given, missing=missing)
            for c in range(2):  # a missing channel is zero after normalization
                assert (data[c] == 0).all() == (c not in kept)
            label, _ = predictor.predict_case(given, missing=missing)
            assert label.shape == channels[0].shape and label.array.max() <= 1
            assert label.same_geometry(given[0])


def test_missing_channels_by_name_number_or_absent_file(tmp_path):
    model_dir = make_two_channel_model_dir(tmp_path)
    inputs = tmp_path / "in"
    write_case(inputs, "full", [0, 1])
    write_case(inputs, "t1only", [0])
    write_case(inputs, "t2only", [1])
    predictor = Predictor(model_dir, device="cpu", num_threads=1)
    results = predict_batch(predictor, inputs, tmp_path / "out", show_progress=False)
    assert sorted(r.case_id for r in results) == ["full", "t1only", "t2only"]
    (inputs / "t2only_0001.nii.gz").unlink()
    results = predict_batch(
        predictor, inputs, tmp_path / "out2", missing=["t2"], show_progress=False
    )  # names match case-insensitively
    assert len(results) == 2
    with pytest.raises(MedsegError, match="every channel"):  # t1only without T1
        predict_batch(predictor, inputs, tmp_path / "out3", missing=["T1"], show_progress=False)
    assert predictor.missing_channels(["1"]) == (1,)
    with pytest.raises(MedsegError, match="'FLAIR' is not a channel of the model"):
        predictor.missing_channels(["FLAIR"])
    with pytest.raises(MedsegError, match="every channel"):
        predictor.missing_channels(["T1", "T2"])


def test_select_channels_reads_what_is_there():
    assert channel_number(Path("a/case_0003.nii.gz")) == 3
    assert channel_number(Path("a/case.nii.gz")) is None


def test_select_channels_of_files(tmp_path):
    write_case(tmp_path, "c", [1])
    channels, absent = select_channels([tmp_path / "c_0001.nii.gz"], 2)
    assert len(channels) == 1 and absent == (0,)
    write_case(tmp_path, "d", [0, 1])
    files = [tmp_path / "d_0000.nii.gz", tmp_path / "d_0001.nii.gz"]
    channels, absent = select_channels(files, 2, (0,))
    assert absent == (0,) and np.array_equal(channels[0].array, case_channels()[1].array)


def test_a_model_without_modality_dropout_refuses_a_missing_channel(tmp_path, capsys):
    model_dir = make_two_channel_model_dir(tmp_path, network="unet", modality_dropout=0.0)
    predictor = Predictor(model_dir, device="cpu", num_threads=1)
    with pytest.raises(MedsegError, match="channel 'T2' is missing .* not trained"):
        predictor.predict_case(case_channels()[:1], missing=["T2"])
    inputs = tmp_path / "in"
    write_case(inputs, "t1only", [0])
    with pytest.raises(MedsegError, match="channel 'T2' is missing"):
        predict_batch(predictor, inputs, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work
    full = tmp_path / "full"
    write_case(full, "case", [0, 1])
    code = main(
        ["--quiet", "--device", "cpu", "predict", str(model_dir), str(full),
         "-o", str(tmp_path / "cli"), "--missing", "T2"]
    )  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "channel 'T2' is missing" in lines[0] and "--modality-dropout" in lines[0]
    # all channels present: it predicts as before
    assert len(predict_batch(predictor, full, tmp_path / "ok", show_progress=False)) == 1
