"""Registration jobs of the REST service: a pair made by construction, results, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hospital_model import ThresholdPredictor

from medseg.io import Image, read_image, write_image
from medseg.serve import create_app

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers.serve import SHAPE, SHIFT, SPACING, blobs, wait_done  # noqa: E402


def volume_bytes(tmp_path, array, name="v.nii.gz", spacing=SPACING) -> bytes:
    origin = (4.0, -2.0, 9.0)[: array.ndim]
    return write_image(Image(array, spacing, origin), tmp_path / name).read_bytes()


def fetch_image(client, url, tmp_path, name) -> Image:
    response = client.get(url)
    assert response.status_code == 200, response.text
    (tmp_path / name).write_bytes(response.content)
    return read_image(tmp_path / name)


@pytest.fixture()
def client(tmp_path):
    app = create_app(predictor=ThresholdPredictor(), data_dir=tmp_path / "srv", max_upload_mb=1)
    with TestClient(app) as c:
        yield c


@pytest.fixture()
def pair(tmp_path):
    (fixed, fixed_labels), (moving, moving_labels) = blobs(), blobs(SHIFT)
    return {
        "fixed": ("fixed.nii.gz", volume_bytes(tmp_path, fixed, "f.nii.gz"), "application/gzip"),
        "moving": (
            "moving.nrrd",
            volume_bytes(tmp_path, moving, "m.nrrd"),
            "application/octet-stream",
        ),
        "moving_labels": (
            "moving_labels.nii.gz",
            volume_bytes(tmp_path, moving_labels, "ml.nii.gz"),
            "application/gzip",
        ),
        "_arrays": (fixed, moving, fixed_labels),
    }


def upload(pair, *roles):
    return {r: pair[r] for r in roles}


def test_rigid_job_recovers_the_translation(client, pair, tmp_path):
    import SimpleITK as sitk

    fixed, moving, fixed_labels = pair["_arrays"]
    response = client.post(
        "/jobs/register",
        files=upload(pair, "fixed", "moving", "moving_labels"),
        data={"method": "rigid"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "register"
    job = wait_done(client, response.json()["id"])
    assert job["status"] == "done", job["message"]
    assert job["source"] == "moving.nrrd -> fixed.nii.gz"
    base = f"/jobs/{job['id']}/result"

    shown = fetch_image(client, f"{base}/image", tmp_path, "fixed_back.nii.gz")
    assert np.allclose(shown.array, fixed) and shown.spacing == SPACING
    warped = fetch_image(client, f"{base}/warped", tmp_path, "warped.nii.gz")
    assert warped.shape == fixed.shape and warped.spacing == SPACING
    mse_before = np.mean((moving - fixed) ** 2)
    mse_after = np.mean((warped.array - fixed) ** 2)
    assert mse_after * 5 < mse_before, (mse_before, mse_after)

    labels = fetch_image(client, f"{base}/warped_labels", tmp_path, "wl.nii.gz").array
    dice = 2 * np.sum((labels == 1) & (fixed_labels == 1)) / (labels.sum() + fixed_labels.sum())
    assert dice > 0.9, dice

    transform = client.get(f"{base}/transform")
    assert transform.status_code == 200 and "Euler3DTransform" in transform.text
    (tmp_path / "t.tfm").write_text(transform.text)
    tx = sitk.ReadTransform(str(tmp_path / "t.tfm"))
    # fixed -> moving points: the moving image is the fixed one shifted by +SHIFT voxels
    centre = shown.index_to_world((np.asarray(SHAPE) - 1) / 2)
    moved = np.asarray(tx.TransformPoint(tuple(float(c) for c in centre)))
    voxels = (moved - centre) / np.asarray(SPACING)
    assert np.allclose(voxels, SHIFT, atol=0.5), voxels

    metrics = client.get(f"{base}/metrics").json()
    assert metrics == job["result"]
    assert metrics["registration"] == {"fixed": "image", "warped": "warped"}
    assert metrics["method"] == "rigid" and metrics["metric"] == "mattes"
    assert metrics["quality"]["folding_percent"] == 0.0
    assert metrics["quality"]["jacobian_min"] == pytest.approx(1.0)
    assert metrics["ncc_after"] > 0.99 > metrics["ncc_before"]
    assert np.allclose(np.asarray(metrics["linear_part"]["translation"]) / SPACING, SHIFT, atol=0.5)
    assert {"warped", "warped_labels", "transform"} <= set(metrics["results"])
    assert metrics["fixed"] == "fixed.nii.gz" and metrics["moving_labels"] == "moving_labels.nii.gz"
    assert str(tmp_path) not in str(metrics)  # no server path in the results
    assert client.get(f"{base}/jacobian").status_code == 404  # linear: no map
    assert client.get(f"{base}/label").status_code == 404


def test_bspline_job_gives_a_field_transform_and_jacobian(client, pair, tmp_path):
    response = client.post(
        "/jobs/register", files=upload(pair, "fixed", "moving"), data={"method": "bspline"}
    )
    job = wait_done(client, response.json()["id"])
    assert job["status"] == "done", job["message"]
    base = f"/jobs/{job['id']}/result"
    quality = job["result"]["quality"]
    assert quality["folding_percent"] < 1.0 and quality["jacobian_min"] > 0
    assert job["result"]["transform_file"] == "transform.h5"
    transform = client.get(f"{base}/transform")
    assert transform.status_code == 200 and transform.content[:4] == b"\x89HDF"
    jac = fetch_image(client, f"{base}/jacobian", tmp_path, "jac.nii.gz")
    assert jac.shape == SHAPE
    assert client.get(f"{base}/warped_labels").status_code == 404  # none uploaded


def test_bad_pairs_are_refused_with_a_clear_message(client, pair, tmp_path):
    flat = volume_bytes(tmp_path, blobs()[0][:, :, 10], "flat.nii.gz", spacing=SPACING[:2])
    files = upload(pair, "fixed") | {"moving": ("slice.nii.gz", flat, "application/gzip")}
    response = client.post("/jobs/register", files=files)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "slice.nii.gz" in detail and "2D" in detail and "3D" in detail, detail

    for name in ("../../etc/passwd.nii.gz", "..\\fixed.nii", "/abs/fixed.nii.gz", ".x.nii"):
        files = upload(pair, "moving") | {"fixed": (name, pair["fixed"][1], "application/gzip")}
        response = client.post("/jobs/register", files=files)
        assert response.status_code == 400, name
        assert "refused file name" in response.json()["detail"]
    files = upload(pair, "fixed") | {"moving": ("study.zip", b"PK", "application/zip")}
    response = client.post("/jobs/register", files=files)
    assert response.status_code == 400 and "registration takes" in response.json()["detail"]
    files = upload(pair, "fixed") | {"moving": ("m.nii.gz", b"not nifti", "application/gzip")}
    response = client.post("/jobs/register", files=files)
    assert response.status_code == 400 and "m.nii.gz: cannot read" in response.json()["detail"]
    small = volume_bytes(tmp_path, np.zeros((8, 8, 8), np.uint8), "s.nii.gz")
    files = upload(pair, "fixed", "moving") | {"moving_labels": ("l.nii.gz", small, "x/y")}
    response = client.post("/jobs/register", files=files)
    assert response.status_code == 400 and "do not match" in response.json()["detail"]
    response = client.post(
        "/jobs/register", files=upload(pair, "fixed", "moving"), data={"method": "magic"}
    )
    assert response.status_code == 422
    big = {"fixed": ("big.nii.gz", b"\0" * (1024 * 1024 + 10), "application/gzip")}
    assert client.post("/jobs/register", files=upload(pair, "moving") | big).status_code == 413
    assert client.get("/jobs").json() == []  # refused requests leave no job behind


def test_a_failing_registration_names_the_client_files(client, pair, tmp_path):
    constant = volume_bytes(tmp_path, np.full(SHAPE, 7.0, np.float32), "c.nii.gz")
    files = upload(pair, "fixed") | {"moving": ("flat_moving.nii.gz", constant, "x/y")}
    job = wait_done(client, client.post("/jobs/register", files=files).json()["id"])
    assert job["status"] == "failed"
    assert "flat_moving.nii.gz" in job["message"] and "constant" in job["message"]
    assert str(tmp_path) not in job["message"] and "/" not in job["message"]
    assert client.get(f"/jobs/{job['id']}/result/warped").status_code == 409


def test_openapi_documents_the_registration_endpoint(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/jobs/register"]["post"]
    body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    ref = body["$ref"].rsplit("/", 1)[-1]
    props = schema["components"]["schemas"][ref]["properties"]
    assert {"fixed", "moving", "method", "metric", "moving_labels"} <= set(props)
    kinds = schema["components"]["schemas"]["ResultKind"]["enum"]
    assert {"warped", "warped_labels", "transform", "jacobian"} <= set(kinds)
