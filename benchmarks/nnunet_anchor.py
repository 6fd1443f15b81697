#!/usr/bin/env python3
"""nnU-Net v2 anchor for the medseg comparison benchmark.

Trains and evaluates nnU-Net v2 (2.6.0, installed in its own venv by
benchmarks/setup_nnunet_env.sh) on the same train/val split and within the same wall-clock budget
(preprocessing + training) as medseg's own pipeline, then writes one JSON result file.

nnU-Net is used as an installed tool only: its command-line programs are called by path from the
venv, with nnUNet_raw / nnUNet_preprocessed / nnUNet_results set for those subprocesses alone.
Training uses nnUNetTrainer_MedsegTimeBudget (written by the setup script): the default
nnUNetTrainer (default network, patch size, batch size, augmentation, 250 iterations per epoch)
that ends at the budget's deadline with a checkpoint_final.pth, its epoch count (and so its poly
learning-rate schedule) fitted to the time left after each epoch.

Needs numpy and nibabel; under a python without them (e.g. the system python3) it re-runs itself
with the nnU-Net venv's python.

Full run (takes the budget + prediction time and both cores; nothing else should run):
    bash benchmarks/setup_nnunet_env.sh
    python3 benchmarks/nnunet_anchor.py --dataset ../shared/datasets/Task04_Hippocampus \\
        --split benchmarks/splits/hippocampus.json --budget-minutes 30 \\
        --out benchmarks/results/nnunet_anchor_hippocampus.json

Smoke run (about 4 minutes; short epochs so that epoch ends, validation and the schedule refit
run too):
    python3 benchmarks/nnunet_anchor.py --dataset ../shared/datasets/Task04_Hippocampus \\
        --split benchmarks/splits/hippocampus.json --budget-minutes 3 --max-train-cases 20 \\
        --max-val-cases 4 --iterations-per-epoch 5 --work-dir benchmarks/work/nnunet_smoke \\
        --out benchmarks/work/nnunet_anchor_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import nibabel as nib
    import numpy as np
except ImportError:  # main() re-runs this script with the nnU-Net venv's python, which has both
    nib = np = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / "benchmarks" / "work" / "nnunet_venv"
DEFAULT_WORK_DIR = REPO / "benchmarks" / "work" / "nnunet"
TRAINER = "nnUNetTrainer_MedsegTimeBudget"
PLANS = "nnUNetPlans"
EXPECTED_NNUNET_VERSION = "2.6.0"


def log(msg: str) -> None:
    """Print a progress line with a timestamp."""
    print(f"[nnunet_anchor {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        type=Path,
        required=True,
        help="MSD-style task folder (dataset.json, imagesTr/, labelsTr/)",
    )
    p.add_argument(
        "--split", type=Path, required=True, help='JSON {"train": [case ids], "val": [case ids]}'
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        required=True,
        help="wall-clock budget for conversion + preprocessing + training",
    )
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="nnUNet_raw/_preprocessed/_results and predictions go here (default: %(default)s)",
    )
    p.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help="nnU-Net venv made by setup_nnunet_env.sh (default: %(default)s)",
    )
    p.add_argument(
        "--dataset-id",
        type=int,
        default=None,
        help="nnU-Net dataset id (default: the number in the folder name, TaskNN_...)",
    )
    p.add_argument(
        "--dataset-name", default=None, help="nnU-Net dataset name (default: from the folder name)"
    )
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument(
        "--num-processes",
        type=int,
        default=2,
        help="-np/-npfp for preprocessing, -npp/-nps for prediction (default: 2)",
    )
    p.add_argument(
        "--max-train-cases",
        type=int,
        default=None,
        help="smoke runs: use only the first N training cases of the split",
    )
    p.add_argument(
        "--max-val-cases",
        type=int,
        default=None,
        help="smoke runs: use only the first N validation cases of the split",
    )
    p.add_argument(
        "--fixed-schedule",
        action="store_true",
        help="keep nnU-Net's 1000-epoch LR schedule and cut at the deadline instead "
        "of fitting the number of epochs to the budget",
    )
    p.add_argument(
        "--iterations-per-epoch",
        type=int,
        default=None,
        help="train iterations per epoch (nnU-Net default: 250; validation iterations "
        "are scaled alike, 50 per 250). Shorter epochs let the LR schedule fit "
        "a budget that is shorter than a few default epochs",
    )
    p.add_argument(
        "--disable-tta",
        action="store_true",
        help="predict without mirroring test-time augmentation (nnU-Net default: on)",
    )
    return p.parse_args(argv)


def venv_exe(venv: Path, name: str) -> Path:
    """Path of an executable in the nnU-Net venv."""
    return venv / "bin" / name


def nnunet_cmd(venv: Path, tool: str, arguments: str) -> list[str]:
    """argv of an nnU-Net program in the venv; `arguments` is split on whitespace."""
    return [str(venv_exe(venv, tool)), *arguments.split()]


def shown(cmd: list[str]) -> str:
    """A command as it would be typed, with the program's name instead of its path."""
    return shlex.join([Path(cmd[0]).name, *cmd[1:]])


