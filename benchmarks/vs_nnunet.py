"""medseg against nnU-Net v2 on the same hippocampus split and the same wall budget.

    bash benchmarks/setup_nnunet_env.sh
    python benchmarks/vs_nnunet.py                       # runs the nnU-Net anchor (30 min + prediction)
    python benchmarks/vs_nnunet.py --anchor-json benchmarks/results/nnunet_anchor_hippocampus.json

medseg's side is `benchmarks/results/hippocampus.json` (train_dataset.py hippocampus: same split,
same budget, preprocessing included). Throughput is compared at nnU-Net's own patch and batch:
medseg trains for a few minutes with that patch and batch, once with its planned (CPU) network and
once with nnU-Net's network widths, and its iterations/s are divided by nnU-Net's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg import api  # noqa: E402
from medseg.training import TrainConfig  # noqa: E402


def run_anchor(budget: float, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "nnunet_anchor.py"),
        "--dataset",
        str(SHARED / "Task04_Hippocampus"),
        "--split",
        str(REPO / "benchmarks" / "splits" / "hippocampus.json"),
        "--budget-minutes",
        str(budget),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def medseg_throughput(
    patch_xyz: list[int], batch: int, features: list[int] | None, minutes: float, work: Path
) -> dict:
    """Train briefly with a given patch/batch (and widths) and return medseg's iterations/s."""
    dataset = SHARED / "Task04_Hippocampus"
    if not (work / "plan.json").exists():
        api.plan(dataset, work, gpu=False, show_progress=False)
    plan = json.loads((work / "plan.json").read_text())
    plan["patch_size"] = patch_xyz
    plan["batch_size"] = batch
    if features:
        plan["network"]["features"] = features[: len(plan["network"]["strides"])]
    (work / "plan.json").write_text(json.dumps(plan, indent=1))
    model = work / "model"
    if model.exists():
        import shutil

        shutil.rmtree(model)
    config = replace(
        TrainConfig(), time_budget_minutes=minutes, iterations_per_epoch=50, max_validation_cases=5
    )
    (result,) = api.train(
        dataset,
        work,
        config=config,
        split_file=REPO / "benchmarks" / "splits" / "hippocampus.json",
        show_progress=False,
    )
    return {
        "patch_size_xyz": patch_xyz,
        "batch_size": batch,
        "features": plan["network"]["features"],
        "iterations": result.iterations,
        "iterations_per_second": result.iterations_per_second,
        "data_wait_share": result.data_wait_share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--anchor-json", type=Path, help="reuse an nnunet_anchor.py result instead of running it"
    )
    parser.add_argument("--medseg-json", type=Path, default=RESULTS / "hippocampus.json")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--throughput-minutes", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_nnunet.json")
    args = parser.parse_args()
    info = machine()
    anchor = (
        json.loads(args.anchor_json.read_text())
        if args.anchor_json
        else run_anchor(args.budget_minutes, RESULTS / "nnunet_anchor_hippocampus.json")
    )
    ours = json.loads(args.medseg_json.read_text())
    nn_patch = list(anchor["patch_size"])
    patch_xyz = nn_patch[::-1]  # nnU-Net arrays are (z, y, x); medseg's are (x, y, z)
    batch = int(anchor["batch_size"])
    widths = [32 * 2**i for i in range(len(ours["plan"]["network"]["features"]))]
    widths = [min(w, 320) for w in widths]
    work = REPO / "benchmarks" / "work" / "throughput"
    planned = medseg_throughput(patch_xyz, batch, None, args.throughput_minutes, work)
    same_widths = medseg_throughput(patch_xyz, batch, widths, args.throughput_minutes, work)
    nn_its = anchor["iterations_per_second"]
    ours_dice = {k: v["mean"] for k, v in ours["dice_per_class"].items()}
    nn_dice = {v["name"]: v["mean"] for v in anchor["dice_per_class"].values()}
    data = {
        "benchmark": "vs_nnunet",
        "machine": info,
        "split": "benchmarks/splits/hippocampus.json",
        "budget_minutes": ours["budget_minutes"],
        "medseg": {
            "dice_mean": ours["dice_mean"],
            "dice_per_class": ours_dice,
            "iterations": ours["train"]["iterations"],
            "iterations_per_second": ours["train"]["iterations_per_second"],
            "patch_size_xyz": ours["plan"]["patch_size"],
            "batch_size": ours["plan"]["batch_size"],
            "features": ours["plan"]["network"]["features"],
            "result_file": str(args.medseg_json),
        },
        "nnunet": {
            "dice_mean": anchor["dice_mean"],
            "dice_per_class": nn_dice,
            "iterations": anchor["iterations"],
            "iterations_per_second": nn_its,
            "patch_size_zyx": nn_patch,
            "batch_size": batch,
            "version": anchor["version"],
            "result_file": str(args.anchor_json or RESULTS / "nnunet_anchor_hippocampus.json"),
        },
        "dice_ratio_medseg_over_nnunet": ours["dice_mean"] / anchor["dice_mean"]
        if anchor["dice_mean"]
        else None,
        "throughput_at_nnunet_patch_and_batch": {
            "medseg_planned_network": planned,
            "medseg_nnunet_widths": same_widths,
            "ratio_planned_network": planned["iterations_per_second"] / nn_its if nn_its else None,
            "ratio_nnunet_widths": same_widths["iterations_per_second"] / nn_its
            if nn_its
            else None,
        },
        "goal": {
            "dice": "medseg >= nnU-Net at equal time",
            "throughput": ">= 10x nnU-Net iterations/s at the same patch and batch",
        },
    }
    data["goal_met"] = {
        "dice": data["dice_ratio_medseg_over_nnunet"] is not None
        and data["dice_ratio_medseg_over_nnunet"] >= 1.0,
        "throughput_planned_network": (
            data["throughput_at_nnunet_patch_and_batch"]["ratio_planned_network"] or 0
        )
        >= 10,
        "throughput_nnunet_widths": (
            data["throughput_at_nnunet_patch_and_batch"]["ratio_nnunet_widths"] or 0
        )
        >= 10,
    }
    write_result(data, args.out)
    print(
        json.dumps(
            {
                k: data[k]
                for k in (
                    "dice_ratio_medseg_over_nnunet",
                    "throughput_at_nnunet_patch_and_batch",
                    "goal_met",
                )
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
