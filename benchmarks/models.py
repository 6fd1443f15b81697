"""Model zoo benchmark (issue 8): architectures, the mobile student alone and distilled,
and the best mean-probability ensemble, each trained with the same CPU time budget on a
fixed split; validation Dice per class in the original geometry, parameters, training
iterations/s and inference seconds per case.

Full run (the issue's protocol, ~4 h on 2 cores)::

    .venv/bin/python benchmarks/models.py hippocampus --budget-minutes 30
    .venv/bin/python benchmarks/models.py hc18 --budget-minutes 30 \\
        --models fcn,unet,resunet,attention_unet,swinunetr,mobile_unet,resnet34_unet \\
        --encoder-weights /path/to/resnet34.pth

Smoke run (minutes; numbers are meaningless, it proves the pipeline)::

    .venv/bin/python benchmarks/models.py hippocampus --budget-minutes 0.3 \\
        --max-train-cases 12 --max-val-cases 4 --models fcn,unet,mobile_unet --threads 1

Resumable: a model whose ``fold_0/train_result.json`` says it finished is not trained
again, so a queue can grow one architecture per invocation (every invocation re-scores
all of them and rewrites the JSON). ``--extra-models unet=benchmarks/work/hippocampus/model``
adds the core benchmark's U-Net as is: same split, plan and TrainConfig (this script's
``max_validation_cases=50`` matches it), 30-minute budget including its 9 s of
preprocessing. ``--teacher unet`` fixes the distillation teacher. ``--keep-previous`` keeps the rows of
the existing result JSON whose model folders are gone (marked ``from_earlier_run`` with
that run's date and commit, and ``*`` in the table), so one architecture can be added
without retraining the others; only models scored in this run form new ensembles.

Notes: other engineers share the 2 cores, so the load average at start and end is
recorded; with a loaded CPU prefer ``--threads 1`` (two OpenMP threads spin-waiting on a
busy core can be ~100x slower on small tensors). The Optuna-tuned U-Net is not part of
this script: run ``medseg tune`` with the same split and budget and add its model folder
with ``--extra-models``. Results: ``benchmarks/results/models_<dataset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

DATASETS = {
    "hippocampus": ("Task04_Hippocampus", "hippocampus.json"),
    "hc18": ("HC18_fetal_head_US", "hc18.json"),
}
DEFAULT_MODELS = "fcn,unet,resunet,attention_unet,swinunetr,mobile_unet"


def _optimizer(model_dir: Path) -> str | None:
    """The optimizer and learning rate a model folder was trained with, e.g. "sgd 0.01"."""
    from medseg.serialization import from_jsonable
    from medseg.training import TrainConfig

    path = model_dir / "fold_0" / "train_config.json"
    if not path.exists():
        return None
    config = from_jsonable(TrainConfig, json.loads(path.read_text()))
    return f"{config.resolved_optimizer()} {config.resolved_learning_rate():g}"


def markdown_table(result: dict, names: list[str]) -> str:
    """The result JSON's rows (and best ensemble) as a Markdown table."""
    rows, best_ensemble = result["models"], result["best_ensemble"]
    lines = [
        f"| model | {' | '.join('Dice ' + n for n in names)} | mean | params | it/s | s/case"
        " | network s/4 patches | optimizer |",
        "|---" * (len(names) + 7) + "|",
    ]
    for r in rows:
        its = r["train_iterations_per_second"]
        lines.append(
            f"| {r['model']}{' *' if r.get('from_earlier_run') else ''} | "
            + " | ".join(f"{r['dice_per_class'][n]:.3f}" for n in names)
            + f" | {r['dice_mean']:.3f} | {r['parameters']:,} | "
            + (f"{its:.2f}" if its else "-")
            + f" | {r['inference_seconds_per_case_median']:.2f}"
            + " | "
            + (f"{net:.3f}" if (net := r.get("network_seconds_per_4_patches")) else "-")
            + f" | {r.get('optimizer') or '-'} |"
        )
    if best_ensemble:
        lines.append(
            f"| ensemble {'+'.join(best_ensemble['members'])}"
            f"{' *' if best_ensemble.get('from_earlier_run') else ''} | "
            + " | ".join(f"{v:.3f}" for v in best_ensemble["dice_per_class"])
            + f" | {best_ensemble['dice_mean']:.3f} | | | | | |"
        )
    if any(r.get("from_earlier_run") for r in rows) or (best_ensemble or {}).get(
        "from_earlier_run"
    ):
        lines += [
            "",
            "\\* kept from an earlier run (its date, commit and CPU are in the JSON):"
            " compare its speed columns only with rows measured on the same CPU.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="per model")
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument(
        "--extra-models",
        default="",
        help="trained model folders to include, as TAG=DIR (or DIR: the tag is its name)",
    )
    ap.add_argument("--teacher", help="tag of the distillation teacher (default: best single)")
    ap.add_argument("--encoder-weights", help="torchvision ResNet weights for resnet*_unet")
    ap.add_argument("--max-train-cases", type=int)
    ap.add_argument("--max-val-cases", type=int)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "models")
    ap.add_argument(
        "--keep-previous",
        action="store_true",
        help="keep the rows of models in the existing result JSON whose folders are gone"
        " (marked with that run's date and commit; they join no new ensemble)",
    )
    args = ap.parse_args()

    from medseg.distillation import make_distillation_hook
    from medseg.ensembling import load_member, mean_probabilities
    from medseg.imaging import dice_per_class
    from medseg.io.check import require_clean
    from medseg.io.dataset import read_case_image, read_case_label
    from medseg.planning import plan_for
    from medseg.preprocessing import preprocess_dataset
    from medseg.serialization import from_jsonable, write_json_atomic
    from medseg.training import TrainConfig, train_fold
    from medseg.training.config import DistillConfig
    from medseg.training.trainer import TrainResult

    load_start = os.getloadavg()
    name, split_file = DATASETS[args.dataset]
    data_dir = SHARED / name
    split = json.loads((REPO / "benchmarks" / "splits" / split_file).read_text())
    train_ids = split["train"][: args.max_train_cases]
    val_ids = split["val"][: args.max_val_cases]
    work = args.work / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    spec = require_clean(data_dir)
    t0 = time.perf_counter()
    plan = plan_for(spec, work, num_workers=2, show_progress=False)
    pre = preprocess_dataset(spec, plan, work, num_workers=2, show_progress=False)
    prep_seconds = time.perf_counter() - t0
    base = TrainConfig(
        time_budget_minutes=args.budget_minutes,
        num_threads=args.threads,
        device="cpu",
        # The core hippocampus benchmark's setting, so its U-Net is a zoo member as is.
        max_validation_cases=50,
    )

    def model_dir(tag: str) -> Path:
        d = work / tag
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(plan, d / "plan.json")
        write_json_atomic([{"train": train_ids, "val": val_ids}], d / "splits.json")
        write_json_atomic(spec.to_json(), d / "dataset.json")
        return d

    def train(tag: str, config: TrainConfig) -> dict:
        d = model_dir(tag)
        done = d / "fold_0" / "train_result.json"
        if done.exists():  # finished in an earlier invocation: the queue resumes
            previous = json.loads(done.read_text())
            if previous["stopped_because"] != "signal":
                print(f"{tag}: trained already ({previous['stopped_because']})", flush=True)
                return {"dir": str(d), "train": from_jsonable(TrainResult, previous)}
        print(f"{tag}: training for {config.time_budget_minutes} min", flush=True)
        result = train_fold(
            plan,
            pre,
            d / "fold_0",
            config,
            train_ids=train_ids,
            val_ids=val_ids,
            resume=True,
            show_progress=False,
            hooks=[make_distillation_hook(config.distill, plan)] if config.distill else [],
        )
        return {"dir": str(d), "train": result}

    runs: dict[str, dict] = {}
    for arch in [m for m in args.models.split(",") if m]:
        options = {"encoder_weights": args.encoder_weights} if arch.startswith("resnet") else {}
        runs[arch] = train(arch, replace(base, model=arch, **options))
    for extra in [m for m in args.extra_models.split(",") if m]:
        tag, _, folder = extra.rpartition("=")
        folder_path = Path(folder)
        done = folder_path / "fold_0" / "train_result.json"
        trained = (
            from_jsonable(TrainResult, json.loads(done.read_text())) if done.exists() else None
        )
        runs[tag or folder_path.name] = {"dir": folder, "train": trained}

    # Score on the validation cases in the original geometry, timing each member.
    labels = {
        c.case_id: np.asarray(read_case_label(spec, spec.case(c.case_id)).array)
        for c in spec.cases
        if c.case_id in val_ids
    }
    k = plan.num_classes
    probs: dict[str, list] = {}
    rows = []

    def patch_seconds(model) -> float:
        """Median seconds of one fp32 forward pass of 4 plan-sized patches (the
        predictor's tile batch), channels-last: the network alone, without the per-case
        reading and resampling that every model shares."""
        import torch

        from medseg.runtime import memory_format

        x = torch.randn(4, plan.num_channels, *plan.patch_size)
        x = x.contiguous(memory_format=memory_format(plan.ndim))
        times = []
        with torch.inference_mode():
            model.eval()(x)
            for _ in range(7):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
        return float(np.median(times))

    def score(tag: str) -> None:
        member = load_member(runs[tag]["dir"], folds=[0])
        params = sum(p.numel() for p in member.models[0].parameters())
        network_seconds = patch_seconds(member.models[0])
        seconds, ps, dices = [], [], []
        for cid in val_ids:
            channels = read_case_image(spec, spec.case(cid))
            t = time.perf_counter()
            p = member.probabilities(channels)
            seconds.append(time.perf_counter() - t)
            ps.append(p)
            dices.append(dice_per_class(p.argmax(0).numpy(), labels[cid], k))
        probs[tag] = ps
        tr = runs[tag]["train"]
        per_class = np.nanmean(np.array(dices), axis=0)
        rows.append(
            {
                "model": tag,
                "dice_per_class": {n: float(v) for (_, n), v in zip(plan.labels[1:], per_class)},
                "dice_mean": float(np.nanmean(per_class)),
                "parameters": params,
                "train_iterations": tr.iterations if tr else None,
                "train_iterations_per_second": tr.iterations_per_second if tr else None,
                "inference_seconds_per_case_median": float(np.median(seconds)),
                "network_seconds_per_4_patches": network_seconds,
                "optimizer": _optimizer(Path(runs[tag]["dir"])),
            }
        )

    for tag in list(runs):
        score(tag)
    smoke = "_smoke" if args.max_train_cases or args.max_val_cases else ""
    out_path = RESULTS / f"models_{args.dataset}{smoke}.json"
    earlier = json.loads(out_path.read_text()) if args.keep_previous and out_path.exists() else {}
    earlier_run = {k: earlier.get("machine", {}).get(k) for k in ("date", "git_commit", "cpu")}
    for row in earlier.get("models", []):
        tag = row["model"]
        carried = tag == "mobile_unet_distilled" and not args.no_distill
        if tag not in runs and not carried and not (work / tag / "fold_0").exists():
            rows.append({**row, "from_earlier_run": row.get("from_earlier_run", earlier_run)})
    singles = sorted(rows, key=lambda r: -r["dice_mean"])
    best_single = singles[0]["model"]
    # The teacher must be a model folder of this run (rows kept from earlier runs have none).
    teacher_tag = args.teacher or next(r["model"] for r in singles if r["model"] in runs)
    if not args.no_distill:
        teacher = runs[teacher_tag]["dir"]
        cfg = replace(
            base,
            model="mobile_unet",
            distill=DistillConfig(teachers=(teacher,), temperature=2.0, weight=0.5),
        )
        runs["mobile_unet_distilled"] = train("mobile_unet_distilled", cfg)
        score("mobile_unet_distilled")
        rows[-1]["teacher"] = teacher_tag
    # Best mean-probability ensemble of 2 or 3 of the trained architectures.
    ensembles = []
    tags = [r["model"] for r in singles if r["model"] in probs]
    for size in (2, 3):
        for combo in itertools.combinations(tags[:5], size):
            dices = [
                dice_per_class(
                    mean_probabilities([probs[t][i] for t in combo]).argmax(0).numpy(),
                    labels[cid],
                    k,
                )
                for i, cid in enumerate(val_ids)
            ]
            per_class = np.nanmean(np.array(dices), axis=0)
            ensembles.append(
                {
                    "members": combo,
                    "dice_mean": float(np.nanmean(per_class)),
                    "dice_per_class": [float(v) for v in per_class],
                }
            )
    best_ensemble = max(ensembles, key=lambda e: e["dice_mean"]) if ensembles else None
    earlier_ensemble = earlier.get("best_ensemble")
    stale = earlier_ensemble and any(m not in probs for m in earlier_ensemble["members"])
    if stale and (not best_ensemble or earlier_ensemble["dice_mean"] > best_ensemble["dice_mean"]):
        best_ensemble = {
            **earlier_ensemble,
            "from_earlier_run": earlier_ensemble.get("from_earlier_run", earlier_run),
        }
    student = next((r for r in rows if r["model"] == "mobile_unet_distilled"), None)
    # A student kept from an earlier run is compared with its own teacher's row.
    goal_teacher = (student or {}).get("teacher", teacher_tag)
    teacher_row = next((r for r in rows if r["model"] == goal_teacher), None)
    goals = {}
    if student and teacher_row:
        goals["distilled_within_0.01_of_teacher"] = {
            "teacher": goal_teacher,
            "gap": teacher_row["dice_mean"] - student["dice_mean"],
            "met": teacher_row["dice_mean"] - student["dice_mean"] <= 0.01,
        }
        speedup = teacher_row["inference_seconds_per_case_median"] / max(
            student["inference_seconds_per_case_median"], 1e-9
        )
        network_speedup = teacher_row["network_seconds_per_4_patches"] / max(
            student["network_seconds_per_4_patches"], 1e-9
        )
        goals["distilled_3x_faster"] = {
            "teacher": goal_teacher,
            "speedup": speedup,
            "network_speedup": network_speedup,
            "met": speedup >= 3,
        }
    if best_ensemble:
        goals["ensemble_beats_best_single"] = {
            "best_single": best_single,
            "margin": best_ensemble["dice_mean"] - singles[0]["dice_mean"],
            "met": best_ensemble["dice_mean"] > singles[0]["dice_mean"],
        }
    result = {
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "note": "CPU shared with other engineers: see load averages; timings are noisy.",
        "dataset": name,
        "train_cases": len(train_ids),
        "val_cases": len(val_ids),
        "budget_minutes_per_model": args.budget_minutes,
        "preprocessing_seconds": round(prep_seconds, 1),
        "models": rows,
        "best_single": best_single,
        "best_ensemble": best_ensemble,
        "goals": goals,
    }
    result["smoke"] = bool(smoke)
    out = write_result(result, out_path)
    names = [n for _, n in plan.labels[1:]]
    table = markdown_table(result, names)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(json.dumps(goals, indent=2, default=float))


if __name__ == "__main__":
    main()