def machine_info(load_start: tuple[float, float, float]) -> dict[str, Any]:
    """CPU, platform, python and load averages (other work on the machine skews timings)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
    }


def venv_versions(venv: Path) -> dict[str, str]:
    """Versions of torch, nnunetv2 and dynamic-network-architectures inside the venv."""
    code = (
        "import json\nfrom importlib.metadata import version\n"
        "print(json.dumps({n: version(n) for n in "
        "('torch', 'nnunetv2', 'dynamic-network-architectures')}))"
    )
    out = subprocess.run(
        [str(venv_exe(venv, "python")), "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def check_venv(venv: Path) -> dict[str, str]:
    """Fail early, with the fix, if the venv or the budgeted trainer is missing."""
    hint = "run: bash benchmarks/setup_nnunet_env.sh"
    if not venv_exe(venv, "nnUNetv2_train").exists():
        sys.exit(f"nnU-Net venv not found at {venv}; {hint}")
    trainers = list(
        venv.glob(
            f"lib/python*/site-packages/nnunetv2/training/nnUNetTrainer/variants/{TRAINER}.py"
        )
    )
    if not trainers:
        sys.exit(f"{TRAINER} is not installed in {venv}; {hint}")
    versions = venv_versions(venv)
    if versions["nnunetv2"] != EXPECTED_NNUNET_VERSION:
        log(
            f"warning: nnunetv2 {versions['nnunetv2']} in the venv, "
            f"expected {EXPECTED_NNUNET_VERSION}"
        )
    return versions


def dataset_identity(dataset: Path, dataset_id: int | None, name: str | None) -> tuple[int, str]:
    """nnU-Net dataset id and name, by default taken from an MSD folder name (Task04_Name)."""
    m = re.fullmatch(r"Task(\d+)_(.+)", dataset.name)
    if dataset_id is None:
        if not m:
            sys.exit(f"cannot infer --dataset-id from {dataset.name!r}")
        dataset_id = int(m.group(1))
    if name is None:
        name = m.group(2) if m else dataset.name
    return dataset_id, name


def load_split(
    path: Path, max_train: int | None, max_val: int | None
) -> tuple[list[str], list[str]]:
    """Train and val case ids of the split, optionally truncated for smoke runs."""
    split = json.loads(path.read_text())
    train, val = list(split["train"]), list(split["val"])
    if set(train) & set(val):
        sys.exit(f"{path}: train and val overlap")
    return train[:max_train], val[:max_val]


def safe_rmtree(path: Path, root: Path) -> None:
    """Remove a folder, refusing anything outside the work dir."""
    if root.resolve() not in path.resolve().parents:
        raise ValueError(f"refusing to delete {path}: not inside {root}")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def link(src: Path, dst: Path) -> None:
    """Symlink dst -> src (absolute)."""
    dst.symlink_to(src.resolve())


def write_label(src: Path, dst: Path) -> bool:
    """Symlink an integer label map; write a uint8 copy of a float one. True if converted."""
    img = nib.load(str(src))
    if np.issubdtype(img.get_data_dtype(), np.integer):
        link(src, dst)
        return False
    data = np.asarray(img.dataobj)
    rounded = np.rint(data)
    if not np.array_equal(data, rounded) or rounded.min() < 0 or rounded.max() > 255:
        raise ValueError(f"{src}: label values are not integers in 0..255")
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    out = nib.Nifti1Image(rounded.astype(np.uint8), img.affine, header)
    nib.save(out, str(dst))
    return True


def convert_to_raw(dataset: Path, raw_dir: Path, cases: list[str], name: str) -> list[str]:
    """Write the nnU-Net v2 raw dataset (symlinked images, labels, dataset.json).

    Returns the ids whose labels were converted from float to uint8 copies.
    """
    msd = json.loads((dataset / "dataset.json").read_text())
    (raw_dir / "imagesTr").mkdir(parents=True)
    (raw_dir / "labelsTr").mkdir()
    converted = []
    for case in cases:
        link(dataset / "imagesTr" / f"{case}.nii.gz", raw_dir / "imagesTr" / f"{case}_0000.nii.gz")
        if write_label(
            dataset / "labelsTr" / f"{case}.nii.gz", raw_dir / "labelsTr" / f"{case}.nii.gz"
        ):
            converted.append(case)
    dataset_json = {
        "name": name,
        "channel_names": msd.get("modality", msd.get("channel_names")),
        "labels": {v: int(k) for k, v in msd["labels"].items()},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (raw_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return converted


def run_logged(cmd: list[str], env: dict[str, str], log_path: Path) -> float:
    """Run a command with stdout+stderr to a log file; exit with the log's tail on failure."""
    log(f"$ {' '.join(cmd)}  (log: {log_path})")
    start = time.time()
    with log_path.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    if rc != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"command failed (exit {rc}) after {seconds:.0f} s: {' '.join(cmd)}\n{tail}")
    return seconds


