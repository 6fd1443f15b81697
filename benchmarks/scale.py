"""Scale-out benchmark (issue 21): data-parallel training and fanned-out batch inference.

Training (hippocampus plan, fold of benchmarks/splits/hippocampus.json): 1 process x 2
threads against 2 gloo ranks x 1 thread, the same number of optimizer steps with the same
global batch (so the same samples seen): samples/s ratio and validation Dice at the end.
Inference (the 42 validation cases, the trained model of /work/bench/hippo_after): the
in-process pipeline (sequential reference), the local engine with 1 and 2 workers and Ray
with 2 workers: cases/s, peak memory of the process tree, labels identical to the reference.

Run on both cores::

    /work/tools/slot both .venv/bin/python benchmarks/scale.py --steps 120

Writes benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, SHARED, machine, write_result

from medseg import api
from medseg.inference.fanout import fanout_summary, predict_fanout
from medseg.io import read_image
from medseg.training import TrainConfig

BENCH = Path("/work/bench/hippo_after")
SCRATCH = Path(__file__).resolve().parent / "work" / "scale"
DATASET = SHARED / "Task04_Hippocampus"
SPLIT = REPO / "benchmarks" / "splits" / "hippocampus.json"
# fp32: bf16 autocast (the "auto" default on this CPU) flips a few tie voxels when the
# thread count changes (2 of ~70k per case seen), which would hide real differences
PRECISION = "fp32"


class TreeMemory:
    """Peak resident memory (MB) of this process and all its descendants, sampled."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> float:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(d)] = int(fields[1])
                rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
        mine, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            p = frontier.pop()
            for child, parent in parents.items():
                if parent == p and child not in mine:
                    mine.add(child)
                    frontier.append(child)
        return sum(rss.get(p, 0) for p in mine) / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(self.interval)

    def __enter__(self) -> TreeMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._tree_rss())


def work_copy(name: str) -> Path:
    """A work folder with the benchmark's plan and a copy of its preprocessed cases."""
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for f in ("dataset.json", "fingerprint.json", "plan.json"):
        shutil.copy(BENCH / f, work / f)
    shutil.copytree(BENCH / "preprocessed", work / "preprocessed")  # the source is read-only
    return work


def last_row(work: Path) -> dict:
    import csv

    with open(work / "model" / "fold_0" / "log.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def part_training(steps: int) -> dict:
    split = json.loads(SPLIT.read_text())
    split_file = SCRATCH / "split.json"
    split_file.write_text(json.dumps({"train": split["train"], "val": split["val"]}))
    config = TrainConfig(
        max_epochs=2, iterations_per_epoch=steps // 2, seed=0, max_validation_cases=42
    )
    arms = {}
    # the order alternates nothing: one run each, 2 ranks first (the fresher machine state
    # goes to the arm under test, so a bias would flatter the baseline, not the new code)
    for name, nproc, threads in (("2_ranks_x_1_thread", 2, 1), ("1_process_x_2_threads", 1, 2)):
        work = work_copy(f"train_{name}")
        t = time.perf_counter()
        with TreeMemory() as mem:
            result = api.train(
                DATASET,
                work,
                config=replace(config, num_threads=threads),
                split_file=split_file,
                show_progress=False,
                nproc=nproc,
            )[0]
        row = last_row(work)
        arms[name] = {
            "nproc": nproc,
            "threads_per_process": threads,
            "wall_s": round(time.perf_counter() - t, 1),
            "iterations": result.iterations,
            "samples_seen": result.iterations
            * json.loads((work / "plan.json").read_text())["batch_size"],
            "samples_per_second": result.samples_per_second,
            "val_dice_at_end": float(row["val_dice_mean"]),
            "best_val_dice": result.best_val_dice,
            "peak_tree_rss_mb": round(mem.peak, 1),
        }
        print(name, arms[name], flush=True)
    two, one = arms["2_ranks_x_1_thread"], arms["1_process_x_2_threads"]
    ratio = two["samples_per_second"] / one["samples_per_second"]
    dice_gap = abs(two["val_dice_at_end"] - one["val_dice_at_end"])
    return {
        "arms": arms,
        "samples_per_second_ratio": round(ratio, 3),
        "dice_gap_at_equal_samples": round(dice_gap, 4),
        "goal_ratio_ge_0_95": ratio >= 0.95,
        "goal_dice_within_0_005": dice_gap <= 0.005,
        "scaled_down": f"{steps} optimizer steps per arm (2 epochs of {steps // 2}) instead of "
        "a full training; Dice after so few steps is far from converged",
    }


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_image(p).array for p in sorted(folder.glob("*.nii.gz"))}


