"""Continual learning on Task04_Hippocampus: class- and domain-incremental steps (issue 18).

Class-incremental (``ci``): step 1 trains on half of the fixed split's training cases with
the anterior label only (posterior merged into background); step 2 extends that model on
the other half, which labels only the posterior (anterior is background there), with
each method. Upper bound: joint training on all training cases with both labels and the
same total number of iterations (both steps). Lower bound: naive fine-tuning.

Domain-incremental (``di``): site A is one half of the training cases, site B the other
half. The uint8 and float32 image groups of the dataset are compared first (z-scored
foreground intensity and contrast, as the network sees them); when they do not differ
enough, site B is made by a documented, seeded scanner shift (:func:`scanner_shift`).
Each method extends the site-A model on site B; the 42 validation cases are scored in
both versions.

Every run trains the same number of iterations per step on one core (``--iterations``),
with a scaled-down plan (see ``SCALE``) so that the whole benchmark fits its CPU budget.
Scores: Dice per class at the preprocessed resolution on the 42 validation cases; ACC
(mean final Dice over the tasks) and BWT (old-task Dice after the last step minus after
its own step) per method.

Usage::

    python benchmarks/continual.py ci --iterations 400
    python benchmarks/continual.py di --iterations 400
    python benchmarks/continual.py report     # merges both into results/continual.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, SHARED, machine, write_result

from medseg import api
from medseg.continual import dice_on_cases, extend_spec
from medseg.io import read_image, write_image
from medseg.io.dataset import load_dataset
from medseg.model_folder import ModelFolder
from medseg.planning import read_plan
from medseg.preprocessing import load_preprocessed, preprocess_dataset
from medseg.serialization import write_json_atomic
from medseg.training import TrainConfig

HIPPO = SHARED / "Task04_Hippocampus"
SPLIT = REPO / "benchmarks" / "splits" / "hippocampus.json"
BASE_PLAN = Path("/work/bench/hippo_after/model/plan.json")
WORK = Path(os.environ.get("CONTINUAL_WORK", REPO / "benchmarks" / "work" / "continual"))
SEED = 20261203
SCALE = {
    "network_features": [8, 16, 32, 64],
    "patch_size": [32, 40, 32],
    "batch_size": 2,
    "note": "the 30-minute protocol's plan (features 16-128, patch 40x56x40, batch 4) scaled "
    "down 4x in width and 2x in patch and batch so that each step takes one or two minutes "
    "of one core",
}
# run name -> (method, head initialization of the new classes)
CI_METHODS = {
    "naive": ("naive", "copy"),
    "lwf": ("lwf", "copy"),
    "mib": ("mib", "copy"),
    "plop": ("plop", "copy"),
    "mib_mibinit": ("mib", "mib"),  # MiB's own head initialization (background copy)
    "plop_mibinit": ("plop", "mib"),
}
# run name -> (method, weight of its term; None: the default)
DI_METHODS = {
    "naive": ("naive", None),
    "lwf": ("lwf", None),
    "ewc": ("ewc", None),
    "rehearsal": ("rehearsal", None),
    "ewc_weight1": ("ewc", 1.0),  # the default 100 kept site B from being learned
}
EXEMPLARS = 5


def train_config(iterations: int, *, learning_rate: float) -> TrainConfig:
    per_epoch = min(50, iterations)
    return TrainConfig(
        max_epochs=max(1, iterations // per_epoch),
        iterations_per_epoch=per_epoch,
        batch_size=SCALE["batch_size"],
        optimizer="adamw",
        learning_rate=learning_rate,
        max_validation_cases=0,
        device="cpu",
        num_threads=1,
        seed=SEED % 1000,
    )


def scaled_plan(labels: dict[int, str]):
    plan = read_plan(BASE_PLAN)
    network = replace(plan.network, features=tuple(SCALE["network_features"]))
    return replace(
        plan,
        labels=tuple(sorted(labels.items())),
        network=network,
        patch_size=tuple(SCALE["patch_size"]),
        batch_size=SCALE["batch_size"],
    )


def split() -> tuple[list[str], list[str], list[str]]:
    """Halves A and B of the fixed split's training cases (seeded), and its validation cases."""
    data = json.loads(SPLIT.read_text())
    train = sorted(data["train"])
    order = np.random.default_rng(SEED).permutation(len(train))
    half = len(train) // 2
    return [train[i] for i in order[:half]], [train[i] for i in order[half:]], sorted(data["val"])