def read_plans(preprocessed: Path, configuration: str) -> dict[str, Any]:
    """Patch size, batch size, spacing and network of a configuration in nnUNetPlans.json."""
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    cfg = plans["configurations"][configuration]
    arch = cfg.get("architecture", {})
    return {
        "patch_size": cfg["patch_size"],
        "batch_size": cfg["batch_size"],
        "spacing": cfg["spacing"],
        "median_image_size_in_voxels": cfg.get("median_image_size_in_voxels"),
        "network": arch.get("network_class_name"),
        "n_stages": arch.get("arch_kwargs", {}).get("n_stages"),
    }


def epoch_seconds_from_log(fold_dir: Path) -> list[float]:
    """'Epoch time: X s' values from the newest nnU-Net training log in a fold folder."""
    logs = sorted(fold_dir.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return []
    return [float(x) for x in re.findall(r"Epoch time: ([0-9.]+) s", logs[-1].read_text())]


def dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty."""
    denom = int(pred.sum()) + int(ref.sum())
    if denom == 0:
        return None
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def evaluate(
    pred_dir: Path, label_dir: Path, cases: list[str], labels: dict[int, str]
) -> list[dict[str, Any]]:
    """Per-case Dice for every foreground label (reference: the shared labelsTr)."""
    rows = []
    for case in cases:
        pred = np.asarray(nib.load(str(pred_dir / f"{case}.nii.gz")).dataobj)
        ref = np.rint(np.asarray(nib.load(str(label_dir / f"{case}.nii.gz")).dataobj))
        if pred.shape != ref.shape:
            raise ValueError(f"{case}: prediction {pred.shape} vs label {ref.shape}")
        per_class = {str(c): dice(pred == c, ref == c) for c in labels}
        valid = [d for d in per_class.values() if d is not None]
        rows.append(
            {"case": case, "dice": per_class, "dice_mean": float(np.mean(valid)) if valid else None}
        )
    return rows


def summarize(values: list[float | None]) -> dict[str, Any]:
    """Mean, median, std, min, max of the non-missing values."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {
        "n": len(v),
        "mean": statistics.fmean(v),
        "median": statistics.median(v),
        "std": statistics.pstdev(v),
        "min": min(v),
        "max": max(v),
    }


