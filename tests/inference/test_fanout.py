"""Batch inference fanned out: local processes and Ray write the same labels as one
process; a failed case does not stop the batch; a killed run resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.inference import make_model_dir, write_cases

from medseg import api
from medseg.errors import MedsegError
from medseg.inference.fanout import predict_fanout
from medseg.io import read_image


def labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_image(p).array for p in sorted(folder.glob("case_*.nii.gz"))}


def test_ray_and_local_write_the_labels_of_one_process(tmp_path):
    model = make_model_dir(tmp_path)
    cases = write_cases(tmp_path / "in", 3)
    api.predict(model, cases, tmp_path / "one", device="cpu", show_progress=False)
    local = predict_fanout(
        model, cases, tmp_path / "local", engine="local", workers=2, threads=1, device="cpu",
        show_progress=False,
    )  # fmt: skip
    ray = predict_fanout(
        model, cases, tmp_path / "ray", engine="ray", workers=2, threads=1, device="cpu",
        show_progress=False,
    )  # fmt: skip
    assert not local.failures and not ray.failures
    assert len(ray.workers) == 2  # cases go to every actor (a local pool picks freely)
    reference = labels(tmp_path / "one")
    assert len(reference) == 3
    for got in (labels(tmp_path / "local"), labels(tmp_path / "ray")):
        assert got.keys() == reference.keys()
        for name in reference:
            np.testing.assert_array_equal(got[name], reference[name])


def test_a_failed_case_is_reported_and_the_batch_goes_on(tmp_path):
    model = make_model_dir(tmp_path)
    cases = write_cases(tmp_path / "in", 3)
    (cases / "case_01.nii.gz").write_bytes(b"not an image")  # unreadable
    with pytest.raises(MedsegError, match="1 case\\(s\\) failed \\(case_01\\)"):
        api.predict(
            model, cases, tmp_path / "out", device="cpu", engine="local", num_workers=2,
            show_progress=False,
        )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").glob("case_*")) == [
        "case_00.nii.gz",
        "case_02.nii.gz",
    ]
    assert "case_01" in (tmp_path / "out" / "failures.json").read_text()


def test_a_killed_run_resumes_without_redoing_finished_cases(tmp_path):
    model = make_model_dir(tmp_path)
    cases = write_cases(tmp_path / "in", 6, shape=(40, 40, 32))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli.main", "--quiet", "--device", "cpu", "predict",
         str(model), str(cases), "-o", str(out), "--engine", "local", "--workers", "1"],
        start_new_session=True,  # its own process group: the kill takes the worker too
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("case_*.nii.gz")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("case_*.nii.gz")}
    assert 1 <= len(finished) < 6
    result = predict_fanout(
        model, cases, out, engine="local", workers=2, device="cpu", show_progress=False
    )
    assert result.skipped == len(finished)
    assert len(result.predictions) == 6 - len(finished)
    assert {p.case_id + ".nii.gz" for p in result.predictions}.isdisjoint(finished)
    for name, mtime in finished.items():  # not written again
        assert (out / name).stat().st_mtime_ns == mtime
    assert len(list(out.glob("case_*.nii.gz"))) == 6 and not list(out.glob(".tmp-*"))