def scanner_shift(image: np.ndarray, case_id: str) -> np.ndarray:
    """Site B's scanner, seeded per case: an inverted contrast curve, a bias field, noise
    and thick slices.

    1. contrast curve: intensities scaled to [0, 1] between their 1st and 99th
       percentiles, then ``1 - x ** 0.7`` (another MR weighting: dark structures bright);
    2. bias field: ``exp`` of a random linear + quadratic polynomial over the volume,
       about +-25 % across it;
    3. noise: Gaussian, sigma 0.04 of the range;
    4. resolution: every pair of slices along the first axis averaged (2 mm slices).
    """
    rng = np.random.default_rng(zlib.crc32(case_id.encode()) + SEED)
    x = image.astype(np.float64)
    lo, hi = np.percentile(x, [1, 99])
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    x = 1 - x**0.7
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in x.shape], indexing="ij")
    field = sum(rng.uniform(-0.15, 0.15) * g + rng.uniform(-0.1, 0.1) * g**2 for g in grids)
    x = x * np.exp(field)
    x = x + rng.normal(0, 0.04, x.shape)
    n = x.shape[0] - x.shape[0] % 2
    pairs = x[:n].reshape(n // 2, 2, *x.shape[1:]).mean(1)
    x[:n] = np.repeat(pairs, 2, axis=0)
    return (1000 * x).astype(np.float32)


def write_dataset(
    root: Path,
    cases: list[str],
    *,
    labels: dict[int, str],
    keep: dict[int, int],
    shift: bool = False,
) -> Path:
    """An MSD dataset of hippocampus ``cases``: labels mapped by ``keep`` (others -> 0),
    images linked (or shifted by :func:`scanner_shift`)."""
    if (root / "dataset.json").exists():
        return root
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for cid in cases:
        src = HIPPO / "imagesTr" / f"{cid}.nii.gz"
        dst = root / "imagesTr" / f"{cid}.nii.gz"
        if shift:
            image = read_image(src)
            write_image(image.with_array(scanner_shift(image.array, cid)), dst, overwrite=True)
        elif not dst.exists():
            os.symlink(src, dst)
        label = read_image(HIPPO / "labelsTr" / f"{cid}.nii.gz")
        mapped = np.zeros(label.array.shape, np.uint8)
        for old, new in keep.items():
            mapped[label.array == old] = new
        write_image(label.with_array(mapped), root / "labelsTr" / f"{cid}.nii.gz", overwrite=True)
    meta = {
        "name": root.name,
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in sorted({0: "background", **labels}.items())},
        "numTraining": len(cases),
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases
        ],
    }
    write_json_atomic(meta, root / "dataset.json")
    return root


