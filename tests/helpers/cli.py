"""Run the command line in a fresh interpreter, as a user would."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m medseg.cli.main --quiet ARGS`` with its output captured (5-minute limit)."""
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli.main", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
