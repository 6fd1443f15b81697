"""Trust benchmark (issue 20): calibration, uncertainty that flags bad cases, explanations.

    # fold models: k-fold cross-validation over the fixed split's TRAINING cases only
    slot one python benchmarks/trust.py train --fold 0 --iterations 250
    # temperature + QC threshold on those folds' validation predictions, then the 42 test cases
    slot one python benchmarks/trust.py evaluate
    # attribution mass (all methods) on a few test cases, 1 core
    slot one python benchmarks/trust.py explain
    # occlusion seconds per case at the default block/stride, 2 cores
    slot both python benchmarks/trust.py timing

Hippocampus, fixed split (benchmarks/splits/hippocampus.json): the temperature and the review
threshold are fitted only on cross-validation predictions of fold models trained on the 166
training cases; the 42 validation cases are the test set, predicted by the fold ensemble.
Results merge into benchmarks/results/trust_hippocampus.json and .md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg import api  # noqa: E402
from medseg.calibration import mean_foreground_dice, recall_at_fraction, spearman  # noqa: E402
from medseg.calibration.qc import failures, recall_and_flagged  # noqa: E402
from medseg.evaluation.calibration_metrics import (  # noqa: E402
    Reliability,
    foreground_bbox_mask,
    reliability_diagram_png,
)
from medseg.explain import explain_case, write_explanation, write_report  # noqa: E402
from medseg.inference import Predictor  # noqa: E402
from medseg.inference.predictor import resample_to, uncrop  # noqa: E402
from medseg.inference.uncertainty import (  # noqa: E402
    MemberAccumulator,
    case_scores,
    entropy,
)
from medseg.io.dataset import load_dataset, read_case_image, read_case_label  # noqa: E402
from medseg.model_folder import ModelFolder  # noqa: E402
from medseg.training import TrainConfig  # noqa: E402

DATASET = SHARED / "Task04_Hippocampus"
SPLIT = REPO / "benchmarks" / "splits" / "hippocampus.json"
SCRATCH = Path(__file__).resolve().parent / "work" / "trust"
WORK = SCRATCH / "hippo_cv"
OUT = RESULTS / "trust_hippocampus.json"
FIGURES = REPO / "docs" / "images" / "trust"
NUM_FOLDS = 3
ARGS = argparse.Namespace()
GOALS = {
    "ece_reduction": 0.5,
    "dice_change": 0.002,
    "voxel_auroc": 0.95,
    "spearman_abs": 0.5,
    "recall_at_10_percent": 0.5,
    "attribution_mass_dilated": 0.7,
    "occlusion_seconds": 5.0,
}


def load_result() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def save(section: str, data: dict) -> None:
    """Merge one stage's section into the JSON (stages may run at once: a lock file)."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(WORK / ".trust_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = load_result()
        result.setdefault("goals", GOALS)
        result[section] = {**data, "settings": vars(ARGS), "machine": machine()}
        write_result(result, OUT)
        write_markdown(result)


def cv_splits() -> list[dict]:
    split = json.loads(SPLIT.read_text())
    train = sorted(split["train"])
    random.Random(20).shuffle(train)
    k = NUM_FOLDS
    return [
        {
            "train": sorted(c for j in range(k) if j != i for c in train[j::k]),
            "val": sorted(train[i::k]),
        }
        for i in range(k)
    ]


