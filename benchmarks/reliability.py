"""Reliability counts (issue 23): hostile inputs, fuzzing, kill -9, full disks, service memory.

    /work/tools/slot one .venv/bin/python benchmarks/reliability.py    # results/reliability.json
    .venv/bin/python benchmarks/reliability.py --quick                   # a smoke run

Counts, not times:
- corpus: bad inputs tried per reader (NIfTI, MHA/NRRD, PNG, both DICOM readers, dataset.json,
  predict) and the share refused cleanly: a MedsegError of one line that names the file;
- fuzz: atheris executions per target (scripts/fuzz_long.py) and the crashes left, plus the
  crashes found and fixed during the work on the issue (listed with their fix);
- kill: kill -9 at random moments of preprocess, train, predict, evaluate, export and a
  service job; files under a final name that do not read back afterwards (goal 0), and
  reruns that did not complete (goal 0);
- full disk: predict and train with their output on a nearly full tmpfs (user namespace);
- service: RSS at start (after a warm-up) and after 1,000 upload jobs with a real tiny model.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from common import REPO, RESULTS, machine, write_result  # noqa: E402
from dicom_factory import phantom_volume, write_series  # noqa: E402
from helpers.inference import make_model_dir  # noqa: E402
from helpers.reliability import (  # noqa: E402
    Zygote,
    kill_commands,
    kill_trial,
    serve_trial,
)

from medseg.api import plan, preprocess  # noqa: E402
from medseg.cli.main import main as cli  # noqa: E402
from medseg.dicom import read_series  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402
from medseg.io import Image, read_image_channels, write_image  # noqa: E402
from medseg.io.dataset import load_dataset  # noqa: E402
from medseg.io.files import read_dicom_series  # noqa: E402
from medseg.io.phantoms import write_phantom_dataset  # noqa: E402
from medseg.serve import create_app  # noqa: E402

WORK = REPO / "benchmarks" / "work" / "reliability"

# What fuzzing and the hostile corpus found while the issue was worked on, and the fix.
FOUND_AND_FIXED = [
    ("dataset_json", "ValueError: int('') on a channel key", "io.dataset: numeric keys checked"),
    ("dataset_json", "ValueError: int('--1') on a label key", "io.dataset: regex, not isdigit"),
    ("dataset_json", "AttributeError: 'int' has no .get ('training' entry)", "entries checked"),
    ("dataset_json", "image path '../../etc/passwd' read outside the dataset", "paths confined"),
    ("dataset_json", "file_ending '/../x' joined into paths", "file_ending checked"),
    ("dicom", "pydicom BytesLengthException / struct errors escaped", "any failure -> one line"),
    ("dicom", "pydicom allocated GBs for a damaged length (libFuzzer OOM)", "bounded reads"),
    ("dicom", "GDCM allocated 1.5-4 GB for a damaged length", "lengths walked before GDCM"),
    ("dicom", "a damaged slice was silently dropped from the series", "refused"),
    ("upload", "zip OSError EINVAL -> 'internal error' (HTTP job)", "zip failures -> one line"),
    ("nifti", "NaN/inf voxels read as 0 by ITK", "stored non-finite values restored"),
    ("nifti", "NaN/zero pixdim read as spacing 1 by ITK", "raw header checked"),
    (
        "nifti-write",
        "full disk: ITK wrote a truncated .nii.gz and returned",
        "written file checked",
    ),
]


def load_test_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_refusal(call, path) -> bool:
    """True when ``call()`` raises a one-line MedsegError naming ``path``."""
    try:
        call()
    except MedsegError as exc:
        text = str(exc).strip()
        return "\n" not in text and str(path) in text
    except Exception:  # noqa: BLE001 - any other exception is a failure of the reader
        return False
    return False


def corpus(folder: Path) -> dict:
    """Bad inputs per reader and how many were refused cleanly."""
    sanity = load_test_module(REPO / "tests" / "io" / "test_sanity.py")
    fuzz = load_test_module(REPO / "tests" / "io" / "test_dataset_fuzz.py")
    dicom_fuzz = load_test_module(REPO / "tests" / "dicom" / "test_series_fuzz.py")
    rng = np.random.default_rng(0)
    cases: dict[str, list[tuple[str, object, Path]]] = {}

    def add(reader: str, name: str, call, path: Path) -> None:
        cases.setdefault(reader, []).append((name, call, path))

    def image_case(reader: str, name: str, path: Path) -> None:
        add(reader, name, lambda p=path: read_image_channels(p), path)

    for name, (edit, _) in sanity.BAD_NIFTI.items():
        image_case("nifti", name, sanity.nifti(folder / f"{name}.nii", edit=edit))
    good = sanity.nifti(folder / "good.nii", shape=(8, 8, 8))
    raw = good.read_bytes()
    for cut in (100, 348, 400, len(raw) - 1):
        (folder / f"cut{cut}.nii").write_bytes(raw[:cut])
        image_case("nifti", f"truncated at {cut}", folder / f"cut{cut}.nii")
    gz = write_image(Image(np.ones((8, 8, 8), np.float32), (1.0,) * 3), folder / "g.nii.gz")
    (folder / "cut.nii.gz").write_bytes(gz.read_bytes()[:-20])
    image_case("nifti", "truncated gzip", folder / "cut.nii.gz")
    (folder / "noise.nii.gz").write_bytes(rng.bytes(500))
    image_case("nifti", "noise", folder / "noise.nii.gz")
    for i, header in enumerate(
        [
            sanity.MHA + "DimSize = 4 4 4\nElementSpacing = 0 1 1\n",
            sanity.MHA + "DimSize = 4 4 4\nElementSpacing = nan 1 1\n",
            sanity.MHA + "DimSize = 4 4 4\nTransformMatrix = 1 0 0 1 0 0 0 0 1\n",
            sanity.MHA + "DimSize = 50000 50000 50000\n",
            sanity.MHA + "DimSize = 4 4 4\n",  # data missing
        ]
    ):
        path = sanity.mha(folder / f"bad{i}.mha", header, data=b"" if i == 4 else b"\0" * 64)
        image_case("mha_nrrd", f"mha {i}", path)
    nrrd = folder / "bad.nrrd"
    nrrd.write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
        b"space: left-posterior-superior\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n\n"
        + b"\0"
        * 64
    )
    image_case("mha_nrrd", "nrrd zero direction", nrrd)
    png = sanity.png
    image_case("png", "palette", png(folder / "p.png", 4, 2, 8, 3, [b"\0\1\2\1"] * 2, bytes(9)))
    image_case("png", "grey+alpha", png(folder / "la.png", 2, 2, 8, 4, [b"\x10\xff\x20\x00"] * 2))
    image_case("png", "huge", png(folder / "huge.png", 100000, 100000, 8, 0, [b"\0"]))
    image_case("png", "bad depth", png(folder / "d3.png", 2, 2, 3, 0, [b"\0"] * 2))
    ok_png = write_image(Image(np.ones((8, 8), np.uint8), (1.0, 1.0)), folder / "ok.png")
    (folder / "cut.png").write_bytes(ok_png.read_bytes()[:40])
    image_case("png", "truncated", folder / "cut.png")

    volume, _ = phantom_volume(shape=(8, 8, 6))
    series_cases = {
        "gap": {"z_positions": [0, 2.5, 5, 10, 12.5, 15]},
        "duplicate": {"z_positions": [0, 2.5, 2.5, 5, 7.5, 10]},
        "tilt": {"shear_per_slice": 0.6},
        "inconsistent spacing": {"z_positions": [0, 2.5, 5, 7.0, 9.5, 12]},
    }
    import base64

    for name, kwargs in series_cases.items():
        target = folder / f"series_{name.replace(' ', '_')}"
        write_series(target, volume, **kwargs)
        for reader, function in (("dicom_io", read_dicom_series), ("dicom_hospital", read_series)):
            add(reader, name, lambda f=function, t=target: f(t), target)
    for tag, data in (("oom element", dicom_fuzz.OOM_SLICE), ("oom meta", dicom_fuzz.OOM_META)):
        target = folder / f"series_{tag.replace(' ', '_')}"
        write_series(target, volume)
        victim = sorted(target.iterdir())[0]
        victim.write_bytes(base64.b64decode(data))
        for reader, function in (("dicom_io", read_dicom_series), ("dicom_hospital", read_series)):
            add(reader, tag, lambda f=function, t=target: f(t), target)
    two = folder / "series_two"
    for uid, offset in (("1.2.3.4", 0), ("1.2.3.5", 1)):
        for f in write_series(folder / uid, volume + offset, series_uid=uid):
            two.mkdir(exist_ok=True)
            f.rename(two / f"{uid}_{f.name}")
    for reader, function in (("dicom_io", read_dicom_series), ("dicom_hospital", read_series)):
        add(reader, "two series", lambda f=function: f(two), two)

    for i, (meta, _) in enumerate(fuzz.test_fuzz_regressions.pytestmark[0].args[1]):
        root = folder / f"ds{i}"
        fuzz.write_dataset(root, meta)
        add("dataset_json", str(meta)[:60], lambda r=root: load_dataset(r), root / "dataset.json")
    root = folder / "ds_noise"
    fuzz.write_dataset(root, {})
    (root / "dataset.json").write_bytes(rng.bytes(100))
    add("dataset_json", "noise", lambda r=root: load_dataset(r), root / "dataset.json")

    results = {}
    for reader, items in cases.items():
        clean = [name for name, call, path in items if clean_refusal(call, path)]
        results[reader] = {
            "tried": len(items),
            "clean": len(clean),
            "share_clean": round(len(clean) / len(items), 3),
            "not_clean": [name for name, _, _ in items if name not in clean],
        }
    return results


def predict_corpus(folder: Path, model_dir: Path) -> dict:
    """Hostile inputs through the whole `medseg predict` command: exit 2, one line, the file."""
    import contextlib
    import io

    inputs = {}
    nan = np.random.default_rng(0).normal(size=(20, 18, 17)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    inputs["nan"] = write_image(Image(nan, (1.0,) * 3), folder / "nan" / "c.nii.gz")
    inputs["2d to 3d"] = write_image(
        Image(np.zeros((9, 9), np.uint8), (1.0, 1.0)), folder / "a.png"
    )
    volume, _ = phantom_volume(shape=(16, 16, 6))
    write_series(folder / "gap", volume, z_positions=[0, 2.5, 5, 10, 12.5, 15])
    inputs["dicom gap"] = folder / "gap"
    tried, clean = 0, 0
    failures = []
    for name, path in inputs.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli(["--quiet", "predict", str(model_dir), str(path), "-o", str(folder / "out")])
        lines = [x for x in err.getvalue().splitlines() if x.strip()]
        tried += 1
        if code == 2 and len(lines) == 1 and str(path) in lines[0]:
            clean += 1
        else:
            failures.append(name)
    return {"tried": tried, "clean": clean, "share_clean": clean / tried, "not_clean": failures}


def fuzzing(runs: int) -> dict:
    fuzz_long = load_test_module(REPO / "scripts" / "fuzz_long.py")
    crashes = WORK / "fuzz_crashes"
    shutil.rmtree(crashes, ignore_errors=True)
    summary = fuzz_long.fuzz_all(list(fuzz_long.TARGETS), runs, crashes)
    return {
        "atheris": summary,
        "atheris_runs_asked_per_target": runs,
        "hypothesis_examples_in_ci": {
            "dataset_json": 250,
            "images (5 formats)": 300,
            "dicom": 40,
            "upload": 60,
            "model-folder schema": 150,
        },
        "found_and_fixed": [{"target": t, "crash": c, "fix": f} for t, c, f in FOUND_AND_FIXED],
    }


def kill_trials(root: Path, per_command: int, model_dir: Path, dataset: Path) -> dict:
    delays = {"preprocess": 1.5, "train": 6.0, "predict": 2.0, "evaluate": 2.0, "export": 4.0}
    inputs = dataset / "imagesTs"
    predictions = root / "predictions"
    cli(
        [
            "--quiet",
            "--device",
            "cpu",
            "predict",
            str(model_dir),
            str(inputs),
            "-o",
            str(predictions),
        ]
    )
    zygote = Zygote()
    rng = random.Random(0)
    out: dict = {}
    try:
        for name, max_delay in delays.items():
            counts = {"trials": 0, "killed": 0, "corrupt_after_kill": 0, "rerun_failed": 0,
                      "corrupt_after_rerun": 0}  # fmt: skip
            for trial in range(per_command):
                work = root / f"{name}{trial}"
                work.mkdir(parents=True)
                shutil.copytree(model_dir, work / "model")
                argv, done = kill_commands(
                    work, dataset=dataset, model_dir=model_dir, inputs=inputs,
                    predictions=predictions, refs=dataset / "labelsTs",
                )[name]  # fmt: skip
                r = kill_trial(zygote, name, argv, done, work, rng.uniform(0, max_delay))
                counts["trials"] += 1
                counts["killed"] += r["killed"]
                counts["corrupt_after_kill"] += len(r["broken_after_kill"])
                counts["rerun_failed"] += r["rerun_code"] != 0 or not r["done"]
                counts["corrupt_after_rerun"] += len(r["broken_after_rerun"])
                shutil.rmtree(work, ignore_errors=True)
            out[name] = counts
        counts = {"trials": 0, "corrupt_after_kill": 0, "rerun_failed": 0, "corrupt_after_rerun": 0}
        upload = next(inputs.iterdir())
        for trial in range(per_command):
            work = root / f"serve{trial}"
            work.mkdir()
            r = serve_trial(zygote, model_dir, upload, work, rng.uniform(0.05, 1.0))
            counts["trials"] += 1
            counts["corrupt_after_kill"] += len(r["broken_after_kill"])
            counts["rerun_failed"] += r["rerun_status"] != "done"
            counts["corrupt_after_rerun"] += len(r["broken_after_rerun"])
            shutil.rmtree(work, ignore_errors=True)
        out["service job"] = counts
    finally:
        zygote.close()
    return out


def full_disk(root: Path, model_dir: Path, dataset: Path, free_kb: list[int]) -> dict:
    disk = load_test_module(REPO / "tests" / "imaging" / "test_atomic_full_disk.py")
    if disk.SKIP:
        return {"skipped": disk.SKIP}
    inputs = root / "in"
    write_image(
        Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32), (1.0,) * 3),
        inputs / "case.nii.gz",
    )
    prepared = root / "prepared"
    plan(dataset, prepared, show_progress=False)
    preprocess(dataset, prepared, show_progress=False)
    trials = []
    py = [sys.executable, "-m", "medseg.cli.main", "--quiet", "--device", "cpu"]
    for kb in free_kb:
        disk.FREE_KB = kb
        for command in ("predict", "train"):
            mount = root / f"full_{command}_{kb}"
            if command == "predict":
                argv = [*py, "predict", str(model_dir), str(inputs), "-o", f"{mount}/pred",
                        "--uncertainty"]  # fmt: skip
                setup = ""
            else:
                argv = [*py, "train", str(dataset), "-w", f"{mount}/work", "--epochs", "1",
                        "--iterations-per-epoch", "1", "--no-augmentation"]  # fmt: skip
                setup = f"cp -r '{prepared}' '{mount}/work'"
            before = disk.digest(inputs if command == "predict" else dataset)
            code, err, files = disk.on_full_tmpfs(mount, setup, argv)
            lines = [x for x in err.strip().splitlines() if x.strip()]
            trials.append(
                {
                    "command": command,
                    "free_kb": kb,
                    "exit_code": code,
                    "one_line_no_space": code != 0
                    and len(lines) == 1
                    and f"no space left on {mount}" in lines[0],
                    "temporaries_left": sum(Path(f).name.startswith(".tmp-") for f in files),
                    "broken_files": sum(f.startswith("BROKEN") for f in files),
                    "input_untouched": disk.digest(inputs if command == "predict" else dataset)
                    == before,
                    "message": lines[-1][:160] if lines else "",
                }
            )
    return {"trials": trials}


def service_memory(root: Path, model_dir: Path, jobs: int, warmup: int = 50) -> dict:
    from fastapi.testclient import TestClient

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    upload = write_image(
        Image(np.random.default_rng(1).normal(size=(24, 24, 20)).astype(np.float32), (1.0,) * 3),
        root / "upload.nii.gz",
    ).read_bytes()
    app = create_app(model_dir, data_dir=root / "srv", device="cpu", job_rate_limit_per_minute=None)
    samples = []
    failed = 0
    with TestClient(app) as client:
        for i in range(jobs + warmup):
            files = {"file": ("case.nii.gz", upload, "application/gzip")}
            job = client.post("/jobs", files=files).json()
            while True:
                status = client.get(f"/jobs/{job['id']}").json()
                if status["status"] not in ("queued", "running"):
                    break
                time.sleep(0.002)
            failed += status["status"] != "done"
            if i + 1 == warmup or (i + 1 - warmup) % 100 == 0:
                samples.append({"jobs_after_warmup": i + 1 - warmup, "rss_mb": round(rss_mb(), 1)})
        kept = len(client.get("/jobs").json())
    start, end = samples[0]["rss_mb"], samples[-1]["rss_mb"]
    return {
        "jobs": jobs,
        "warmup_jobs": warmup,
        "failed_jobs": failed,
        "rss_start_mb": start,
        "rss_end_mb": end,
        "rss_growth_percent": round(100 * (end - start) / start, 2),
        "goal_percent": 10,
        "jobs_kept_in_memory": kept,
        "samples": samples,
        "job_folders_on_disk": len(list((root / "srv" / "jobs").iterdir())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (few trials)")
    parser.add_argument("--kill-trials", type=int, default=8, help="per command")
    parser.add_argument("--fuzz-runs", type=int, default=3000, help="atheris runs per target")
    parser.add_argument("--jobs", type=int, default=1000, help="service jobs for the RSS check")
    parser.add_argument("--output", default=str(RESULTS / "reliability.json"))
    args = parser.parse_args()
    if args.quick:
        args.kill_trials, args.fuzz_runs, args.jobs = 1, 100, 100
    started = time.time()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix="medseg-reliability-"))
    model_dir = make_model_dir(tmp / "m")
    dataset = write_phantom_dataset(tmp / "data", num_train=8, num_test=2, shape=(24, 24, 20))
    result = {"machine": machine(), "scaled_down": {}}
    t = time.time()
    (tmp / "corpus").mkdir()
    result["corpus"] = corpus(tmp / "corpus")
    (tmp / "pc").mkdir()
    result["corpus"]["predict_command"] = predict_corpus(tmp / "pc", model_dir)
    tried = sum(r["tried"] for r in result["corpus"].values())
    clean = sum(r["clean"] for r in result["corpus"].values())
    result["corpus_total"] = {
        "tried": tried,
        "clean": clean,
        "share_clean": round(clean / tried, 3),
    }
    result["seconds"] = {"corpus": round(time.time() - t, 1)}
    t = time.time()
    result["fuzz"] = fuzzing(args.fuzz_runs)
    result["seconds"]["fuzz"] = round(time.time() - t, 1)
    t = time.time()
    result["kill"] = kill_trials(tmp / "kill", args.kill_trials, model_dir, dataset)
    result["kill_total"] = {
        "trials": sum(v["trials"] for v in result["kill"].values()),
        "corrupt_outputs_after_kill": sum(v["corrupt_after_kill"] for v in result["kill"].values()),
        "reruns_failed": sum(v["rerun_failed"] for v in result["kill"].values()),
        "goal": 0,
    }
    result["seconds"]["kill"] = round(time.time() - t, 1)
    t = time.time()
    (tmp / "disk").mkdir()
    result["full_disk"] = full_disk(tmp / "disk", model_dir, dataset, [0, 4, 256])
    result["seconds"]["full_disk"] = round(time.time() - t, 1)
    t = time.time()
    (tmp / "svc").mkdir()
    result["service"] = service_memory(tmp / "svc", model_dir, args.jobs)
    result["seconds"]["service"] = round(time.time() - t, 1)
    result["scaled_down"] = {
        "kill_trials_per_command": f"{args.kill_trials} instead of the issue's 20 (CPU budget "
        "of ~10 slot-minutes shared with six other helpers)",
        "atheris_runs_per_target": args.fuzz_runs,
    }
    result["seconds"]["total"] = round(time.time() - started, 1)
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    path = write_result(result, args.output)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
