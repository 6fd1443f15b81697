"""Helpers shared by the tests in tests/dicom/."""

from __future__ import annotations

import shutil
import subprocess

import pytest

SPACING, ORIGIN = (0.8, 0.8, 2.5), (-10.0, -20.0, 30.0)


def dciodvfy_errors(path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