def run_train(args: argparse.Namespace) -> None:
    """One short fold: fixed iterations (and a wall-clock cap), AdamW 3e-3, one core."""
    sfile = WORK / "splits_cv3.json"
    WORK.mkdir(parents=True, exist_ok=True)
    if not sfile.exists():
        sfile.write_text(json.dumps(cv_splits(), indent=1))
    config = TrainConfig(
        max_epochs=args.iterations // 50,
        iterations_per_epoch=50,
        optimizer="adamw",
        learning_rate=3e-3,
        max_validation_cases=6,
        seed=args.fold,
        time_budget_minutes=args.minutes,
    )
    api.train(
        DATASET, WORK, folds=[args.fold], config=config, split_file=sfile, show_progress=False
    )


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks)."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fold_records(model: Path) -> list[dict]:
    rows = []
    for fold_dir in sorted(model.glob("fold_*")):
        log = (fold_dir / "log.csv").read_text().splitlines()
        last = dict(zip(log[0].split(","), log[-1].split(","), strict=True))
        rows.append(
            {
                "fold": int(fold_dir.name[5:]),
                "iterations": int(last["iteration"]),
                "seconds": float(last["elapsed_seconds"]),
                "val_dice_last_epoch": float(last["val_dice_mean"]),
            }
        )
    return rows


