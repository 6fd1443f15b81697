"""The REST service: jobs from NIfTI and DICOM-zip uploads, results, limits, token, OpenAPI."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from dicom_factory import phantom_volume, write_series
from hospital_model import ThresholdPredictor

from medseg.io import Image, read_image, write_image
from medseg.serve import create_app, safe_upload_name

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers.serve import wait_done  # noqa: E402


@pytest.fixture()
def client(tmp_path):
    app = create_app(predictor=ThresholdPredictor(), data_dir=tmp_path / "srv", max_upload_mb=1)
    with TestClient(app) as c:
        yield c


def nifti_bytes(tmp_path, array, spacing=(1.0, 2.0, 2.5)) -> bytes:
    path = write_image(Image(array, spacing, (5.0, -3.0, 7.0)), tmp_path / "in.nii.gz")
    return path.read_bytes()


def test_nifti_job_gives_label_map_and_volumes(client, tmp_path):
    volume, ball = phantom_volume()
    files = {"file": ("case.nii.gz", nifti_bytes(tmp_path, volume), "application/gzip")}
    response = client.post("/jobs", files=files)
    assert response.status_code == 202, response.text
    job = wait_done(client, response.json()["id"])
    assert job["status"] == "done", job["message"]
    label_bytes = client.get(f"/jobs/{job['id']}/result/label").content
    (tmp_path / "label.nii.gz").write_bytes(label_bytes)
    label = read_image(tmp_path / "label.nii.gz")
    assert np.array_equal(label.array, ball)  # threshold 100 separates ball (~300) from noise
    assert label.spacing == (1.0, 2.0, 2.5) and label.origin == (5.0, -3.0, 7.0)
    metrics = client.get(f"/jobs/{job['id']}/result/metrics").json()
    assert metrics["volumes_ml"]["liver"] == pytest.approx(ball.sum() * 5.0 / 1000, abs=1e-4)
    assert metrics["labels"] == {"1": "liver", "2": "lesion"} and metrics["seg"] is False
    assert client.get(f"/jobs/{job['id']}/result/seg").status_code == 404
    assert job["id"] in [j["id"] for j in client.get("/jobs").json()]


def test_dicom_zip_job_returns_a_matching_seg(client, tmp_path):
    from medseg.dicom import read_seg_labels, read_series

    volume, ball = phantom_volume(seed=2)
    write_series(tmp_path / "series", volume)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in (tmp_path / "series").iterdir():
            zf.write(f, f"study/{f.name}")
    files = {"file": ("study.zip", buffer.getvalue(), "application/zip")}
    job = wait_done(client, client.post("/jobs", files=files).json()["id"])
    assert job["status"] == "done", job["message"]
    assert job["result"]["seg"] is True
    (tmp_path / "seg.dcm").write_bytes(client.get(f"/jobs/{job['id']}/result/seg").content)
    back, names = read_seg_labels(tmp_path / "seg.dcm", read_series(tmp_path / "series"))
    assert names == {1: "liver"} and np.array_equal(back.array, ball)


def test_rejects_oversize_traversal_and_unknown_formats(client):
    big = {"file": ("big.nii.gz", b"\0" * (1024 * 1024 + 10), "application/gzip")}
    assert client.post("/jobs", files=big).status_code == 413
    for name in ("../../etc/passwd.nii.gz", "..\\x.nii", "/abs/path.nii", ".hidden.nii"):
        response = client.post("/jobs", files={"file": (name, b"x", "application/gzip")})
        assert response.status_code == 400, name
    assert (
        client.post("/jobs", files={"file": ("notes.txt", b"x", "text/plain")}).status_code == 400
    )
    assert client.get("/jobs/..%2F..%2Fetc").status_code == 404
    assert client.get("/jobs/" + "0" * 32).status_code == 404
    assert client.get("/jobs/" + "0" * 32 + "/result/passwd").status_code == 422


def test_bad_upload_fails_the_job_with_a_message(client, tmp_path):
    response = client.post(
        "/jobs", files={"file": ("broken.nii.gz", b"not nifti", "application/gzip")}
    )
    job = wait_done(client, response.json()["id"])
    assert job["status"] == "failed" and "cannot read" in job["message"]
    assert str(tmp_path) not in job["message"]  # no server path reaches the client
    assert client.get(f"/jobs/{job['id']}/result/label").status_code == 409


def test_token_is_required_when_configured(tmp_path):
    app = create_app(predictor=ThresholdPredictor(), data_dir=tmp_path, token="s3cret")
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200  # liveness stays open
        assert c.get("/jobs").status_code == 401
        assert c.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/static/index.html").status_code == 200  # the viewer page holds no data


def test_queue_is_bounded_and_metrics_count_jobs(tmp_path):
    app = create_app(
        predictor=ThresholdPredictor(delay_s=0.5), data_dir=tmp_path, workers=1, max_pending=1
    )
    volume, _ = phantom_volume(shape=(8, 8, 4))
    files = {"file": ("a.nii.gz", nifti_bytes(tmp_path, volume), "application/gzip")}
    with TestClient(app) as c:
        codes = [c.post("/jobs", files=files).status_code for _ in range(3)]
        assert codes == [202, 202, 503]
        for j in c.get("/jobs").json():
            wait_done(c, j["id"])
        text = c.get("/metrics").text
        assert 'medseg_jobs{status="done"} 2' in text and "medseg_job_seconds_count 2" in text


def test_job_timeout_is_reported(tmp_path):
    app = create_app(
        predictor=ThresholdPredictor(delay_s=0.6), data_dir=tmp_path, job_timeout_s=0.2
    )
    volume, _ = phantom_volume(shape=(8, 8, 4))
    files = {"file": ("a.nii.gz", nifti_bytes(tmp_path, volume), "application/gzip")}
    with TestClient(app) as c:
        job = wait_done(c, c.post("/jobs", files=files).json()["id"])
        assert job["status"] == "timeout"


def test_openapi_schema_and_viewer_are_served(client):
    schema = client.get("/openapi.json").json()
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/result/{kind}", "/health"} <= set(
        schema["paths"]
    )
    page = client.get("/", follow_redirects=True)
    assert page.status_code == 200 and "niivue.umd.js" in page.text
    js = client.get("/static/niivue.umd.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert "BSD" in client.get("/static/NIIVUE-LICENSE.txt").text


def test_safe_upload_name():
    assert safe_upload_name("ct_01.nii.gz") == ("ct_01.nii.gz", ".nii.gz")
    assert safe_upload_name("Study 3.ZIP")[1] == ".zip"


def test_deidentified_dicom_upload_keeps_no_identity(client, tmp_path):
    import pydicom
    from dicom_factory import PATIENT

    volume, _ = phantom_volume(seed=4)
    write_series(tmp_path / "series", volume)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in (tmp_path / "series").iterdir():
            zf.write(f, f.name)
    response = client.post(
        "/jobs",
        files={"file": ("study.zip", buffer.getvalue(), "application/zip")},
        data={"deidentify_input": "true"},
    )
    job = wait_done(client, response.json()["id"])
    assert job["status"] == "done", job["message"]
    seg = pydicom.dcmread(io.BytesIO(client.get(f"/jobs/{job['id']}/result/seg").content))
    text = str(seg)
    assert all(value not in text for value in PATIENT.values())
    original = pydicom.dcmread(next((tmp_path / "series").iterdir()))
    assert seg.StudyInstanceUID != original.StudyInstanceUID
