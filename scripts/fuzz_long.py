"""The long fuzzing run: coverage-guided (atheris) and property-based (hypothesis) fuzzing of
the dataset.json parser, the image readers (NIfTI, NRRD, MHA, PNG), both DICOM series readers
and the service's upload endpoint.

    .venv/bin/python scripts/fuzz_long.py --runs 5000            # atheris, every target
    .venv/bin/python scripts/fuzz_long.py --target image --runs 20000
    .venv/bin/python scripts/fuzz_long.py --hypothesis 2000      # the CI fuzz tests, longer

Only medseg's own errors (MedsegError) may come out of a target. Anything else is a crash: its
input is saved under ``--crashes`` (default benchmarks/work/fuzz_crashes/<target>/) and
counted; fix it and add the input as a regression test. Each target runs in its own process
(atheris fuzzes one function per process); the summary is one JSON object on stdout:
``{target: {"executions": n, "crashes": n, "crash_types": [...]}}``.
The CI keeps the short hypothesis version (tests/*/test_*_fuzz.py, 40-150 examples each).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("dataset_json", "image", "dicom", "upload")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".png")


def seeds(folder: Path) -> dict[str, list[bytes]]:
    """Valid inputs to start from (atheris mutates them)."""
    import numpy as np
    from dicom_factory import phantom_volume, write_series

    from medseg.io import Image, write_image

    out: dict[str, list[bytes]] = {t: [] for t in TARGETS}
    out["dataset_json"] = [
        json.dumps(
            {
                "labels": {"0": "background", "1": "organ"},
                "modality": {"0": "CT"},
                "training": [{"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"}],
            }
        ).encode(),
        json.dumps({"labels": {"background": 0, "a": 1}, "channel_names": {"0": "MR"},
                    "file_ending": ".nii.gz"}).encode(),
    ]  # fmt: skip
    volume = Image(np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4), (0.5, 1.0, 2.0))
    flat = Image(np.arange(48, dtype=np.uint8).reshape(8, 6), (1.0, 1.0))
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        image = flat if suffix == ".png" else volume
        out["image"].append(bytes([i]) + write_image(image, folder / f"s{suffix}").read_bytes())
    series = folder / "series"
    write_series(series, phantom_volume(shape=(8, 8, 3))[0])
    out["dicom"] = [f.read_bytes() for f in sorted(series.iterdir())[:1]]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"s/{f.name}")
    out["upload"] = [b"\x00" + out["image"][1][1:], b"\x01" + buffer.getvalue()]
    return out


def make_target(name: str, work: Path, crashes: Path, stats: dict, stats_path: Path):
    """The function atheris calls with each input; MedsegError is the expected outcome."""
    from medseg.errors import MedsegError

    def record(data: bytes, exc: BaseException) -> None:
        stats["crashes"] += 1
        kind = f"{type(exc).__name__}: {str(exc)[:100]}"
        if kind not in stats["crash_types"]:
            stats["crash_types"].append(kind)
        crashes.mkdir(parents=True, exist_ok=True)
        (crashes / hashlib.sha1(data).hexdigest()).write_bytes(data)

    if name == "dataset_json":
        from medseg.io.dataset import load_dataset

        root = work / "ds"
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "imagesTr" / "case_0000.nii.gz").write_bytes(b"")

        def run(data: bytes) -> None:
            (root / "dataset.json").write_bytes(data)
            load_dataset(root)

    elif name == "image":
        from medseg.io import read_image_channels

        def run(data: bytes) -> None:
            if not data:
                return
            path = work / f"case{IMAGE_SUFFIXES[data[0] % len(IMAGE_SUFFIXES)]}"
            path.write_bytes(data[1:])
            read_image_channels(path)

    elif name == "dicom":
        import shutil

        from dicom_factory import phantom_volume, write_series

        from medseg.dicom import read_series
        from medseg.io import read_dicom_series

        seed = work / "seed"
        write_series(seed, phantom_volume(shape=(8, 8, 3))[0])
        victim = sorted(seed.iterdir())[0].name

        def run(data: bytes) -> None:
            folder = work / "series"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(seed, folder)
            (folder / victim).write_bytes(data)
            for reader in (read_series, read_dicom_series):
                with contextlib.suppress(MedsegError):
                    reader(folder)

    else:  # upload
        from fastapi.testclient import TestClient
        from hospital_model import ThresholdPredictor

        from medseg.serve import create_app

        app = create_app(
            predictor=ThresholdPredictor(),
            data_dir=work / "srv",
            job_rate_limit_per_minute=None,
            keep_finished_jobs=8,
            max_upload_mb=1,
        )
        client = TestClient(app)
        client.__enter__()

        def run(data: bytes) -> None:
            name = "case.zip" if data[:1] == b"\x01" else "case.nii.gz"
            response = client.post("/jobs", files={"file": (name, data[1:], "application/zip")})
            if response.status_code >= 500:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:100]}")
            if response.status_code != 202:
                return
            job_id = response.json()["id"]
            for _ in range(2000):
                job = client.get(f"/jobs/{job_id}").json()
                if job["status"] not in ("queued", "running"):
                    break
            if job["message"].startswith("internal error"):
                raise RuntimeError(job["message"])

    def target(data: bytes) -> None:
        stats["executions"] += 1
        try:
            run(data)
        except MedsegError:
            pass
        except Exception as exc:  # noqa: BLE001 - anything else is a crash to record
            record(data, exc)
        # libFuzzer ends the process without Python's atexit: keep the counts on disk
        stats_path.write_text(json.dumps(stats))

    return target


def fuzz_one(name: str, runs: int, crashes: Path, stats_path: Path) -> None:
    """Child process: fuzz one target with atheris for ``runs`` executions."""
    import atheris

    sys.path.insert(0, str(REPO / "tests"))
    with atheris.instrument_imports(include=["medseg"]):
        import medseg.dicom  # noqa: F401
        import medseg.io.dataset  # noqa: F401
        import medseg.serve  # noqa: F401
    stats = {"executions": 0, "crashes": 0, "crash_types": []}
    work = Path(tempfile.mkdtemp(prefix=f"medseg-fuzz-{name}-"))
    corpus = work / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seeds(work / "seeds")[name]):
        (corpus / f"seed{i}").write_bytes(data)
    target = make_target(name, work / "run", crashes / name, stats, stats_path)
    (work / "run").mkdir(exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={runs}",
            "-max_len=70000",
            "-rss_limit_mb=4096",
            f"-artifact_prefix={crashes / name}/",
            str(corpus),
        ],  # fmt: skip
        target,
    )
    atheris.Fuzz()


def fuzz_all(targets: list[str], runs: int, crashes: str | Path) -> dict:
    """Fuzz each target in its own process; ``{target: counts}``.

    libFuzzer's own findings (out-of-memory, a native crash, a timeout) end the child: they
    count as one crash each, with libFuzzer's summary line as the type.
    """
    summary = {}
    for name in targets:
        (Path(crashes) / name).mkdir(parents=True, exist_ok=True)
        stats_path = Path(tempfile.mkdtemp(prefix="medseg-fuzz-stats-")) / "stats.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(stats_path), "--target", name,
             "--runs", str(runs), "--crashes", str(crashes)],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        stats = (
            json.loads(stats_path.read_text())
            if stats_path.exists()
            else {"executions": 0, "crashes": 0, "crash_types": []}
        )
        summaries = [x for x in proc.stderr.splitlines() if x.startswith("SUMMARY: libFuzzer")]
        if proc.returncode != 0 or summaries:
            stats["crashes"] += 1
            stats["crash_types"].append((summaries or [proc.stderr.strip()[-200:]])[-1])
        summary[name] = stats
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=TARGETS, help="one target (default: all)")
    parser.add_argument("--runs", type=int, default=5000, help="atheris executions per target")
    parser.add_argument("--crashes", default=str(REPO / "benchmarks" / "work" / "fuzz_crashes"))
    parser.add_argument(
        "--hypothesis", type=int, metavar="EXAMPLES", help="run the CI fuzz tests this long"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the stats file of a child
    args = parser.parse_args()
    if args.child:
        fuzz_one(args.target, args.runs, Path(args.crashes), Path(args.child))
        return 0
    if args.hypothesis:
        tests = sorted(str(p) for p in (REPO / "tests").glob("*/test_*_fuzz.py"))
        env = {**os.environ, "MEDSEG_FUZZ_EXAMPLES": str(args.hypothesis)}
        return subprocess.call([sys.executable, "-m", "pytest", "-q", *tests], env=env, cwd=REPO)
    summary = fuzz_all([args.target] if args.target else list(TARGETS), args.runs, args.crashes)
    print(json.dumps(summary, indent=2))
    return 1 if any(s["crashes"] for s in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
