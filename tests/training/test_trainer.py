"""Tiny end-to-end runs (2D and 3D) and resume after a killed training."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_split

from medseg import api
from medseg.io import read_image
from medseg.training import TrainConfig, make_folds
from medseg.transforms import AugmentConfig


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


FAST = TrainConfig(max_epochs=2, iterations_per_epoch=4, batch_size=2, seed=1)


def test_make_folds_partition_the_cases():
    ids = [f"c{i}" for i in range(11)]
    folds = make_folds(ids, num_folds=3, seed=4)
    assert sorted(sum((f["val"] for f in folds), [])) == sorted(ids)
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and len(f["train"]) + len(f["val"]) == 11
    assert make_folds(ids, num_folds=3, seed=4) == folds


def test_2d_train_predict_evaluate(disk_dataset, tmp_path):
    """A plain 2D dataset (0/255 PNG masks) learns a bright disk to a real Dice."""
    split = write_split(
        tmp_path / "split.json",
        [f"case_{i:02d}" for i in range(7)],
        ["case_07", "case_08", "case_09"],
    )
    config = replace(FAST, max_epochs=4, iterations_per_epoch=15, batch_size=4, learning_rate=0.02)
    summary = api.run(
        disk_dataset, tmp_path / "work", config=config, split_file=split, show_progress=False
    )
    dice = summary["folds"]["0"]["validation"]["mean_foreground_dice"]
    assert dice > 0.8
    pred = read_image(tmp_path / "work" / "validation" / "fold_0" / "predictions" / "case_07.png")
    ref = read_image(disk_dataset / "masks" / "case_07.png")
    assert pred.shape == ref.shape and set(np.unique(pred.array)) <= {0, 1}
    for name in ("metrics.csv", "summary.json", "report.html"):
        assert (tmp_path / "work" / "evaluation" / "fold_0" / name).exists()
    assert (tmp_path / "work" / "model" / "fold_0" / "curves.png").exists()


def test_3d_train_predict_evaluate_keeps_geometry(phantom_dataset, tmp_path):
    summary = api.run(
        phantom_dataset, tmp_path / "work", config=FAST, folds=[0], show_progress=False
    )
    assert "test" in summary  # labelsTs present: held-out cases were predicted and scored
    rows = read_csv(tmp_path / "work" / "evaluation" / "test" / "metrics.csv")
    assert {r["label"] for r in rows} == {"1", "2"} and len(rows) == 4
    pred = read_image(tmp_path / "work" / "test" / "predictions" / "phantom_008.nii.gz")
    ref = read_image(phantom_dataset / "labelsTs" / "phantom_008.nii.gz")
    assert pred.same_geometry(ref, atol=1e-6)
    plan = json.loads((tmp_path / "work" / "plan.json").read_text())
    assert plan["configuration"] == "3d"
    log = read_csv(tmp_path / "work" / "model" / "fold_0" / "log.csv")
    assert [int(r["epoch"]) for r in log] == [0, 1]


def test_edited_plan_is_read_back(phantom_dataset, tmp_path):
    api.plan(phantom_dataset, tmp_path, show_progress=False)
    path = tmp_path / "plan.json"
    plan = json.loads(path.read_text())
    plan["batch_size"] = 3
    plan["network"]["features"] = [8, 16, 32, 64][: len(plan["network"]["strides"])]
    path.write_text(json.dumps(plan))
    config = replace(FAST, max_epochs=1, batch_size=None, augmentation=AugmentConfig(enabled=False))
    (result,) = api.train(phantom_dataset, tmp_path, config=config, show_progress=False)
    checkpoint = torch.load(Path(result.fold_dir) / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["task"]["plan"]["batch_size"] == 3
    assert checkpoint["model"]["encoder.0.0.0.weight"].shape[0] == 8
    assert result.samples_per_second == pytest.approx(result.iterations_per_second * 3, rel=0.01)


def test_time_budget_ends_training_cleanly(disk_dataset, tmp_path):
    config = replace(FAST, max_epochs=1000, time_budget_minutes=0.25)
    start = time.perf_counter()
    (result,) = api.train(disk_dataset, tmp_path, config=config, show_progress=False)
    assert result.stopped_because == "time_budget"
    assert time.perf_counter() - start < 0.25 * 60 + 20
    assert (Path(result.fold_dir) / "weights_best.safetensors").exists()
    assert (Path(result.fold_dir) / "checkpoint_last.pt").exists()
    # "auto" became AdamW at 3e-3 under the budget, and the saved config says so.
    saved = json.loads((Path(result.fold_dir) / "train_config.json").read_text())
    assert (saved["optimizer"], saved["learning_rate"]) == ("adamw", 3e-3)
    first = read_csv(Path(result.fold_dir) / "log.csv")[0]
    assert 0 < float(first["learning_rate"]) <= 3e-3


def test_auto_optimizer_is_sgd_without_a_time_budget():
    assert (TrainConfig().resolved_optimizer(), TrainConfig().resolved_learning_rate()) == (
        "sgd",
        0.01,
    )
    budgeted = TrainConfig(time_budget_minutes=30)
    assert (budgeted.resolved_optimizer(), budgeted.resolved_learning_rate()) == ("adamw", 3e-3)
    forced = replace(budgeted, optimizer="sgd", learning_rate=0.02)
    assert (forced.resolved_optimizer(), forced.resolved_learning_rate()) == ("sgd", 0.02)


def test_resume_after_kill(disk_dataset, tmp_path):
    """SIGKILL a training process, start it again: it continues from the last checkpoint."""
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "medseg.cli.main",
        "--quiet",
        "train",
        str(disk_dataset),
        "-w",
        str(work),
        "--epochs",
        "6",
        "--iterations-per-epoch",
        "3",
        "--batch-size",
        "2",
        "--num-folds",
        "2",
    ]
    log_path = work / "model" / "fold_0" / "log.csv"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (
            log_path.exists()
            and len(log_path.read_text().splitlines()) >= 3
            and proc.poll() is None
        ):
            break
        if proc.poll() is not None:
            pytest.fail(
                f"training ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
            )
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_rows = len(read_csv(log_path))
    assert 2 <= killed_rows < 6
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    result = json.loads((work / "model" / "fold_0" / "train_result.json").read_text())
    assert result["epochs"] == 6
    epochs = [int(r["epoch"]) for r in read_csv(log_path)]
    assert epochs == list(range(6))  # no epoch lost or repeated
