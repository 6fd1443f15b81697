"""DICOMweb round trip: Orthanc in its own network namespace, `medseg pacs`, SEG back and checked."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dataset
from dicom_factory import phantom_volume, write_series
from helpers.dicom import dciodvfy_errors
from hospital_model import train_tiny_model

from medseg.errors import MedsegError
from medseg.pacs import PacsError, connect, find_studies

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "orthanc.sh"
MEDSEG = [sys.executable, "-m", "medseg.cli.main"]


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_connect_refuses_bad_urls_and_reports_unreachable_servers():
    with pytest.raises(MedsegError, match="http"):
        connect("ftp://pacs/dicom-web")
    client = connect(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2)
    with pytest.raises(PacsError, match="study search failed"):
        find_studies(client)


def test_cli_gives_one_line_errors(tmp_path):
    proc = subprocess.run(
        [*MEDSEG, "pacs", "studies", "--url", f"http://127.0.0.1:{free_port()}/dicom-web"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "study search failed" in proc.stderr
    proc = subprocess.run(
        [*MEDSEG, "serve", "--model", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--token-file" in proc.stderr


needs_orthanc = pytest.mark.skipif(
    shutil.which("Orthanc") is None
    or not Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists()
    or shutil.which("unshare") is None
    or os.geteuid() != 0,
    reason="needs root, Orthanc and its DICOMweb plugin (scripts/orthanc.sh install)",
)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("orthanc")
    port = 8042
    subprocess.run([str(SCRIPT), "start", str(run_dir), str(port)], check=True, timeout=60)
    try:
        yield run_dir, f"http://127.0.0.1:{port}/dicom-web"
    finally:
        subprocess.run([str(SCRIPT), "stop", str(run_dir)], timeout=30)


def in_namespace(run_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command inside Orthanc's network namespace (the only place that reaches it)."""
    proc = subprocess.run(
        [str(SCRIPT), "exec", str(run_dir), *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return train_tiny_model(tmp_path_factory.mktemp("tiny"))


@needs_orthanc
@pytest.mark.integration
def test_pull_segment_push_round_trip_with_orthanc(orthanc, tiny_model, tmp_path):
    import highdicom as hd

    from medseg.dicom import read_seg_labels, read_series
    from medseg.io import read_image

    run_dir, url = orthanc
    source = shared_dataset("TotalSegmentator_example_CT") / "extras" / "example_ct_dicom"
    # The example series has blank study/series UIDs, which a PACS refuses: de-identification
    # on ingest gives it consistent ones (and removes what identity is left).
    ingest = tmp_path / "ingest"
    in_namespace(run_dir, *MEDSEG, "deidentify", str(source), "-o", str(ingest))
    files = sorted(str(p) for p in ingest.rglob("*.dcm"))
    in_namespace(run_dir, *MEDSEG, "pacs", "push", "--url", url, *files)
    studies = in_namespace(run_dir, *MEDSEG, "pacs", "studies", "--url", url).stdout.split()
    assert len(studies) == 1
    study = studies[0]

    work = tmp_path / "work"
    out = in_namespace(
        run_dir,
        *MEDSEG,
        "--quiet",
        "pacs",
        "run",
        "--url",
        url,
        str(tiny_model),
        study,
        "-w",
        str(work),
    )
    summary = json.loads(out.stdout)
    assert summary["pushed"] == 1 and summary["seg"]

    back = tmp_path / "back"
    in_namespace(
        run_dir, *MEDSEG, "pacs", "pull", "--url", url, study, "--modality", "SEG", "-o", str(back)
    )
    segs = list(back.rglob("*.dcm"))
    assert len(segs) == 1
    assert dciodvfy_errors(segs[0]) == []
    seg = hd.seg.segread(str(segs[0]))
    assert seg.SeriesDescription.startswith("medseg")
    series = read_series(ingest)
    label, names = read_seg_labels(segs[0], series)
    expected = read_image(summary["label"])
    assert set(names.values()) <= {"organ", "lesion"}
    # Segment numbers follow the label values present (here 1 -> 1, 2 -> 2 when both occur).
    values = sorted(int(v) for v in np.unique(expected.array) if v)
    remapped = np.zeros_like(expected.array, dtype=np.uint16)
    for number, value in enumerate(values, start=1):
        remapped[expected.array == value] = number
    assert np.array_equal(label.array, remapped)


@needs_orthanc
def test_watch_processes_new_studies_once(orthanc, tiny_model, tmp_path):
    run_dir, url = orthanc
    volume, _ = phantom_volume(shape=(32, 32, 10))
    files = write_series(tmp_path / "series", volume)
    in_namespace(run_dir, *MEDSEG, "pacs", "push", "--url", url, *map(str, files))
    work = tmp_path / "watch"
    args = [*MEDSEG, "--quiet", "pacs", "watch", "--url", url, str(tiny_model), "-w", str(work)]
    state = json.loads(in_namespace(run_dir, *args, "--max-cycles", "1").stdout)
    # This study is new; one from the round-trip test (if it ran) already holds a SEG.
    new = [uid for uid, status in state.items() if status == "done"]
    assert len(new) == 1 and all(s == "done" for s in state.values()), state
    again = json.loads(in_namespace(run_dir, *args, "--max-cycles", "1").stdout)
    assert again == state  # nothing processed twice


def test_segment_dicom_with_a_trained_model_writes_seg_and_rtstruct(tiny_model, tmp_path):

    from medseg import api
    from medseg.dicom import read_seg_labels, read_series
    from medseg.io import read_image

    volume, _ = phantom_volume(shape=(32, 32, 10))
    write_series(tmp_path / "series", volume)
    result = api.segment_dicom(tiny_model, tmp_path / "series", tmp_path / "out", rtstruct=True)
    label = read_image(result.label)
    if not label.array.any():
        pytest.skip("the 2-iteration model predicted nothing here")
    assert dciodvfy_errors(result.seg) == [] and dciodvfy_errors(result.rtstruct) == []
    back, _ = read_seg_labels(result.seg, read_series(tmp_path / "series"))
    assert np.array_equal(back.array > 0, label.array > 0)
    with pytest.raises(MedsegError, match="already exists"):
        api.segment_dicom(tiny_model, tmp_path / "series", tmp_path / "out")


SERVICE_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from fastapi.testclient import TestClient
from medseg.serve import create_app
app = create_app({model!r}, data_dir={data!r}, pacs_url={url!r})
with TestClient(app) as c:
    job = c.post("/jobs/pacs", json={{"study_uid": {study!r}}}).json()
    while job["status"] in ("queued", "running"):
        time.sleep(0.2)
        job = c.get("/jobs/" + job["id"]).json()
    seg = c.get("/jobs/" + job["id"] + "/result/seg")
    print(json.dumps({{"job": job, "seg_status": seg.status_code, "seg_bytes": len(seg.content)}}))
"""


@needs_orthanc
def test_service_segments_a_pacs_study(orthanc, tiny_model, tmp_path):
    from pydicom.uid import generate_uid

    run_dir, url = orthanc
    study = generate_uid()
    volume, _ = phantom_volume(shape=(32, 32, 10), seed=7)
    files = write_series(tmp_path / "series", volume, study_uid=study)
    in_namespace(run_dir, *MEDSEG, "pacs", "push", "--url", url, *map(str, files))
    script = SERVICE_SCRIPT.format(
        tests=str(Path(__file__).resolve().parents[1]),
        model=str(tiny_model),
        data=str(tmp_path / "srv"),
        url=url,
        study=study,
    )
    out = json.loads(in_namespace(run_dir, sys.executable, "-c", script).stdout.splitlines()[-1])
    job = out["job"]
    assert job["status"] == "done", job["message"]
    if job["result"]["seg"]:
        assert job["result"]["pushed"] == 1 and out["seg_status"] == 200
    series = in_namespace(
        run_dir, *MEDSEG, "pacs", "pull", "--url", url, study, "-o", str(tmp_path / "p")
    )
    assert series.returncode == 0
