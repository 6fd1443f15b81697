"""The command line: one-line errors naming the file, non-zero exit codes, no partial outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers.cli import run_cli

from medseg.cli.main import main
from medseg.io import Image, write_image


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_dataset(tmp_path):
    proc = run_cli("plan", str(tmp_path / "nowhere"), "-w", str(tmp_path / "w"))
    assert_one_line_error(proc, "nowhere", "not found")
    assert not (tmp_path / "w" / "plan.json").exists()


def test_check_reports_problems_and_exits_nonzero(tmp_path, capsys):
    root = tmp_path / "ds"
    write_image(Image(np.ones((4, 4, 4), np.float32), (1, 1, 1)), root / "imagesTr" / "a.nii.gz")
    write_image(Image(np.zeros((4, 4, 4), np.uint8), (1, 1, 1)), root / "labelsTr" / "a.nii.gz")
    write_image(Image(np.ones((4, 4, 4), np.float32), (1, 1, 1)), root / "imagesTr" / "b.nii.gz")
    (root / "labelsTr" / "c.nii.gz").write_bytes(b"not an image")
    (root / "dataset.json").write_text(
        '{"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "x"}}'
    )
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "b.nii.gz" in out and "c.nii.gz" in out


def test_predict_refuses_to_overwrite_and_names_bad_model(tmp_path):
    proc = run_cli("predict", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, str(tmp_path), "plan.json")


def test_evaluate_names_missing_cases(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    label = Image(np.zeros((5, 5, 5), np.uint8), (1, 1, 1))
    write_image(label, pred / "a.nii.gz")
    write_image(label, ref / "a.nii.gz")
    write_image(label, ref / "b.nii.gz")
    proc = run_cli("evaluate", str(pred), str(ref), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "b")
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_plan_refuses_to_overwrite_an_edited_plan(phantom_dataset, tmp_path):
    assert run_cli("plan", str(phantom_dataset), "-w", str(tmp_path)).returncode == 0
    plan = tmp_path / "plan.json"
    plan.write_text(plan.read_text().replace('"batch_size": ', '"batch_size": 1'))
    before = plan.read_text()
    proc = run_cli("plan", str(phantom_dataset), "-w", str(tmp_path))
    assert_one_line_error(proc, "plan.json", "--overwrite")
    assert plan.read_text() == before


def test_demo_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    proc = run_cli("demo", "-w", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path), "--overwrite")
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_help_lists_every_command():
    proc = run_cli("--help")
    for command in ("check", "plan", "preprocess", "train", "predict", "evaluate", "run", "demo"):
        assert command in proc.stdout
    assert Path(sys.executable).exists()