def part_inference() -> dict:
    val = json.loads(SPLIT.read_text())["val"]
    inputs = SCRATCH / "infer_input"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    for case in val:
        (inputs / f"{case}.nii.gz").symlink_to(DATASET / "imagesTr" / f"{case}.nii.gz")
    model = BENCH / "model"
    arms: dict[str, dict] = {}
    runs = {
        "sequential_in_process": None,
        "local_1_worker": ("local", 1),
        "local_2_workers": ("local", 2),
        "ray_2_workers": ("ray", 2),
    }
    reference = None
    for name, how in runs.items():
        out = SCRATCH / f"infer_{name}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        with TreeMemory() as mem:
            if how is None:
                n = len(
                    api.predict(
                        model, inputs, out, device="cpu", precision=PRECISION, show_progress=False
                    )
                )
                extra = {}
            else:
                stamps: list[float] = []
                result = predict_fanout(
                    model,
                    inputs,
                    out,
                    engine=how[0],
                    workers=how[1],
                    device="cpu",
                    precision=PRECISION,
                    show_progress=False,
                    on_outcome=lambda _, stamps=stamps: stamps.append(time.perf_counter()),
                )
                n, extra = len(result.predictions), fanout_summary(result)
                # after start-up: cases/s between the first and the last finished case
                extra["first_case_after_s"] = round(stamps[0] - t, 2)
                extra["steady_cases_per_second"] = round(
                    (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), 3
                )
        wall = time.perf_counter() - t
        labels = labels_of(out)
        if reference is None:
            reference = labels
        differing = sum(
            int((labels[k] != reference[k]).sum()) if k in labels else reference[k].size
            for k in reference
        )
        identical = labels.keys() == reference.keys() and differing == 0
        arms[name] = {
            "cases": n,
            "wall_s": round(wall, 2),
            "cases_per_second": round(n / wall, 3),
            "peak_tree_rss_mb": round(mem.peak, 1),
            "labels_identical_to_sequential": identical,
            "differing_voxels": differing,
            **extra,
        }
        print(name, arms[name], flush=True)
    base = max(arms["local_1_worker"]["cases_per_second"], 1e-9)
    local2 = arms["local_2_workers"]["cases_per_second"]
    ray2 = max(arms["ray_2_workers"]["cases_per_second"], 1e-9)
    return {
        "arms": arms,
        "speedup_local_2_vs_local_1": round(local2 / base, 3),
        "speedup_local_2_vs_in_process": round(
            local2 / max(arms["sequential_in_process"]["cases_per_second"], 1e-9), 3
        ),
        "ray_overhead_vs_local_2": round(local2 / ray2 - 1, 3),
        "steady_speedup_local_2_vs_local_1": round(
            arms["local_2_workers"]["steady_cases_per_second"]
            / max(arms["local_1_worker"]["steady_cases_per_second"], 1e-9),
            3,
        ),
        "steady_ray_overhead_vs_local_2": round(
            arms["local_2_workers"]["steady_cases_per_second"]
            / max(arms["ray_2_workers"]["steady_cases_per_second"], 1e-9)
            - 1,
            3,
        ),
        "goal_speedup_ge_1_3": local2 / base >= 1.3,
        "goal_ray_overhead_le_10pct": local2 / ray2 - 1 <= 0.10,
        "goal_labels_identical": all(a["labels_identical_to_sequential"] for a in arms.values()),
        "precision": PRECISION,
        "note": "wall time includes starting the workers and loading the model in each "
        "(and starting a local Ray instance for Ray)",
    }


def markdown(data: dict) -> str:
    lines = ["# Scale-out benchmark (issue 21)", "", f"Command: `{data['machine']['command']}`"]
    lines += [f"CPU: {data['machine']['cpu']}, {data['machine']['cores']} cores", ""]
    if "training" in data:
        tr = data["training"]
        lines += ["## Training (hippocampus, equal steps and samples)", ""]
        lines += ["| arm | samples/s | val Dice at end | wall s | peak tree RSS MB |"]
        lines += ["|---|---|---|---|---|"]
        for name, a in tr["arms"].items():
            lines.append(
                f"| {name} | {a['samples_per_second']} | {a['val_dice_at_end']:.4f} | "
                f"{a['wall_s']} | {a['peak_tree_rss_mb']} |"
            )
        lines += [
            "",
            f"Ratio 2 ranks / 1 process: **{tr['samples_per_second_ratio']}** (goal >= 0.95: "
            f"{'met' if tr['goal_ratio_ge_0_95'] else 'MISSED'}); Dice gap "
            f"**{tr['dice_gap_at_equal_samples']}** (goal <= 0.005: "
            f"{'met' if tr['goal_dice_within_0_005'] else 'MISSED'}). {tr['scaled_down']}.",
            "",
        ]
    if "inference" in data:
        inf = data["inference"]
        lines += ["## Inference (42 hippocampus validation cases)", ""]
        lines += [
            "| arm | cases/s (wall) | cases/s after start-up | first case s | wall s "
            "| peak tree RSS MB | labels identical |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, a in inf["arms"].items():
            lines.append(
                f"| {name} | {a['cases_per_second']} | {a.get('steady_cases_per_second', '-')} "
                f"| {a.get('first_case_after_s', '-')} | {a['wall_s']} | "
                f"{a['peak_tree_rss_mb']} | {a['labels_identical_to_sequential']} |"
            )
        lines += [
            "",
            f"Local 2 workers vs 1: **{inf['speedup_local_2_vs_local_1']}x** (goal >= 1.3: "
            f"{'met' if inf['goal_speedup_ge_1_3'] else 'MISSED'}); Ray overhead vs local at 2 "
            f"workers: **{inf['ray_overhead_vs_local_2']:+.1%}** (goal <= 10%: "
            f"{'met' if inf['goal_ray_overhead_le_10pct'] else 'MISSED'}); labels identical: "
            f"{inf['goal_labels_identical']}. After start-up: local 2 vs 1 "
            f"{inf['steady_speedup_local_2_vs_local_1']}x, Ray overhead "
            f"{inf['steady_ray_overhead_vs_local_2']:+.1%}. Precision {inf['precision']}. "
            f"{inf['note']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per training arm")
    parser.add_argument("--part", choices=("train", "infer", "all"), default="all")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    data: dict = {"machine": machine()}
    path = RESULTS / "scale.json"
    if path.exists():  # keep the other part of an earlier run
        old = json.loads(path.read_text())
        data.update({k: old[k] for k in ("training", "inference") if k in old})
    if args.part in ("train", "all"):
        data["training"] = part_training(args.steps)
        data["training"]["command"] = data["machine"]["command"]
    if args.part in ("infer", "all"):
        data["inference"] = part_inference()
        data["inference"]["command"] = data["machine"]["command"]
    write_result(data, path)
    (RESULTS / "scale.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