def fmt(x: float | None) -> str:
    """Four decimals, or 'n/a'."""
    return "n/a" if x is None else f"{x:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, preprocess, train within the budget, predict, evaluate, write the JSON."""
    args = parse_args(argv)
    venv = args.venv.absolute()
    versions = check_venv(venv)
    if np is None or nib is None:
        py = venv_exe(venv, "python")
        if Path(sys.executable).absolute() == py:
            sys.exit("numpy and nibabel are needed")
        log(f"numpy/nibabel not importable here; re-running with {py}")
        os.execv(py, [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])
    dataset = args.dataset.resolve()
    work = args.work_dir.resolve()
    dataset_id, name = dataset_identity(dataset, args.dataset_id, args.dataset_name)
    folder = f"Dataset{dataset_id:03d}_{name}"
    train, val = load_split(args.split, args.max_train_cases, args.max_val_cases)
    msd_labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    fg_labels = {int(k): v for k, v in msd_labels.items() if int(k) != 0}
    budget_s = args.budget_minutes * 60.0

    raw, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    logs, pred_in, pred_out = work / "logs", work / "predict" / "input", work / "predict" / "output"
    for stale in (raw / folder, pre / folder, res / folder, logs, work / "predict"):
        safe_rmtree(stale, work)
    for d in (raw, pre, res, logs, pred_in, pred_out):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res)
    )
    load_start = os.getloadavg()
    log(
        f"{folder}: {len(train)} train / {len(val)} val cases, budget {args.budget_minutes} min, "
        f"work dir {work}"
    )

    # budget clock: conversion + preprocessing + training
    t0 = time.time()
    deadline = t0 + budget_s
    converted = convert_to_raw(dataset, raw / folder, train + val, name)
    convert_s = time.time() - t0
    if converted:
        log(f"float labels written as uint8 copies: {', '.join(converted)}")

    np_ = str(args.num_processes)
    preprocess_cmd = nnunet_cmd(
        venv,
        "nnUNetv2_plan_and_preprocess",
        f"-d {dataset_id} -c {args.configuration} -np {np_} -npfp {np_} --verify_dataset_integrity",
    )
    preprocess_s = run_logged(preprocess_cmd, env, logs / "plan_and_preprocess.log")
    # fold 0 = exactly our split (nnU-Net uses splits_final.json if it exists)
    (pre / folder / "splits_final.json").write_text(
        json.dumps([{"train": train, "val": val}], indent=1)
    )
    plans = read_plans(pre / folder, args.configuration)
    log(
        f"preprocessing {preprocess_s:.0f} s; plans: patch {plans['patch_size']}, "
        f"batch {plans['batch_size']}, spacing {plans['spacing']}"
    )

    train_env = dict(
        MEDSEG_NNUNET_DEADLINE=repr(deadline),
        MEDSEG_NNUNET_ADAPT_SCHEDULE="0" if args.fixed_schedule else "1",
        MEDSEG_NNUNET_SKIP_FINAL_VALIDATION="1",
    )
    if args.iterations_per_epoch:
        train_env["MEDSEG_NNUNET_ITERATIONS_PER_EPOCH"] = str(args.iterations_per_epoch)
    log(f"training until the deadline, {deadline - time.time():.0f} s from now")
    train_cmd = nnunet_cmd(
        venv,
        "nnUNetv2_train",
        f"{dataset_id} {args.configuration} 0 -tr {TRAINER} -p {PLANS} -device cpu",
    )
    train_s = run_logged(train_cmd, env | train_env, logs / "train.log")
    budget_used_s = time.time() - t0
    fold_dir = res / folder / f"{TRAINER}__{PLANS}__{args.configuration}" / "fold_0"
    summary = json.loads((fold_dir / "budget_summary.json").read_text())
    epoch_s = epoch_seconds_from_log(fold_dir)
    iters = int(summary["train_iterations"])
    per_epoch = int(summary["num_iterations_per_epoch"])
    it_per_s = iters / summary["train_step_seconds"] if summary["train_step_seconds"] else None
    log(
        f"training {train_s:.0f} s: {iters} iterations "
        f"({iters / per_epoch:.2f} epochs of {per_epoch}), "
        f"{(1 / it_per_s) if it_per_s else float('nan'):.2f} s/iteration; "
        f"budget used {budget_used_s:.0f} of {budget_s:.0f} s"
    )

    checkpoint = "checkpoint_final.pth"
    if not (fold_dir / checkpoint).exists():
        sys.exit(f"no {checkpoint} in {fold_dir}")
    for case in val:
        link(dataset / "imagesTr" / f"{case}.nii.gz", pred_in / f"{case}_0000.nii.gz")
    predict_cmd = [
        *nnunet_cmd(
            venv,
            "nnUNetv2_predict",
            f"-d {dataset_id} -c {args.configuration} -f 0 -tr {TRAINER} -p {PLANS} "
            f"-chk {checkpoint} -device cpu -npp {np_} -nps {np_}",
        ),
        *("-i", str(pred_in), "-o", str(pred_out)),
    ]
    if args.disable_tta:
        predict_cmd.append("--disable_tta")
    predict_s = run_logged(predict_cmd, env, logs / "predict.log")

    per_case = evaluate(pred_out, dataset / "labelsTr", val, fg_labels)
    dice_per_class = {
        str(c): {"name": n, **summarize([r["dice"][str(c)] for r in per_case])}
        for c, n in fg_labels.items()
    }
    class_means = [d["mean"] for d in dice_per_class.values() if d["mean"] is not None]
    case_means = summarize([r["dice_mean"] for r in per_case])

    result = {
        "tool": "nnunetv2",
        "version": versions["nnunetv2"],
        "dynamic_network_architectures_version": versions["dynamic-network-architectures"],
        "torch_version": versions["torch"],
        "command": sys.argv,
        "nnunet_commands": {
            "plan_and_preprocess": shown(preprocess_cmd),
            "train": shown(train_cmd),
            "train_env": train_env,
            "predict": shown(predict_cmd),
        },
        "machine": machine_info(load_start),
        "dataset": str(dataset),
        "nnunet_dataset": folder,
        "split": str(args.split),
        "n_train": len(train),
        "n_val": len(val),
        "smoke": args.max_train_cases is not None or args.max_val_cases is not None,
        "float_labels_converted_to_uint8": converted,
        "configuration": args.configuration,
        "trainer": TRAINER,
        "trainer_notes": "default nnUNetTrainer (network, patch, batch, augmentation, loss, "
        f"{per_epoch} train + {summary['num_val_iterations_per_epoch']} val "
        "iterations per epoch); ends at the budget deadline; "
        + (
            "1000-epoch LR schedule cut at the deadline"
            if args.fixed_schedule
            else "epoch count / poly LR schedule refitted to the time left after each epoch"
        ),
        "budget_minutes": args.budget_minutes,
        "budget_used_seconds": budget_used_s,
        "convert_seconds": convert_s,
        "preprocess_seconds": preprocess_s,
        "train_seconds": train_s,
        "predict_seconds": predict_s,
        "checkpoint": checkpoint,
        "tta": not args.disable_tta,
        "epochs_completed": iters // per_epoch,
        "epochs_fractional": iters / per_epoch,
        "epochs_in_final_schedule": summary["num_epochs_schedule"],
        "iterations": iters,
        "iterations_per_epoch": per_epoch,
        "iterations_per_second": it_per_s,
        "seconds_per_iteration": 1 / it_per_s if it_per_s else None,
        "epoch_seconds": epoch_s,
        "iterations_per_second_from_epoch_times": per_epoch / statistics.fmean(epoch_s)
        if epoch_s
        else None,
        "val_iterations_per_epoch": summary["num_val_iterations_per_epoch"],
        "stopped_mid_epoch": summary["stopped_mid_epoch"],
        "patch_size": plans["patch_size"],
        "batch_size": plans["batch_size"],
        "plans": plans,
        "dice_per_class": dice_per_class,
        "dice_mean": statistics.fmean(class_means) if class_means else None,
        "dice_case_mean": case_means,
        "dice_note": "Dice per case and foreground class vs the shared labelsTr; 'mean' and "
        "'median' are over validation cases; dice_mean is the mean of the class "
        "means; a case where both masks are empty gets null and is left out",
        "per_case": per_case,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for c, d in dice_per_class.items():
        log(
            f"Dice {c} ({d['name']}): mean {fmt(d['mean'])}, median {fmt(d['median'])} (n={d['n']})"
        )
    log(
        f"Dice mean {fmt(result['dice_mean'])}; per-case mean Dice: median "
        f"{fmt(case_means['median'])}; predict {predict_s:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
