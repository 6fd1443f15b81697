"""Helpers shared by the tests in tests/serve/ and beyond."""

from __future__ import annotations

import time

import numpy as np

# a registration pair for the service and viewer tests
SPACING = (1.0, 1.5, 2.0)
SHAPE = (32, 28, 30)
SHIFT = (3.0, -2.0, 1.5)  # voxels: moving(x) = fixed(x - SHIFT)
BLOBS = (((14, 15, 12), 5.0, 300.0), ((20, 11, 17), 3.0, 200.0), ((10, 20, 19), 4.0, -150.0))


def wait_done(client, job_id, headers=None, timeout=30.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def blobs(shift=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian blobs (smooth, asymmetric: one translation fits) and a label ball."""
    grid = np.indices(SHAPE).astype(np.float64)
    image = np.zeros(SHAPE)  # background 0: what warping fills outside the moving FOV
    for centre, sigma, amplitude in BLOBS:
        d2 = sum((grid[i] - centre[i] - shift[i]) ** 2 for i in range(3))
        image += amplitude * np.exp(-d2 / (2 * sigma**2))
    d2 = sum((grid[i] - BLOBS[0][0][i] - shift[i]) ** 2 for i in range(3))
    return image.astype(np.float32), (d2 <= 5.0**2).astype(np.uint8)
