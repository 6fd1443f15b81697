"""Train medseg on a shared dataset with a fixed split and a wall-clock budget; report validation Dice.

    python benchmarks/train_dataset.py hippocampus   # Task04_Hippocampus, 30 minutes
    python benchmarks/train_dataset.py hc18          # HC18 fetal head, 20 minutes

The budget covers planning and preprocessing too. Validation cases are predicted from the
original files (original geometry, mirroring TTA) and scored with medseg's metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg import api  # noqa: E402
from medseg.io.dataset import load_dataset  # noqa: E402
from medseg.training import TrainConfig  # noqa: E402
from medseg.training.config import OPTIMIZERS  # noqa: E402

PRESETS = {
    "hippocampus": {
        "dataset": "Task04_Hippocampus",
        "budget": 30.0,
        # issue 24: nnU-Net's full-training level (its 5-fold CV: 0.8975 / 0.8807)
        "goal": {"mean": 0.90, "Anterior": 0.905, "Posterior": 0.89},
    },
    "hc18": {
        "dataset": "HC18_fetal_head_US",
        "budget": 20.0,
        "goal": {"mean": 0.97, "min_case": 0.90},  # issue 24: no case below 0.90
    },
}


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(PRESETS))
    parser.add_argument("--budget-minutes", type=float)
    parser.add_argument("--work-dir", help="default: benchmarks/work/<name>")
    parser.add_argument("--out", help="default: benchmarks/results/<name>.json")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--largest-component", action="store_true")
    parser.add_argument("--fill-holes", action="store_true")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="auto")
    parser.add_argument("--learning-rate", type=float, help="default: the optimizer's")
    args = parser.parse_args()
    preset = PRESETS[args.name]
    dataset = SHARED / preset["dataset"]
    split = REPO / "benchmarks" / "splits" / f"{args.name}.json"
    work = Path(args.work_dir or REPO / "benchmarks" / "work" / args.name)
    budget = args.budget_minutes or preset["budget"]
    out = Path(args.out or RESULTS / f"{args.name}.json")
    if work.exists():
        import shutil

        shutil.rmtree(work)  # a benchmark starts from nothing: preprocessing counts in the budget
    info = machine()
    t0 = time.perf_counter()
    config = TrainConfig(
        time_budget_minutes=budget, optimizer=args.optimizer, learning_rate=args.learning_rate
    )
    (result,) = api.train(dataset, work, config=config, split_file=split, show_progress=False)
    train_wall = time.perf_counter() - t0
    fold = json.loads((work / "model" / "splits.json").read_text())[0]
    spec = load_dataset(dataset)
    t1 = time.perf_counter()
    links = work / "validation"
    images, refs = api.link_cases(spec, fold["val"], links)
    api.predict(
        work / "model",
        images,
        links / "predictions",
        mirror=not args.no_tta,
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
        show_progress=False,
    )
    predict_wall = time.perf_counter() - t1
    report = api.evaluate(
        links / "predictions",
        refs,
        work / "evaluation",
        labels=dict(spec.labels),
        images_dir=images,
        curves_png=Path(result.fold_dir) / "curves.png",
        title=f"medseg benchmark: {args.name}",
    )
    per_class = {v["name"]: v["dice"] for v in report.summary["per_class"].values()}
    mean_dice = report.summary["mean_foreground_dice"]
    plan = json.loads((work / "model" / "plan.json").read_text())
    step_seconds = 1 / result.iterations_per_second if result.iterations_per_second else None
    goal = preset["goal"]
    met = {
        "mean": mean_dice >= goal["mean"],
        **{k: per_class[k]["mean"] >= v for k, v in goal.items() if k in per_class},
    }
    if "min_case" in goal:
        met["min_case"] = min(c["min"] for c in per_class.values()) >= goal["min_case"]
    data = {
        "benchmark": args.name,
        "dataset": str(dataset),
        "split": str(split.relative_to(REPO)),
        "n_train": len(fold["train"]),
        "n_val": len(fold["val"]),
        "budget_minutes": budget,
        "optimizer": config.resolved_optimizer(),
        "learning_rate": config.resolved_learning_rate(),
        "machine": info,
        "train_wall_seconds_including_preprocessing": round(train_wall, 1),
        "predict_wall_seconds": round(predict_wall, 1),
        "predict_seconds_per_case": round(predict_wall / max(len(fold["val"]), 1), 3),
        "tta": not args.no_tta,
        "postprocessing": {
            "largest_component": args.largest_component,
            "fill_holes": args.fill_holes,
        },
        "train": asdict(result),
        "precision_choice": json.loads((Path(result.fold_dir) / "precision.json").read_text()),
        "data_prep_share_of_step": round(result.data_prep_seconds_per_batch / step_seconds, 4)
        if step_seconds
        else None,
        "plan": {
            k: plan[k]
            for k in (
                "target_spacing",
                "patch_size",
                "batch_size",
                "network",
                "normalization",
                "notes",
            )
        },
        "dice_per_class": per_class,
        "dice_mean": mean_dice,
        "goal": goal,
        "goal_met": met,
        "model_dir": _relative(work / "model"),
        "evaluation_dir": _relative(work / "evaluation"),
    }
    write_result(data, out)
    print(
        json.dumps(
            {
                "dice_mean": mean_dice,
                "per_class": {k: v["mean"] for k, v in per_class.items()},
                "goal_met": met,
                "iterations": result.iterations,
                "it_per_s": result.iterations_per_second,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
