"""Structured pruning of the core hippocampus U-Net (issue 6): Dice and speed before and
after pruning, and after a short fine-tuning of the pruned network.

    .venv/bin/python benchmarks/pruning.py --keep 0.75,0.5 --finetune-minutes 4

For each ``keep``: ``medseg prune`` the trained model (benchmarks/work/hippocampus/model),
score it on the 42 validation cases of benchmarks/splits/hippocampus.json (Dice per class
in the original geometry, fp32, no TTA, median seconds per case and the network alone on
4 patches), fine-tune it from its own weights (``init_from``) on the training cases for
``--finetune-minutes`` and score it again. The unpruned model is scored in the same run.
Results: benchmarks/results/pruning.json. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

MODEL = REPO / "benchmarks" / "work" / "hippocampus" / "model"
WORK = REPO / "benchmarks" / "work" / "pruning"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", default="0.75,0.5")
    ap.add_argument("--finetune-minutes", type=float, default=4.0)
    args = ap.parse_args()

    import torch

    from medseg import api
    from medseg.ensembling import load_member
    from medseg.imaging import dice_per_class
    from medseg.io.check import require_clean
    from medseg.io.dataset import read_case_image, read_case_label
    from medseg.planning.plan import read_plan
    from medseg.preprocessing import preprocess_dataset
    from medseg.runtime import memory_format
    from medseg.training import TrainConfig, train_fold

    load_start = os.getloadavg()
    split = json.loads((REPO / "benchmarks" / "splits" / "hippocampus.json").read_text())
    spec = require_clean(SHARED / "Task04_Hippocampus")
    val = split["val"]
    labels = {cid: np.asarray(read_case_label(spec, spec.case(cid)).array) for cid in val}
    images = {cid: read_case_image(spec, spec.case(cid)) for cid in val}

    def score(model_dir: Path) -> dict:
        member = load_member(model_dir, folds=[0])
        plan = member.plan
        net = member.models[0]
        x = torch.randn(4, plan.num_channels, *plan.patch_size)
        x = x.contiguous(memory_format=memory_format(plan.ndim))
        network = []
        with torch.inference_mode():
            net(x)
            for _ in range(7):
                t = time.perf_counter()
                net(x)
                network.append(time.perf_counter() - t)
        seconds, dices = [], []
        for cid in val:
            t = time.perf_counter()
            p = member.probabilities(images[cid])
            seconds.append(time.perf_counter() - t)
            dices.append(dice_per_class(p.argmax(0).numpy(), labels[cid], plan.num_classes))
        per_class = np.nanmean(np.array(dices), axis=0)
        return {
            "features": list(plan.network.features),
            "parameters": sum(p.numel() for p in net.parameters()),
            "dice_per_class": {n: float(v) for (_, n), v in zip(plan.labels[1:], per_class)},
            "dice_mean": float(np.nanmean(per_class)),
            "seconds_per_case_median": float(np.median(seconds)),
            "network_seconds_per_4_patches": float(np.median(network)),
        }

    rows = {"unpruned": score(MODEL)}
    print("unpruned", rows["unpruned"], flush=True)
    for keep in [float(k) for k in args.keep.split(",")]:
        tag = f"keep_{keep:g}"
        pruned_dir = WORK / tag / "pruned"
        report = api.prune(MODEL, pruned_dir, keep=keep, overwrite=True)
        rows[tag] = {"prune": report, "pruned": score(pruned_dir)}
        plan = read_plan(pruned_dir)
        pre = preprocess_dataset(spec, plan, WORK, num_workers=2, show_progress=False)
        tuned_dir = WORK / tag / "finetuned"
        shutil.rmtree(tuned_dir, ignore_errors=True)
        tuned_dir.mkdir(parents=True)
        shutil.copyfile(pruned_dir / "plan.json", tuned_dir / "plan.json")
        config = TrainConfig(
            time_budget_minutes=args.finetune_minutes,
            init_from=str(pruned_dir),
            device="cpu",
            max_validation_cases=10,
        )
        result = train_fold(
            plan,
            pre,
            tuned_dir / "fold_0",
            config,
            train_ids=split["train"],
            val_ids=split["val"],
            resume=False,
            show_progress=False,
        )
        rows[tag]["finetune"] = {
            "minutes": args.finetune_minutes,
            "iterations": result.iterations,
            "stopped_because": result.stopped_because,
        }
        rows[tag]["finetuned"] = score(tuned_dir)
        base = rows["unpruned"]
        for stage in ("pruned", "finetuned"):
            r = rows[tag][stage]
            r["dice_change"] = round(r["dice_mean"] - base["dice_mean"], 4)
            r["network_speedup"] = round(
                base["network_seconds_per_4_patches"] / r["network_seconds_per_4_patches"], 2
            )
            r["case_speedup"] = round(
                base["seconds_per_case_median"] / r["seconds_per_case_median"], 2
            )
        print(tag, json.dumps(rows[tag], default=float), flush=True)
    write_result(
        {
            "benchmark": "pruning",
            "machine": machine(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "model": str(MODEL.relative_to(REPO)),
            "validation_cases": len(val),
            "precision": "fp32, no TTA",
            "results": rows,
        },
        RESULTS / "pruning.json",
    )


if __name__ == "__main__":
    main()