def run_evaluate(args: argparse.Namespace) -> None:
    model = WORK / "model"
    folder = ModelFolder.open(model)
    started = time.perf_counter()
    record = api.calibrate(
        model,
        mode=args.mode,
        target_recall=args.target_recall,
        max_cases=args.max_cv_cases,
        fit_region=args.fit_region,
        overwrite=True,
        device="cpu",
        show_progress=False,
    )
    calibrate_seconds = time.perf_counter() - started
    temperature = torch.tensor(record["temperature"])
    mirror_axes = tuple(range(3)) if args.tta else ()
    spec = load_dataset(DATASET)
    test_ids = sorted(json.loads(SPLIT.read_text())["val"])[: args.max_cases]
    predictor = Predictor(model, device="cpu", calibrated=False)
    rel = {(s, r): Reliability() for s in ("before", "after") for r in ("whole", "bbox")}
    err_all, ent_all, mi_all, in_box = [], [], [], []
    rows = []
    t0 = time.perf_counter()
    for case_id in test_ids:
        case = spec.case(case_id)
        channels = read_case_image(spec, case)
        ref = np.asarray(read_case_label(spec, case).array).astype(np.int64)
        data, geometry = predictor.prepare(channels)
        raw, cal = MemberAccumulator(), MemberAccumulator()
        for logits in predictor.member_logits(data, mirror_axes=mirror_axes):
            raw.add(logits)
            cal.add(logits / temperature.reshape(-1, 1, 1, 1))
        probs = {
            "before": torch.softmax(raw.mean_logits(), 0),
            "after": torch.softmax(cal.mean_logits(), 0),
        }
        ent = entropy(probs["after"])
        mi = cal.mutual_information()
        scores = case_scores(probs["after"], ent, mi)
        full = {}
        for stage, p in probs.items():
            f = np.zeros((p.shape[0], *geometry.shape), dtype=np.float32)
            for c in range(p.shape[0]):
                f[c] = uncrop(resample_to(p[c], geometry), geometry)
            outside = np.ones(geometry.shape, dtype=bool)
            outside[tuple(slice(a, b) for a, b in geometry.bbox)] = False
            f[0][outside] = 1.0
            full[stage] = f
        labels = {s: f.argmax(0) for s, f in full.items()}
        box = foreground_bbox_mask(ref, labels["after"])
        for stage, f in full.items():
            rel[(stage, "whole")].add(f, ref)
            rel[(stage, "bbox")].add(f, ref, box)
        ent_full = uncrop(resample_to(ent, geometry), geometry)
        mi_full = uncrop(resample_to(mi, geometry), geometry)
        err_all.append((labels["after"] != ref).ravel())
        ent_all.append(ent_full.ravel())
        mi_all.append(mi_full.ravel())
        in_box.append(box.ravel())
        rows.append(
            {
                "case_id": case_id,
                "dice_before": mean_foreground_dice(labels["before"], ref, 3),
                "dice_after": mean_foreground_dice(labels["after"], ref, 3),
                **scores,
            }
        )
    test_seconds = time.perf_counter() - t0
    errors, ent_v, mi_v, box_v = map(np.concatenate, (err_all, ent_all, mi_all, in_box))
    dice = np.array([r["dice_after"] for r in rows])
    failed, cut = failures(dice, quantile=0.1)
    qc = record["qc"]
    recall, flagged = recall_and_flagged([r[qc["score"]] for r in rows], failed, qc["threshold"])
    ece = {f"{r}_{s}": rel[(s, r)].ece() for s in ("before", "after") for r in ("whole", "bbox")}
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / "reliability_hippocampus.png").write_bytes(
        reliability_diagram_png(
            {
                "before (bbox)": rel[("before", "bbox")],
                "after (bbox)": rel[("after", "bbox")],
                "before (whole)": rel[("before", "whole")],
                "after (whole)": rel[("after", "whole")],
            },
            title=f"hippocampus, {len(rows)} test cases, T = {record['temperature'][0]:.2f}",
        )
    )
    save(
        "evaluate" if args.fit_region == "crop" else f"evaluate_fit_{args.fit_region}",
        {
            "dataset": "Task04_Hippocampus",
            "split": str(SPLIT.relative_to(REPO)),
            "cross_validation": {
                "folds": NUM_FOLDS,
                "trained_folds": fold_records(model),
                "note": "fold models trained on the split's 166 training cases only; "
                "temperature and QC threshold fitted on their own validation cases",
            },
            "calibration": {k: v for k, v in record.items() if k != "qc"},
            "qc_on_cross_validation": {k: v for k, v in qc.items() if k != "cases"},
            "calibrate_seconds": round(calibrate_seconds, 1),
            "test": {
                "cases": len(rows),
                "members": f"{len(folder.folds())} folds x {2 ** len(mirror_axes)} mirrorings",
                "seconds": round(test_seconds, 1),
                "ece_bins": 15,
                "ece": ece,
                "ece_reduction_bbox": 1 - ece["bbox_after"] / ece["bbox_before"],
                "ece_reduction_whole": 1 - ece["whole_after"] / ece["whole_before"],
                "dice_before": float(np.mean([r["dice_before"] for r in rows])),
                "dice_after": float(dice.mean()),
                "dice_change": float(dice.mean() - np.mean([r["dice_before"] for r in rows])),
                "voxel_auroc_entropy_whole": auroc(ent_v, errors),
                "voxel_auroc_entropy_bbox": auroc(ent_v[box_v], errors[box_v]),
                "voxel_auroc_mi_whole": auroc(mi_v, errors),
                "voxel_auroc_mi_bbox": auroc(mi_v[box_v], errors[box_v]),
                "error_voxels": int(errors.sum()),
                "voxels": int(errors.size),
                "spearman_with_dice": {
                    s: spearman([r[s] for r in rows], dice)
                    for s in ("dice_gap", "entropy_ratio", "mi_ratio")
                },
                "failure_dice": cut,
                "failures": int(failed.sum()),
                "recall_at_10_percent": {
                    s: recall_at_fraction([r[s] for r in rows], failed, fraction=0.1)
                    for s in ("dice_gap", "entropy_ratio", "mi_ratio")
                },
                "cv_threshold": {
                    "score": qc["score"],
                    "threshold": qc["threshold"],
                    "recall": recall,
                    "flagged_fraction": flagged,
                },
                "per_case": rows,
            },
        },
    )


def run_explain(args: argparse.Namespace) -> None:
    model = WORK / "model"
    predictor = Predictor(model, folds=[0], device="cpu", calibrated=False)
    spec = load_dataset(DATASET)
    test_ids = sorted(json.loads(SPLIT.read_text())["val"])[: args.explain_cases]
    rows = []
    out = SCRATCH / "explanations"
    for case_id in test_ids:
        channels = read_case_image(spec, spec.case(case_id))
        for method in ("occlusion", "gradcam", "integrated_gradients"):
            for cls in ("Anterior", "Posterior"):
                e = explain_case(predictor, channels, method=method, class_value=cls)
                data = write_explanation(e, out, case_id=case_id)
                rows.append(
                    {k: data[k] for k in ("case_id", "method", "class_name", "seconds")}
                    | {
                        "mass_in_region": e.mass_in_region,
                        "mass_in_dilated_region": e.mass_in_dilated_region,
                    }
                )
    summarize_explanations(out, rows)


