"""Co-registration of a channel on another grid with a known shift: the aligner recovers it,
and `medseg check` / `medseg preprocess --coregister` handle such a dataset end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers.multimodal import t1_image, t2_image, write_two_channel_dataset

from medseg import api
from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.io.check import CHANNEL_GRID, require_clean
from medseg.io.dataset import load_dataset
from medseg.io.files import read_image
from medseg.registration.coregister import channel_aligner

SHIFT = np.array([1.6, -1.2, 0.9])  # mm: T2(p) shows the anatomy at p + SHIFT


def mean_error_voxels(transform: sitk.Transform, shift: np.ndarray, image) -> float:
    """Mean distance (T1 voxels, 1 mm) between transform(q) and the truth q - shift."""
    index = np.stack(np.meshgrid(*[np.arange(0, s, 3) for s in image.shape], indexing="ij"), -1)
    points = image.index_to_world(index.reshape(-1, 3))
    found = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points])
    return float(np.linalg.norm(found - (points - shift), axis=1).mean())


def test_rigid_alignment_recovers_a_known_shift_across_contrasts_and_grids():
    t1, t2 = t1_image(), t2_image(SHIFT)
    alignment = channel_aligner("rigid")(t1, t2)
    assert alignment.accepted and alignment.metric_after < alignment.metric_before
    assert mean_error_voxels(sitk.Transform(3, sitk.sitkIdentity), SHIFT, t1) > 2.0
    assert mean_error_voxels(alignment.transform, SHIFT, t1) < 0.5


def test_an_aligned_channel_keeps_the_header_alignment_and_header_mode_registers_nothing():
    t1, t2 = t1_image(), t2_image()
    alignment = channel_aligner("rigid")(t1, t2)
    transform = alignment.transform if alignment.accepted else None
    if transform is not None:  # a registration that barely moves is fine too
        assert mean_error_voxels(transform, np.zeros(3), t1) < 0.5
    assert channel_aligner("header") is None
    with pytest.raises(MedsegError, match="unknown co-registration"):
        channel_aligner("bspline")


def test_check_coregister_train_with_dropout_and_predict_without_t2(tmp_path: Path, capsys):
    raw = write_two_channel_dataset(tmp_path / "raw", shifts=[SHIFT, SHIFT * -0.5])
    report = api.check(raw)
    grid = [p for p in report.errors if p.kind == CHANNEL_GRID]
    assert grid and len(grid) == len(report.errors)
    assert all("_0001.nii.gz" in p.path and "--coregister" in p.message for p in grid)
    assert main(["check", str(raw)]) == 1
    assert "channel 1 shape (22, 22, 14) differs" in capsys.readouterr().out
    with pytest.raises(MedsegError, match="channel 1"):
        require_clean(raw)
    assert require_clean(raw, allow_channel_grids=True).num_channels == 2

    work = tmp_path / "work"
    assert main(["--quiet", "preprocess", str(raw), "-w", str(work), "--coregister"]) == 0
    coregistered = work / "coregistered"
    assert api.check(coregistered).ok
    assert (work / "plan.json").is_file()
    t1 = t1_image()
    for case, shift in (("case_000", SHIFT), ("case_001", SHIFT * -0.5)):
        transform = sitk.ReadTransform(str(coregistered / "transforms" / f"{case}_0001.tfm"))
        assert mean_error_voxels(transform, shift, t1) < 0.5
    assert len(load_dataset(coregistered).cases) == 2

    # the user story goes on: train with modality dropout, predict without T2 (a tiny network)
    plan = json.loads((work / "plan.json").read_text())
    network = plan["network"]
    network.update(
        features=[4, 8], strides=network["strides"][:2], kernel_sizes=network["kernel_sizes"][:2]
    )
    plan.update(patch_size=[16, 16, 16], batch_size=2)
    (work / "plan.json").write_text(json.dumps(plan))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["case_000"], "val": ["case_001"]}))
    train = ["--quiet", "--device", "cpu", "train", str(coregistered), "-w", str(work)]
    options = ["--split", str(split), "--epochs", "1", "--iterations-per-epoch", "2"]
    assert main([*train, *options, "--model", "late_fusion", "--modality-dropout", "0.5"]) == 0
    record = json.loads((work / "model" / "fold_0" / "train_config.json").read_text())
    assert record["modality_dropout"] == 0.5 and record["model"] == "late_fusion"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case_001_0000.nii.gz").symlink_to(coregistered / "imagesTr" / "case_001_0000.nii.gz")
    out = tmp_path / "pred"
    assert (
        main(["--quiet", "--device", "cpu", "predict", str(work), str(inputs), "-o", str(out)]) == 0
    )
    assert read_image(out / "case_001.nii.gz").same_geometry(t1)
