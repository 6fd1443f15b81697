"""The service's guard: per-client rate limits, a request log without patient data, TLS, and
bounded memory over many jobs."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
import zipfile

import numpy as np
import pytest
from dicom_factory import PATIENT, phantom_volume, write_series
from helpers.reliability import free_port
from hospital_model import ThresholdPredictor

from medseg.errors import MedsegError
from medseg.io import Image, write_image
from medseg.serve import create_app
from medseg.serve.guard import RateLimiter, RequestLog, tls_options

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers.serve import wait_done  # noqa: E402


def test_token_bucket_allows_bursts_then_the_rate():
    limiter = RateLimiter(60, burst=3)  # one a second
    assert [limiter.allow("a", now=0.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.allow("a", now=0.0) == pytest.approx(1.0)
    assert limiter.allow("b", now=0.0) == 0  # per client
    assert limiter.allow("a", now=1.01) == 0
    small = RateLimiter(60, burst=1, max_clients=2)
    for client in "xyz":
        small.allow(client, now=0.0)
    assert len(small._buckets) == 2  # bounded memory


def test_service_answers_429_beyond_the_job_rate(tmp_path):
    app = create_app(
        predictor=ThresholdPredictor(), data_dir=tmp_path / "srv", job_rate_limit_per_minute=6
    )
    data = write_image(Image(np.zeros((4, 4, 4), np.int16), (1.0,) * 3), tmp_path / "a.nii.gz")
    with TestClient(app) as client:
        codes = []
        for _ in range(4):  # a burst of 6/4 = 1.5 -> one job, then 429
            files = {"file": ("a.nii.gz", data.read_bytes(), "application/gzip")}
            codes.append(client.post("/jobs", files=files))
        assert codes[0].status_code == 202
        refused = [r for r in codes if r.status_code == 429]
        assert refused and int(refused[0].headers["retry-after"]) >= 1
        assert client.get("/health").status_code == 200  # never limited
        assert "medseg_rate_limited_total" in client.get("/metrics").text


def test_request_log_never_holds_patient_names_or_ids(tmp_path):
    volume, _ = phantom_volume(shape=(16, 16, 4))
    write_series(tmp_path / "series", volume)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in (tmp_path / "series").iterdir():
            zf.write(f, f"Doe_Jane/{f.name}")
    log = tmp_path / "requests.log"
    app = create_app(predictor=ThresholdPredictor(), data_dir=tmp_path / "srv", request_log=log)
    name = "Doe_Jane_MRN-0042.zip"  # the patient in the file name too
    with TestClient(app) as client:
        job = client.post("/jobs", files={"file": (name, buffer.getvalue(), "application/zip")})
        assert job.status_code == 202, job.text
        done = wait_done(client, job.json()["id"])
        client.get(f"/jobs/{done['id']}/result/seg")
        client.get("/jobs?patient=Doe^Jane")
        client.get("/MRN-0042/Doe_Jane")  # a made-up path is logged as "other"
    text = log.read_text()
    assert len(text.splitlines()) >= 4 and "POST /jobs 202" in text
    for secret in ("Doe", "Jane", "MRN-0042", PATIENT["PatientID"], "19700101"):
        assert secret not in text, secret
    RequestLog(None).close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_certificate_flag_serves_https(tmp_path, certificate):
    import httpx
    import uvicorn

    cert, key = certificate
    options = tls_options(cert, key)
    port = free_port()
    app = create_app(predictor=ThresholdPredictor(), data_dir=tmp_path / "srv")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        answer = httpx.get(f"https://127.0.0.1:{port}/health", verify=str(cert), timeout=5)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # plain HTTP refused
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_tls_options_are_checked(tmp_path, certificate):
    cert, key = certificate
    with pytest.raises(MedsegError, match="go together"):
        tls_options(cert, None)
    with pytest.raises(MedsegError, match="not a PEM private key"):
        tls_options(cert, cert)
    assert tls_options(None, None) == {}


def test_finished_jobs_are_bounded(tmp_path):
    app = create_app(
        predictor=ThresholdPredictor(),
        data_dir=tmp_path / "srv",
        job_rate_limit_per_minute=None,
        keep_finished_jobs=5,
    )
    data = write_image(Image(np.zeros((4, 4, 4), np.int16), (1.0,) * 3), tmp_path / "a.nii.gz")
    with TestClient(app) as client:
        for _ in range(20):
            files = {"file": ("a.nii.gz", data.read_bytes(), "application/gzip")}
            wait_done(client, client.post("/jobs", files=files).json()["id"])
        assert len(client.get("/jobs").json()) <= 6
        assert len(list((tmp_path / "srv" / "jobs").iterdir())) <= 6
        assert "medseg_job_seconds_count 20" in client.get("/metrics").text


def test_serve_command_has_the_guard_options():
    from medseg.cli.main import build_parser

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--rate-limit",
         "30", "--request-log", "r.log", "--keep-jobs", "10"]
    )  # fmt: skip
    assert (args.tls_cert, args.tls_key, args.rate_limit) == ("c.pem", "k.pem", 30.0)
    assert (args.job_rate_limit, args.request_log, args.keep_jobs) == (60.0, "r.log", 10)
