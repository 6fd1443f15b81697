"""Optuna-tuned U-Net for the model-zoo table (issue 8).

The search runs on the benchmark split's *training* cases only (an inner 80/20 split),
so the validation cases that score every zoo row stay unseen; each trial trains for
``--trial-minutes`` under the default optimizer (AdamW, warmup + cosine over the trial).
The best parameters are then applied to the zoo's own configuration and the U-Net is
trained for the zoo's per-model budget on the full training split, into
``benchmarks/work/models/<dataset>/unet_tuned``. Score it beside the other rows with::

    .venv/bin/python benchmarks/tune.py hippocampus --trials 8 --search-minutes 24 \\
        --trial-minutes 4 --budget-minutes 30
    .venv/bin/python benchmarks/models.py hippocampus --models "" --no-distill \\
        --keep-previous --extra-models unet_tuned=benchmarks/work/models/hippocampus/unet_tuned

Resumable: the study is SQLite (a killed search continues) and the final training resumes
from its checkpoint. Result: ``benchmarks/results/tune_<dataset>.json`` (every trial, the
best parameters, the trial budget and the final model's validation Dice).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402
from models import DATASETS  # noqa: E402

# Options that a per-model time budget leaves open; batch size stays the plan's so the
# pruner compares trials after the same number of patches per epoch.
SPACE = {
    "learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    "loss": ["dice_ce", "dice_focal", "tversky_ce"],
    "plan.network.width": [0.5, 0.75, 1.0],
    "plan.foreground_oversampling": {"type": "float", "low": 0.2, "high": 0.7},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--search-minutes", type=float, default=24.0)
    ap.add_argument("--trial-minutes", type=float, default=4.0)
    ap.add_argument("--iterations-per-epoch", type=int, default=20, help="trials only")
    ap.add_argument("--budget-minutes", type=float, default=30.0, help="the final model")
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--pruner", default="median")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work")
    args = ap.parse_args()

    import optuna

    from medseg import api
    from medseg.io.check import require_clean
    from medseg.planning import plan_for
    from medseg.preprocessing import preprocess_dataset
    from medseg.serialization import write_json_atomic
    from medseg.training import TrainConfig, train_fold
    from medseg.tuning import apply_params

    name, split_file = DATASETS[args.dataset]
    data_dir = SHARED / name
    split = json.loads((REPO / "benchmarks" / "splits" / split_file).read_text())
    train_ids, val_ids = split["train"], split["val"]
    search_dir = args.work / "tune" / args.dataset
    tuning = search_dir / "tuning"
    tuning.mkdir(parents=True, exist_ok=True)
    inner = list(np.random.default_rng(0).permutation(train_ids))
    cut = len(inner) * 4 // 5
    write_json_atomic(
        [{"train": sorted(inner[:cut]), "val": sorted(inner[cut:])}], tuning / "splits.json"
    )
    trial_config = TrainConfig(
        time_budget_minutes=args.trial_minutes,
        iterations_per_epoch=args.iterations_per_epoch,
        num_threads=args.threads,
        device="cpu",
        max_validation_cases=50,
    )
    t0 = time.perf_counter()
    summary = api.tune(
        data_dir,
        search_dir,
        space=SPACE,
        trials=args.trials,
        time_budget_minutes=args.search_minutes,
        sampler=args.sampler,
        pruner=args.pruner,
        config=trial_config,
        show_progress=False,
    )
    search_seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name="medseg", storage=f"sqlite:///{tuning}/study.db")
    trials = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "params": t.params,
            "val_dice": t.value,
            "epochs_reported": len(t.intermediate_values),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None,
        }
        for t in study.trials
    ]

    # The zoo's configuration (models.py) with the best parameters, full training split.
    spec = require_clean(data_dir)
    zoo = REPO / "benchmarks" / "work" / "models" / args.dataset
    base_plan = plan_for(spec, zoo, num_workers=2, show_progress=False)
    base = TrainConfig(
        time_budget_minutes=args.budget_minutes,
        num_threads=args.threads,
        device="cpu",
        max_validation_cases=50,
    )
    plan, config = apply_params(base_plan, base, summary["best_params"])
    pre = preprocess_dataset(spec, plan, zoo, num_workers=2, show_progress=False)
    model_dir = zoo / "unet_tuned"
    model_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan, model_dir / "plan.json")
    write_json_atomic([{"train": train_ids, "val": val_ids}], model_dir / "splits.json")
    write_json_atomic(spec.to_json(), model_dir / "dataset.json")
    final = train_fold(
        plan,
        pre,
        model_dir / "fold_0",
        config,
        train_ids=train_ids,
        val_ids=val_ids,
        resume=True,
        show_progress=False,
    )
    result = {
        "machine": machine(),
        "dataset": name,
        "space": SPACE,
        "sampler": args.sampler,
        "pruner": args.pruner,
        "trial_budget": {
            "trials_requested": args.trials,
            "search_minutes": args.search_minutes,
            "minutes_per_trial": args.trial_minutes,
            "iterations_per_epoch": args.iterations_per_epoch,
            "search_wall_seconds_this_run": round(search_seconds, 1),
        },
        "inner_split": {"train": cut, "val": len(inner) - cut, "from": "benchmark train cases"},
        "trials": trials,
        "best_params": summary["best_params"],
        "best_trial_val_dice": summary["best_value"],
        "final": {
            "model_dir": str(model_dir.relative_to(REPO)),
            "budget_minutes": args.budget_minutes,
            "iterations": final.iterations,
            "best_val_dice_preprocessed": final.best_val_dice,
            "stopped_because": final.stopped_because,
        },
        "report": summary["report"],
    }
    out = write_result(result, RESULTS / f"tune_{args.dataset}.json")
    print(out)
    print(json.dumps(result["best_params"]), final.best_val_dice)


if __name__ == "__main__":
    main()
