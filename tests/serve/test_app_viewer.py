"""The viewer in headless Chromium: upload a volume, wait for the job, see the overlay rendered."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicom_factory import phantom_volume
from helpers.serve import SHIFT, SPACING, blobs
from hospital_model import ThresholdPredictor

from medseg.io import Image, write_image
from medseg.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="Chromium and chromedriver are not installed"
)
ARTIFACTS = Path(
    os.environ.get(
        "MEDSEG_TEST_ARTIFACTS",
        Path(__file__).resolve().parents[2] / "benchmarks" / "work" / "artifacts",
    )
)


@pytest.fixture()
def server(tmp_path):
    import uvicorn

    app = create_app(
        predictor=ThresholdPredictor(), data_dir=tmp_path / "srv", token="viewer-token"
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


class WebDriver:
    """The few W3C WebDriver calls the test needs, spoken to chromedriver over HTTP."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, port: int):
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        options = {
            "binary": CHROMIUM,
            "args": [
                "--headless",
                "--no-sandbox",
                "--use-angle=swiftshader",  # software WebGL2: CI has no GPU
                "--enable-unsafe-swiftshader",
                "--window-size=1000,700",
            ],
        }
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        response = self.http.request(method, path, json=body)
        assert response.status_code == 200, response.text[:500]
        return response.json()["value"]

    def do(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def element(self, css: str) -> str:
        found = self.do("POST", "/element", {"using": "css selector", "value": css})
        return found[self.ELEMENT]

    def run(self, script: str, *args):
        return self.do("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> np.ndarray:
        import base64
        import io

        from PIL import Image as PILImage

        png = base64.b64decode(self.do("GET", "/screenshot"))
        path.write_bytes(png)
        return np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def quit(self) -> None:
        self.http.delete(f"/session/{self.session}")


@pytest.fixture()
def browser():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        web = WebDriver(port)
        yield web
        web.quit()
    finally:
        driver.terminate()
        driver.wait(timeout=10)


def wait_until(web: WebDriver, script: str, timeout: float = 90.0):
    end = time.time() + timeout
    while time.time() < end:
        value = web.run(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}; status: {web.run(STATUS)}")


STATUS = "return document.getElementById('status').textContent"


def red_pixels(rgb: np.ndarray) -> int:
    """Pixels of label 1's colour (pure red, see viewer.js) in the canvas area."""
    canvas = rgb[40:, :700]  # the side panel's legend swatch is excluded
    r, g, b = canvas[..., 0], canvas[..., 1], canvas[..., 2]
    return int(np.sum((r > 200) & (g < 60) & (b < 60)))


def test_viewer_uploads_waits_and_renders_the_overlay(server, browser, tmp_path):
    volume, _ = phantom_volume(shape=(64, 64, 48))
    path = write_image(Image(volume, (1.0, 1.0, 1.0)), tmp_path / "ball.nii.gz")
    browser.do("POST", "/url", {"url": f"{server}/static/index.html?token=viewer-token&opacity=1"})
    file_input = browser.element("#file")
    browser.do("POST", f"/element/{file_input}/value", {"text": str(path)})
    browser.do("POST", f"/element/{browser.element('#upload button')}/click", {})
    job_id = wait_until(browser, "return document.body.dataset.loaded || null")
    time.sleep(1.0)  # a few frames after the volumes were loaded
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shown = browser.screenshot(ARTIFACTS / "viewer_overlay.png")
    assert "done" in browser.run(STATUS)
    legend = browser.run("return document.querySelector('#legend tbody').innerText")
    assert "liver" in legend and "lesion" in legend
    # The ball is ~27 voxels across in three 350-pixel panes: tens of thousands of red pixels.
    assert red_pixels(shown) > 20000, red_pixels(shown)
    browser.run(
        "const s = document.getElementById('opacity'); s.value = 0;"
        "s.dispatchEvent(new Event('input'));"
    )
    time.sleep(1.0)
    hidden = browser.screenshot(tmp_path / "viewer_no_overlay.png")
    assert red_pixels(hidden) < 500  # opacity 0: the red came from the overlay
    headers = {"Authorization": "Bearer viewer-token"}
    job = httpx.get(f"{server}/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "done" and job["source"] == "ball.nii.gz"


def warm_pixels(rgb: np.ndarray) -> int:
    """Pixels of the warped overlay's "warm" colours (red to yellow) in the canvas area.

    The fixed image is grey (r = g = b) and the crosshair blue, so neither counts.
    """
    canvas = rgb[40:, :700]
    r, g, b = canvas[..., 0], canvas[..., 1], canvas[..., 2]
    return int(np.sum((r - b > 60) & (r >= g)))


def test_viewer_registers_through_the_form_and_blends_fixed_and_warped(server, browser, tmp_path):
    fixed = write_image(Image(blobs()[0], SPACING), tmp_path / "fixed.nii.gz")
    moving = write_image(Image(blobs(SHIFT)[0], SPACING), tmp_path / "moving.nii.gz")
    browser.do("POST", "/url", {"url": f"{server}/static/index.html?token=viewer-token&blend=0.5"})
    for css, path in (("#fixed", fixed), ("#moving", moving)):
        browser.do("POST", f"/element/{browser.element(css)}/value", {"text": str(path)})
    browser.do("POST", f"/element/{browser.element('#register button')}/click", {})
    job_id = wait_until(browser, "return document.body.dataset.loaded || null")
    time.sleep(1.0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shown = browser.screenshot(ARTIFACTS / "viewer_registration.png")
    assert "done" in browser.run(STATUS)
    table = browser.run("return document.querySelector('#quality tbody').innerText")
    assert "NCC after" in table and "rigid" in table, table
    assert browser.run("return document.getElementById('registration').hidden") is False
    assert browser.run("return document.getElementById('legend').hidden") is True
    assert warm_pixels(shown) > 5000, warm_pixels(shown)
    browser.run(
        "const s = document.getElementById('blend'); s.value = 0;"
        "s.dispatchEvent(new Event('input'));"
    )
    time.sleep(1.0)
    fixed_only = browser.screenshot(tmp_path / "viewer_fixed_only.png")
    assert warm_pixels(fixed_only) < 500  # blend 0: the colour came from the warped image
    headers = {"Authorization": "Bearer viewer-token"}
    job = httpx.get(f"{server}/jobs/{job_id}", headers=headers).json()
    assert job["kind"] == "register" and job["source"] == "moving.nii.gz -> fixed.nii.gz"


class UncertainThresholdPredictor(ThresholdPredictor):
    """ThresholdPredictor that also gives an entropy map: ln 3 on the ball's rim, 0 elsewhere."""

    def predict_case(self, channels, *, uncertainty=False, **_):
        from scipy import ndimage

        label = self.predict(channels)
        if not uncertainty:
            return label, None
        inside = label.array > 0
        rim = ndimage.binary_dilation(inside, iterations=2) & ~ndimage.binary_erosion(
            inside, iterations=2
        )
        return label, channels[0].with_array(rim.astype(np.float32) * np.log(3.0))


@pytest.fixture()
def uncertain_server(tmp_path):
    import uvicorn

    app = create_app(
        predictor=UncertainThresholdPredictor(), data_dir=tmp_path / "srv", token="viewer-token"
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def test_viewer_shows_the_uncertainty_overlay(uncertain_server, browser, tmp_path):
    volume, _ = phantom_volume(shape=(64, 64, 48))
    path = write_image(Image(volume, (1.0, 1.0, 1.0)), tmp_path / "ball.nii.gz")
    url = f"{uncertain_server}/static/index.html?token=viewer-token&opacity=0&uncertainty=1"
    browser.do("POST", "/url", {"url": url})
    browser.do("POST", f"/element/{browser.element('#file')}/value", {"text": str(path)})
    browser.do("POST", f"/element/{browser.element('#upload button')}/click", {})
    job_id = wait_until(browser, "return document.body.dataset.loaded || null")
    time.sleep(1.0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shown = browser.screenshot(ARTIFACTS / "viewer_uncertainty.png")
    assert browser.run("return document.getElementById('uncertainty-row').hidden") is False
    assert browser.run("return nv.volumes.length") == 3
    # labels hidden (opacity 0): the warm colours come from the uncertainty map
    assert warm_pixels(shown) > 3000, warm_pixels(shown)
    browser.run(
        "const s = document.getElementById('uncertainty'); s.value = 0;"
        "s.dispatchEvent(new Event('input'));"
    )
    time.sleep(1.0)
    hidden = browser.screenshot(tmp_path / "viewer_no_uncertainty.png")
    assert warm_pixels(hidden) < 500
    headers = {"Authorization": "Bearer viewer-token"}
    job = httpx.get(f"{uncertain_server}/jobs/{job_id}", headers=headers).json()
    assert job["result"]["uncertainty"] is True
    entropy = httpx.get(f"{uncertain_server}/jobs/{job_id}/result/uncertainty", headers=headers)
    assert entropy.status_code == 200 and entropy.content[:2] == b"\x1f\x8b"  # gzip NIfTI
