"""Self-supervised pretraining benchmark (issue 17): few-label fine-tuning, pretrained vs scratch.

Hippocampus (MSD Task04) on the fixed split ``benchmarks/splits/hippocampus.json``: each
method pretrains the plan's encoder on the 166 training images without labels; then
fine-tunes on 10% (17) and 25% (42) of the training labels, at least two subset seeds,
against the same network trained from scratch with the same number of iterations; the
Dice is that of the final weights on the 42 validation cases (one validation, at the end:
no epoch is picked on the evaluation cases). HC18 (2D): pretrain on its 64 training
images, fine-tune with 8 labels.

Every unit of work is one call, so that units can run on separate CPU slots::

    /work/tools/slot one .venv/bin/python benchmarks/pretraining.py pretrain --dataset hippocampus --method mae --minutes 8
    /work/tools/slot one .venv/bin/python benchmarks/pretraining.py finetune --dataset hippocampus --init mae --fraction 0.1 --seed 0
    .venv/bin/python benchmarks/pretraining.py report

Each unit writes ``WORK/<unit>/result.json`` and is skipped when that exists; ``report``
gathers them into ``benchmarks/results/pretraining.json`` and ``.md`` and copies the
reconstruction pictures to ``docs/images/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg import api  # noqa: E402
from medseg.io.dataset import load_dataset  # noqa: E402
from medseg.pretraining import PretrainConfig, pretrain  # noqa: E402
from medseg.serialization import to_jsonable, write_json_atomic  # noqa: E402
from medseg.training import TrainConfig  # noqa: E402
from medseg.workflow import train_folds  # noqa: E402

WORK = Path(__file__).resolve().parent / "work" / "pretraining"
DATASETS = {
    "hippocampus": {
        "data": SHARED / "Task04_Hippocampus",
        "split": REPO / "benchmarks" / "splits" / "hippocampus.json",
        # The plan of the trained reference model (read-only), copied with its cache.
        "base": Path("/work/bench/hippo_after"),
    },
    "hc18": {
        "data": SHARED / "HC18_fetal_head_US",
        "split": REPO / "benchmarks" / "splits" / "hc18.json",
        "base": None,
    },
}
SCALING = (
    "Issue budgets scaled to this session's CPU allowance (2 shared cores, ~45 slot-minutes in "
    "all): pretraining {pre} min on one core (issue: 10-15 min on a laptop), fine-tuning "
    "{iters} iterations per model (about {ft} min on one core) with one validation at the end, "
    "the same for pretrained and scratch."
)


def base_work(name: str) -> Path:
    """The fine-tuning work folder holding the plan and the preprocessed cases."""
    work = WORK / f"{name}_base"
    info = DATASETS[name]
    if not (work / "plan.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        if info["base"] is not None:
            shutil.copy(info["base"] / "plan.json", work / "plan.json")
            if not (work / "preprocessed").exists():
                shutil.copytree(info["base"] / "preprocessed", work / "preprocessed")
        else:  # the labelled dataset's own plan, as `medseg plan` makes it
            api.plan(info["data"], work, num_workers=1, show_progress=False)
    return work


def run_pretrain(args: argparse.Namespace) -> None:
    out = WORK / f"{args.dataset}_pre_{args.method}"
    if (out / "result.json").is_file():
        print(f"{out}: done already")
        return
    info = DATASETS[args.dataset]
    base = base_work(args.dataset)
    config = PretrainConfig(
        method=args.method,
        time_budget_minutes=args.minutes,
        iterations_per_epoch=args.iterations_per_epoch,
        learning_rate=args.learning_rate,
        device="cpu",
        num_threads=1,
        seed=0,
    )
    started = time.perf_counter()
    result = pretrain(
        info["data"],
        out,
        config=config,
        plan=base,
        split_file=info["split"],
        num_workers=1,
        show_progress=False,
    )
    write_json_atomic(
        {
            "result": to_jsonable(result),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "config": to_jsonable(config),
            "machine": machine(),
        },
        out / "result.json",
    )


def run_finetune(args: argparse.Namespace) -> None:
    subset = f"f{args.fraction}" if args.fraction else f"n{args.cases}"
    out = WORK / f"{args.dataset}_ft_{args.init}_{subset}_s{args.seed}_i{args.iterations}"
    if (out / "result.json").is_file():
        print(f"{out}: done already")
        return
    info = DATASETS[args.dataset]
    base = base_work(args.dataset)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "plan.json", out / "plan.json")
    if (base / "preprocessed").exists() and not (out / "preprocessed").exists():
        (out / "preprocessed").symlink_to(base / "preprocessed")
    init = None if args.init == "scratch" else str(WORK / f"{args.dataset}_pre_{args.init}")
    config = TrainConfig(
        max_epochs=1,
        iterations_per_epoch=args.iterations,
        optimizer="adamw",
        learning_rate=3e-3,
        seed=args.seed,
        labelled_fraction=args.fraction,
        labelled_cases=args.cases,
        init_from=init,
        device="cpu",
        num_threads=1,
        max_validation_cases=100,
    )
    spec = load_dataset(info["data"])
    started = time.perf_counter()
    (result,) = train_folds(
        spec,
        out,
        folds=[0],
        config=config,
        split_file=info["split"],
        resume=True,
        num_workers=1,
        show_progress=False,
        started=started,
    )
    write_json_atomic(
        {
            "dataset": args.dataset,
            "init": args.init,
            "fraction": args.fraction,
            "cases": args.cases,
            "seed": args.seed,
            "iterations": result.iterations,
            "dice": result.best_val_dice,
            "dice_per_class": result.best_val_dice_per_class,
            "train_seconds": result.elapsed_seconds,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "labelled": json.loads((out / "model" / "fold_0" / "labelled_subset.json").read_text())[
                "train"
            ],
        },
        out / "result.json",
    )


def _mean_spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "mean": round(float(a.mean()), 4),
        "std": round(float(a.std(ddof=1)), 4) if len(a) > 1 else None,
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "n": len(a),
        "values": [round(float(v), 4) for v in a],
    }


def report(args: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(WORK.glob("*_ft_*/result.json"))]
    pre = {
        p.parent.name: json.loads(p.read_text()) for p in sorted(WORK.glob("*_pre_*/result.json"))
    }
    rows = []
    goals = {0.1: 0.03, 0.25: 0.015, 1.0: 0.0}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["dataset"], r["fraction"], r["cases"], r["iterations"])
        groups.setdefault(key, []).append(r)
    for (dataset, fraction, cases, iterations), members in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or 0, kv[0][3])
    ):
        scratch = {r["seed"]: r["dice"] for r in members if r["init"] == "scratch"}
        for init in sorted({r["init"] for r in members}):
            mine = {r["seed"]: r["dice"] for r in members if r["init"] == init}
            paired = sorted(set(mine) & set(scratch))
            row = {
                "dataset": dataset,
                "labels": f"{fraction:.0%}" if fraction else f"{cases} cases",
                "fraction": fraction,
                "cases": cases,
                "init": init,
                "iterations": iterations,
                "seeds": sorted(mine),
                "dice": _mean_spread(list(mine.values())),
            }
            if init != "scratch" and paired:
                gains = [mine[s] - scratch[s] for s in paired]
                row["gain_vs_scratch"] = _mean_spread(gains)
                if len(gains) > 1:  # paired seeds: is the gain clear of the seed noise?
                    se = float(np.std(gains, ddof=1) / np.sqrt(len(gains)))
                    row["gain_standard_error"] = round(se, 4)
                    row["gain_clear_of_noise"] = bool(np.mean(gains) - 2 * se > 0)
                goal = goals.get(fraction) if dataset == "hippocampus" else None
                if goal is not None:
                    row["goal"] = goal
                    row["goal_met"] = bool(np.mean(gains) >= goal)
            rows.append(row)
    pictures = []
    for name, data in pre.items():
        png = data["result"].get("examples_png")
        if png and Path(png).is_file():
            target = REPO / "docs" / "images" / f"pretraining_{name.replace('_pre_', '_')}.png"
            shutil.copy(png, target)
            pictures.append(str(target.relative_to(REPO)))
    ft_seconds = [r["train_seconds"] for r in runs]
    iters = sorted({r["iterations"] for r in runs})
    pre_minutes = sorted(
        {
            round(d["config"]["time_budget_minutes"], 1)
            for d in pre.values()
            if d["config"].get("time_budget_minutes")
        }
    )
    result = {
        "benchmark": "pretraining",
        "issue": 17,
        "scaling": SCALING.format(
            pre="/".join(str(m) for m in pre_minutes),
            iters="/".join(str(i) for i in iters),
            ft=round(float(np.median(ft_seconds)) / 60, 1) if ft_seconds else "?",
        ),
        "protocol": (
            "Fixed splits (benchmarks/splits/*.json). Pretraining uses only the training images "
            "of the split (labels ignored) and the fine-tuning plan (--plan). Fine-tuning: "
            "AdamW 3e-3, default augmentation, deep supervision, one epoch of N iterations, "
            "validated once at the end (mean foreground Dice of the final weights on all "
            "validation cases at the plan's resolution, no TTA). Labelled subsets drawn with "
            "labelled_subset(seed) (nested: 10% of a seed lies inside its 25%). Scratch and "
            "pretrained runs of one seed use the same subset, sampler and augmentation seeds."
        ),
        "pretraining": {
            name: {
                "method": d["result"]["method"],
                "images": d["result"]["num_images"],
                "iterations": d["result"]["iterations"],
                "minutes": round(d["result"]["elapsed_seconds"] / 60, 2),
                "first_val_loss": d["result"]["first_loss"],
                "best_val_loss": d["result"]["best_loss"],
            }
            for name, d in pre.items()
        },
        "rows": rows,
        "not_measured": [
            "all labels (the 'no loss with all labels' goal): no CPU time left this session",
            "HC18 (2D, 8 labelled images): no CPU time left this session",
        ]
        + [
            f"{m}: its row needs a slot that did not come in time"
            for m in ("genesis", "contrastive")
            if not any(r["init"] == m for r in rows)
        ],
        "pictures": pictures,
        "machine": machine(),
        "commands": [
            "/work/tools/slot one .venv/bin/python benchmarks/pretraining.py pretrain --dataset D --method M --minutes T",
            "/work/tools/slot one .venv/bin/python benchmarks/pretraining.py finetune --dataset D --init M|scratch (--fraction F | --cases N) --seed S --iterations I",
            ".venv/bin/python benchmarks/pretraining.py report",
        ],
    }
    write_result(result, RESULTS / "pretraining.json")
    lines = [
        "# Self-supervised pretraining (issue 17)",
        "",
        result["scaling"],
        "",
        "| dataset | labels | init | iterations | seeds | Dice mean | spread (sd; min-max) | gain vs scratch (mean, sd) | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["dice"]
        sd = f"{d['std']:.3f}" if d["std"] is not None else "-"
        gain = r.get("gain_vs_scratch")
        gain_text = (
            f"{gain['mean']:+.3f} ({gain['std']:.3f})"
            if gain and gain["std"] is not None
            else (f"{gain['mean']:+.3f}" if gain else "")
        )
        goal = ""
        if "goal" in r:
            goal = f">= +{r['goal']:.3f}: {'met' if r['goal_met'] else 'missed'} on the mean"
            if "gain_clear_of_noise" in r:
                clear = r["gain_clear_of_noise"]
                goal += ", mean - 2 SE > 0" if clear else ", within 2 SE of zero"
        lines.append(
            f"| {r['dataset']} | {r['labels']} | {r['init']} | {r['iterations']} | "
            f"{len(r['seeds'])} | {d['mean']:.3f} | {sd}; {d['min']:.3f}-{d['max']:.3f} | "
            f"{gain_text} | {goal} |"
        )
    lines += ["", "Pretraining runs:", ""]
    for name, p in result["pretraining"].items():
        lines.append(
            f"- {name}: {p['method']} on {p['images']} images, {p['iterations']} iterations in "
            f"{p['minutes']} min, validation loss {p['first_val_loss']:.4f} -> {p['best_val_loss']:.4f}"
        )
    lines += ["", "Not measured: " + "; ".join(result["not_measured"]) + "."]
    lines += [
        "",
        f"Machine: {result['machine']['cpu']}, git {result['machine']['git_commit']}.",
        "",
    ]
    (RESULTS / "pretraining.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--dataset", choices=DATASETS, default="hippocampus")
    p.add_argument("--method", default="mae")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--iterations-per-epoch", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p = sub.add_parser("finetune")
    p.add_argument("--dataset", choices=DATASETS, default="hippocampus")
    p.add_argument("--init", default="scratch", help="scratch or a pretraining method")
    p.add_argument("--fraction", type=float)
    p.add_argument("--cases", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=150)
    sub.add_parser("report")
    args = parser.parse_args(argv)
    {"pretrain": run_pretrain, "finetune": run_finetune, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