def summarize_explanations(out: Path, rows: list[dict] | None = None) -> None:
    """The explain section from the records in ``out`` (also those of an interrupted run)."""
    if rows is None:
        rows = []
        for path in sorted(out.glob("*.json")):
            data = json.loads(path.read_text())
            rows.append(
                {k: data[k] for k in ("case_id", "method", "class_name", "seconds")}
                | {
                    "mass_in_region": data["positive_mass_in_region"],
                    "mass_in_dilated_region": data["positive_mass_in_dilated_region"],
                }
            )
    write_report([], out)
    FIGURES.mkdir(parents=True, exist_ok=True)
    first = sorted({r["case_id"] for r in rows})[0]
    for method in ("occlusion", "gradcam", "integrated_gradients"):
        shutil.copy(
            out / f"{first}_{method}_Anterior.png", FIGURES / f"explain_{method}_hippocampus.png"
        )
    summary = {}
    for method in ("occlusion", "gradcam", "integrated_gradients"):
        sel = [r for r in rows if r["method"] == method]
        summary[method] = {
            "mean_mass_in_dilated_region": float(
                np.nanmean([r["mass_in_dilated_region"] for r in sel])
            ),
            "mean_mass_in_region": float(np.nanmean([r["mass_in_region"] for r in sel])),
            "mean_seconds_1_core": float(np.mean([r["seconds"] for r in sel])),
        }
    save(
        "explain",
        {
            "cases": len({r["case_id"] for r in rows}),
            "classes": ["Anterior", "Posterior"],
            "region": "the predicted segmentation of the class (fold 0 network)",
            "dilation_voxels": 3,
            "summary": summary,
            "per_explanation": rows,
        },
    )


def run_timing(args: argparse.Namespace) -> None:
    model = WORK / "model"
    predictor = Predictor(model, folds=[0], device="cpu", calibrated=False)
    spec = load_dataset(DATASET)
    test_ids = sorted(json.loads(SPLIT.read_text())["val"])[: args.timing_cases]
    seconds = []
    for case_id in test_ids:
        channels = read_case_image(spec, spec.case(case_id))
        e = explain_case(predictor, channels, method="occlusion", class_value="Anterior")
        seconds.append(e.seconds)
    save(
        "timing",
        {
            "cases": len(test_ids),
            "threads": torch.get_num_threads(),
            "occlusion_block_stride": e.settings["occlusion_block"],
            "seconds_per_case": seconds,
            "mean_seconds": float(np.mean(seconds)),
        },
    )


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if np.isfinite(value) else "nan"
    return str(value)