def site_statistics(cases: list[str]) -> dict:
    """Per dtype group: z-scored foreground mean and foreground/background contrast."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for cid in cases:
        image = read_image(HIPPO / "imagesTr" / f"{cid}.nii.gz")
        label = read_image(HIPPO / "labelsTr" / f"{cid}.nii.gz").array
        x = image.array.astype(np.float64)
        z = (x - x.mean()) / max(x.std(), 1e-8)
        fg, bg = z[label > 0], z[label == 0]
        groups.setdefault(str(image.array.dtype), []).append(
            (float(fg.mean()), float((fg.mean() - bg.mean()) / bg.std()))
        )
    return {
        g: {
            "cases": len(v),
            "z_foreground_mean": float(np.mean([a for a, _ in v])),
            "contrast": float(np.mean([b for _, b in v])),
            "contrast_sd": float(np.std([b for _, b in v])),
        }
        for g, v in groups.items()
    }


def train_base(dataset: Path, work: Path, plan, split_file: Path, iterations: int) -> dict:
    """Train a step-1 (or joint) model with the scaled plan; skipped when already trained."""
    done = work / "model" / "fold_0" / "train_result.json"
    if not done.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(plan, work / "plan.json")
        api.train(
            dataset,
            work,
            config=train_config(iterations, learning_rate=3e-3),
            split_file=split_file,
            show_progress=False,
            num_workers=1,
        )
    return json.loads(done.read_text())


def extend_run(
    base: Path,
    dataset: Path,
    old_dataset: Path,
    work: Path,
    method: str,
    iterations: int,
    head_init: str = "copy",
    weight: float | None = None,
) -> dict:
    done = work / "model" / "fold_0" / "train_result.json"
    if not done.exists():
        # the methods of one part share the preprocessed new and old data (same plans)
        work.mkdir(parents=True, exist_ok=True)
        for name in ("preprocessed", "old_data"):
            shared = work.parent / f"shared_{name}"
            shared.mkdir(parents=True, exist_ok=True)
            if not (work / name).exists():
                os.symlink(shared, work / name)
        extend_spec(
            base,
            load_dataset(dataset),
            work,
            method=method,
            exemplars=EXEMPLARS,
            old_spec=load_dataset(old_dataset),
            config=train_config(iterations, learning_rate=1e-3),
            split_file=dataset / "split.json",
            head_init=head_init,
            weight=weight,
            num_workers=1,
            show_progress=False,
        )
    return json.loads(done.read_text())


def scores(model_dir: Path, cases) -> dict[str, float]:
    folder = ModelFolder.open(model_dir)
    network = folder.load_networks([0])[0]
    values = dice_on_cases(network, cases, folder.plan)
    names = dict(folder.plan.labels)
    return {names[c]: float(v) for c, v in enumerate(values, 1)}


def val_cases(name: str, val: list[str], *, shift: bool):
    root = write_dataset(
        WORK / "data" / name,
        val,
        labels={1: "Anterior", 2: "Posterior"},
        keep={1: 1, 2: 2},
        shift=shift,
    )
    plan = scaled_plan({0: "background", 1: "Anterior", 2: "Posterior"})
    # one work folder per validation set: they share case ids and the plan
    pre = preprocess_dataset(
        load_dataset(root), plan, WORK / "eval" / name, num_workers=1, show_progress=False
    )
    return load_preprocessed(pre, val)


def write_split(root: Path, train: list[str]) -> Path:
    return write_json_atomic({"train": train, "val": []}, root / "split.json")


def run_ci(iterations: int) -> dict:
    half_a, half_b, val = split()
    data = WORK / "data"
    d1 = write_dataset(data / "ci_step1", half_a, labels={1: "Anterior"}, keep={1: 1})
    d2 = write_dataset(data / "ci_step2", half_b, labels={2: "Posterior"}, keep={2: 2})
    dj = write_dataset(
        data / "ci_joint",
        half_a + half_b,
        labels={1: "Anterior", 2: "Posterior"},
        keep={1: 1, 2: 2},
    )
    for d, ids in ((d1, half_a), (d2, half_b), (dj, half_a + half_b)):
        write_split(d, ids)
    cases = val_cases("ci_val", val, shift=False)
    runs: dict = {}
    t = time.perf_counter()
    step1 = WORK / "ci" / "step1"
    runs["step1"] = {
        "train": train_base(
            d1, step1, scaled_plan({0: "background", 1: "Anterior"}), d1 / "split.json", iterations
        )
    }
    runs["step1"]["dice"] = scores(step1, cases)
    runs["step1"]["wall_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    joint = WORK / "ci" / "joint"
    runs["joint"] = {
        "train": train_base(
            dj,
            joint,
            scaled_plan({0: "background", 1: "Anterior", 2: "Posterior"}),
            dj / "split.json",
            2 * iterations,
        )
    }
    runs["joint"]["dice"] = scores(joint, cases)
    runs["joint"]["wall_seconds"] = round(time.perf_counter() - t, 1)
    for method, (kind, head_init) in CI_METHODS.items():
        t = time.perf_counter()
        work = WORK / "ci" / method
        runs[method] = {
            "train": extend_run(step1 / "model", d2, d1, work, kind, iterations, head_init)
        }
        runs[method]["dice"] = scores(work, cases)
        runs[method]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(method, runs[method]["dice"], flush=True)
    before = runs["step1"]["dice"]["Anterior"]
    joint_post = runs["joint"]["dice"]["Posterior"]
    table = {}
    for method in CI_METHODS:
        d = runs[method]["dice"]
        table[method] = {
            "method": CI_METHODS[method][0],
            "head_init": CI_METHODS[method][1],
            "anterior": d["Anterior"],
            "posterior": d["Posterior"],
            "ACC": (d["Anterior"] + d["Posterior"]) / 2,
            "BWT": d["Anterior"] - before,
            "anterior_forgetting": before - d["Anterior"],
            "posterior_gap_to_joint": joint_post - d["Posterior"],
            "goal_forgetting_le_0.02": before - d["Anterior"] <= 0.02,
            "goal_posterior_within_0.03_of_joint": joint_post - d["Posterior"] <= 0.03,
        }
    return {
        "step1_anterior": before,
        "joint": runs["joint"]["dice"],
        "joint_ACC": float(np.mean(list(runs["joint"]["dice"].values()))),
        "methods": table,
        "runs": runs,
        "halves": {"A": len(half_a), "B": len(half_b), "val": len(val)},
    }


def run_di(iterations: int) -> dict:
    half_a, half_b, val = split()
    stats = site_statistics(sorted(half_a + half_b))
    contrasts = [g["contrast"] for g in stats.values()]
    spread = float(max(contrasts) - min(contrasts))
    synthetic = spread < 0.5
    data = WORK / "data"
    labels = {1: "Anterior", 2: "Posterior"}
    keep = {1: 1, 2: 2}
    site_a = write_dataset(data / "di_site_a", half_a, labels=labels, keep=keep)
    site_b = write_dataset(data / "di_site_b", half_b, labels=labels, keep=keep, shift=synthetic)
    for d, ids in ((site_a, half_a), (site_b, half_b)):
        write_split(d, ids)
    val_a = val_cases("di_val_a", val, shift=False)
    val_b = val_cases("di_val_b", val, shift=True)
    runs: dict = {}
    t = time.perf_counter()
    base = WORK / "di" / "site_a"
    runs["site_a"] = {
        "train": train_base(
            site_a,
            base,
            scaled_plan({0: "background", **labels}),
            site_a / "split.json",
            iterations,
        )
    }
    runs["site_a"]["dice_a"] = scores(base, val_a)
    runs["site_a"]["dice_b"] = scores(base, val_b)
    runs["site_a"]["wall_seconds"] = round(time.perf_counter() - t, 1)
    for method, (kind, weight) in DI_METHODS.items():
        t = time.perf_counter()
        work = WORK / "di" / method
        runs[method] = {
            "train": extend_run(
                base / "model", site_b, site_a, work, kind, iterations, weight=weight
            )
        }
        runs[method]["dice_a"] = scores(work, val_a)
        runs[method]["dice_b"] = scores(work, val_b)
        runs[method]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(method, runs[method]["dice_a"], runs[method]["dice_b"], flush=True)
    a_before = float(np.mean(list(runs["site_a"]["dice_a"].values())))
    b_before = float(np.mean(list(runs["site_a"]["dice_b"].values())))
    table = {}
    for method in DI_METHODS:
        a = float(np.mean(list(runs[method]["dice_a"].values())))
        b = float(np.mean(list(runs[method]["dice_b"].values())))
        kind, weight = DI_METHODS[method]
        stored = EXEMPLARS if kind in ("rehearsal", "ewc") else 0
        table[method] = {
            "method": kind,
            "weight": weight,
            "site_a": a,
            "site_b": b,
            "ACC": (a + b) / 2,
            "BWT": a - a_before,
            "stored_cases": stored,
            "goal_bwt_ge_-0.01_with_le_5_cases": a - a_before >= -0.01 and stored <= 5,
            # a goal met by not learning site B at all is no success: say so
            "learned_site_b": b - b_before >= 0.1,
        }
    return {
        "site_statistics": stats,
        "contrast_spread": spread,
        "site_b": "synthetic scanner shift (scanner_shift: inverted contrast curve x -> 1 - x^0.7 "
        "on the 1-99 percentile range, bias field exp(linear+quadratic, about +-25%), "
        "Gaussian noise sigma 0.04, 2 mm slices along the first axis), seeded per case"
        if synthetic
        else "the dataset's own second image group",
        "site_a_before": {
            "A": a_before,
            "B": float(np.mean(list(runs["site_a"]["dice_b"].values()))),
        },
        "methods": table,
        "runs": runs,
    }


def markdown(result: dict) -> str:
    lines = ["# Continual learning on Task04_Hippocampus (issue 18)", ""]
    lines.append(f"Scaling: {result['scaling']}")
    lines.append("")
    ci = result.get("class_incremental")
    if ci:
        lines += [
            "## Class-incremental (anterior, then posterior)",
            "",
            f"Step 1 anterior Dice {ci['step1_anterior']:.3f}; joint upper bound "
            f"anterior {ci['joint']['Anterior']:.3f}, posterior {ci['joint']['Posterior']:.3f}.",
            "",
            "| method | anterior | posterior | ACC | BWT | anterior forgetting | posterior gap to joint | goals |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, r in ci["methods"].items():
            ok = r["goal_forgetting_le_0.02"] and r["goal_posterior_within_0.03_of_joint"]
            lines.append(
                f"| {m} | {r['anterior']:.3f} | {r['posterior']:.3f} | {r['ACC']:.3f} | "
                f"{r['BWT']:+.3f} | {r['anterior_forgetting']:.3f} | {r['posterior_gap_to_joint']:+.3f} | "
                f"{'met' if ok else 'missed'} |"
            )
        lines.append("")
    di = result.get("domain_incremental")
    if di:
        lines += [
            "## Domain-incremental (site A, then site B)",
            "",
            f"Site B: {di['site_b']}. Image groups: "
            + ", ".join(
                f"{g}: {s['cases']} cases, z-scored contrast {s['contrast']:.2f}"
                for g, s in di["site_statistics"].items()
            )
            + f". Site-A model: A {di['site_a_before']['A']:.3f}, B {di['site_a_before']['B']:.3f}.",
            "",
            "| method | site A | site B | ACC | BWT | stored cases | goal BWT >= -0.01 |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, r in di["methods"].items():
            goal = "met" if r["goal_bwt_ge_-0.01_with_le_5_cases"] else "missed"
            if goal == "met" and not r.get("learned_site_b", True):
                goal = "met only by not learning site B"
            lines.append(
                f"| {m} | {r['site_a']:.3f} | {r['site_b']:.3f} | {r['ACC']:.3f} | {r['BWT']:+.3f} | "
                f"{r['stored_cases']} | {goal} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("ci", "di", "report"))
    parser.add_argument("--iterations", type=int, default=400, help="iterations per step")
    parser.add_argument("--note", help="report: a note kept in the JSON (CPU used, reruns)")
    args = parser.parse_args()
    if args.part == "report":
        parts = {
            k: json.loads((WORK / f"{k}.json").read_text())
            for k in ("ci", "di")
            if (WORK / f"{k}.json").exists()
        }
        result = {
            "benchmark": "continual",
            "machine": machine(),
            "scaling": next(iter(parts.values()))["scaling"] if parts else None,
            "class_incremental": parts.get("ci", {}).get("result"),
            "domain_incremental": parts.get("di", {}).get("result"),
            "commands": {k: v["command"] for k, v in parts.items()},
            "machines": {k: v["machine"] for k, v in parts.items()},
            "note": args.note,
        }
        write_result(result, RESULTS / "continual.json")
        text = markdown(result) + (f"\nNote: {args.note}\n" if args.note else "")
        (RESULTS / "continual.md").write_text(text)
        return 0
    started = time.perf_counter()
    result = run_ci(args.iterations) if args.part == "ci" else run_di(args.iterations)
    scaling = (
        f"{args.iterations} iterations per step (joint: {2 * args.iterations}), batch "
        f"{SCALE['batch_size']}, one CPU core, AdamW 3e-3 for the first step and joint, 1e-3 "
        f"for every extension step; {SCALE['note']}; one seed; no validation during training "
        "(every step ends with its last weights); Dice at the preprocessed resolution"
    )
    write_result(
        {
            "machine": machine(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "scaling": scaling,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "result": result,
        },
        WORK / f"{args.part}.json",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
