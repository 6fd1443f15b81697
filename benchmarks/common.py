"""Shared helpers for benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    import numpy
    import SimpleITK
    import torch

    import medseg

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor()
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flag_lines = [line.split(":", 1)[1].split() for line in lines if line.startswith("flags")]
        # the vector and matrix extensions that decide kernel speed (and bf16 support)
        flags = sorted(
            f
            for f in (flag_lines[0] if flag_lines else [])
            if f.startswith(("avx", "amx", "fma")) or "bf16" in f
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": cores,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "versions": {
            "medseg": medseg.__version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(),
        },
        "git_commit": commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write_result(data: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path