def write_markdown(result: dict) -> None:
    lines = ["# Trust benchmark: hippocampus (issue 20)", ""]
    for name in sorted(k for k in result if k.startswith("evaluate")):
        ev = result[name]
        t, cal = ev["test"], ev["calibration"]
        lines += [
            f"## {name}: temperature fitted on the voxels of the "
            f"{cal['fitted_on'].get('fit_region', 'crop')}",
            "",
            f"Temperature ({cal['mode']}): {', '.join(f'{x:.3f}' for x in cal['temperature'])}, "
            f"fitted on {cal['fitted_on']['cases']} cross-validation cases of the training split. "
            f"Test: {t['cases']} validation cases, {t['members']}.",
            "",
            "| measure | value | goal | met |",
            "|---|---|---|---|",
            f"| ECE bbox before -> after (15 bins) | {_fmt(t['ece']['bbox_before'], 4)} -> "
            f"{_fmt(t['ece']['bbox_after'], 4)} ({100 * t['ece_reduction_bbox']:.0f}% lower) | "
            f">= 50% lower | {t['ece_reduction_bbox'] >= 0.5} |",
            f"| ECE whole image before -> after | {_fmt(t['ece']['whole_before'], 4)} -> "
            f"{_fmt(t['ece']['whole_after'], 4)} ({100 * t['ece_reduction_whole']:.0f}% lower) | "
            f">= 50% lower | {t['ece_reduction_whole'] >= 0.5} |",
            f"| Dice change | {t['dice_change']:+.4f} ({_fmt(t['dice_before'])} -> "
            f"{_fmt(t['dice_after'])}) | <= 0.002 | {abs(t['dice_change']) <= 0.002} |",
            f"| voxel AUROC, entropy vs error (whole / bbox) | "
            f"{_fmt(t['voxel_auroc_entropy_whole'])} / {_fmt(t['voxel_auroc_entropy_bbox'])} | "
            f">= 0.95 | {t['voxel_auroc_entropy_whole'] >= 0.95} |",
            f"| voxel AUROC, mutual information (whole / bbox) | "
            f"{_fmt(t['voxel_auroc_mi_whole'])} / {_fmt(t['voxel_auroc_mi_bbox'])} | | |",
        ]
        for s, rho in t["spearman_with_dice"].items():
            rec = t["recall_at_10_percent"][s]
            lines.append(
                f"| {s}: Spearman with Dice / recall of failures at 10% flagged | "
                f"{_fmt(rho)} / {_fmt(rec, 2)} | abs >= 0.5 / >= 0.5 | "
                f"{abs(rho) >= 0.5 and rec >= 0.5} |"
            )
        c = t["cv_threshold"]
        lines += [
            f"| CV-chosen threshold ({c['score']} >= {c['threshold']:.4g}): recall / flagged | "
            f"{_fmt(c['recall'], 2)} / {_fmt(c['flagged_fraction'], 2)} | | |",
            "",
        ]
    ex = result.get("explain")
    if ex:
        lines += ["## Explanations", "", "| measure | value | goal | met |", "|---|---|---|---|"]
        for method, s in ex["summary"].items():
            lines.append(
                f"| {method}: positive mass within 3 voxels of the class mask | "
                f"{_fmt(s['mean_mass_in_dilated_region'])} | >= 0.70 | "
                f"{s['mean_mass_in_dilated_region'] >= 0.7} |"
            )
    tm = result.get("timing")
    if tm:
        lines.append(
            f"| occlusion seconds per case ({tm['threads']} threads, block "
            f"{tm['occlusion_block_stride']}) | {_fmt(tm['mean_seconds'], 2)} | <= 5 | "
            f"{tm['mean_seconds'] <= 5} |"
        )
    lines += ["", "Exact commands and machines: see the JSON (`machine.command`)."]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "stage", choices=("train", "evaluate", "explain", "explain-summary", "timing")
    )
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-clock cap per fold")
    parser.add_argument("--mode", default="global")
    parser.add_argument("--fit-region", default="crop", choices=("crop", "bbox"))
    parser.add_argument("--tta", action="store_true", help="mirroring TTA members at test")
    parser.add_argument("--target-recall", type=float, default=0.8)
    parser.add_argument("--max-cases", type=int, default=None, help="test cases (default 42)")
    parser.add_argument(
        "--max-cv-cases", type=int, default=None, help="validation cases per fold for calibrate"
    )
    parser.add_argument("--explain-cases", type=int, default=4)
    parser.add_argument("--timing-cases", type=int, default=3)
    args = parser.parse_args()
    global ARGS
    ARGS = args
    if args.stage == "explain-summary":  # from the records an explain run left
        summarize_explanations(SCRATCH / "explanations")
        return
    {"train": run_train, "evaluate": run_evaluate, "explain": run_explain, "timing": run_timing}[
        args.stage
    ](args)


if __name__ == "__main__":
    main()
