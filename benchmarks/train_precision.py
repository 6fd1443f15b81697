"""bf16 against fp32 training on this CPU, at an equal number of iterations; EMA weights beside.

    python benchmarks/train_precision.py                    # hippocampus, 400 iterations per arm
    python benchmarks/train_precision.py --iterations 600
    python benchmarks/train_precision.py --arms fp32,bf16,fp32-compiled,bf16-compiled

Both arms train fold 0 of ``splits/hippocampus.json`` from the same seed with AdamW
(3e-3, warm-up + cosine over the run: the schedule of a budgeted run), the whole machine's
threads, one after the other on one preprocessed copy. Reported per arm: training
iterations/s (steps only, validation excluded), the validation Dice of the final weights
on the 42 validation cases (whole volumes at preprocessed resolution, no TTA), and the
Dice of an exponential moving average of the weights kept during the same run (decay
``--ema-decay``), so EMA costs no extra training to assess. What ``--precision auto``
chooses on a budgeted run (its probe) is in that run's ``precision.json``.

Writes ``results/train_precision.json`` (``--out``) with the machine and its CPU flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg.io.dataset import load_dataset  # noqa: E402
from medseg.model_folder import build_network, read_weights  # noqa: E402
from medseg.planning.work_dir import plan_for  # noqa: E402
from medseg.preprocessing import preprocess_dataset  # noqa: E402
from medseg.preprocessing.preprocess import load_preprocessed  # noqa: E402
from medseg.runtime import memory_format  # noqa: E402
from medseg.training import TrainConfig  # noqa: E402
from medseg.training.engine import Engine, Hook  # noqa: E402
from medseg.training.segmentation import validate  # noqa: E402
from medseg.training.trainer import train_fold  # noqa: E402


class WeightAverage(Hook):
    """An exponential moving average of the network's floating-point state after each step."""

    name = "ema"

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def after_step(self, engine: Engine, loss: float) -> None:
        state = engine.model.state_dict()
        if not self.shadow:
            self.shadow = {k: v.detach().clone() for k, v in state.items()}
            return
        for k, v in state.items():
            if v.is_floating_point():
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


def dice_of(state: dict, plan, val_cases) -> dict:
    net = build_network(plan, deep_supervision=True)  # as trained (validation uses the top)
    net.load_state_dict(state)
    net = net.to(memory_format=memory_format(len(plan.patch_size))).eval()
    per_class = validate(net, val_cases, plan, torch.device("cpu"), mirror=False)
    return {"mean": float(per_class.mean()), "per_class": [float(v) for v in per_class]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--iterations-per-epoch", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--arms", default="fp32,bf16")
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "precision"))
    parser.add_argument("--out", default=str(RESULTS / "train_precision.json"))
    args = parser.parse_args()
    info = machine()
    spec = load_dataset(SHARED / "Task04_Hippocampus")
    split = json.loads((REPO / "benchmarks" / "splits" / "hippocampus.json").read_text())
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    the_plan = plan_for(spec, work, num_workers=2, show_progress=False)
    pre = preprocess_dataset(spec, the_plan, work, num_workers=2, show_progress=False)
    prep_seconds = time.perf_counter() - t0
    val_cases = load_preprocessed(pre, split["val"])
    arms = {}
    for arm in args.arms.split(","):
        precision, _, compiled = arm.partition("-")  # e.g. "bf16-compiled"
        config = TrainConfig(
            optimizer="adamw",
            learning_rate=3e-3,
            iterations_per_epoch=args.iterations_per_epoch,
            max_epochs=args.iterations // args.iterations_per_epoch,
            precision=precision,
            compile="on" if compiled else "off",
        )
        fold_dir = work / arm / "fold_0"
        ema = WeightAverage(args.ema_decay)
        t = time.perf_counter()
        result = train_fold(
            the_plan,
            pre,
            fold_dir,
            config,
            train_ids=split["train"],
            val_ids=split["val"],
            resume=False,
            show_progress=False,
            hooks=[ema],
        )
        wall = time.perf_counter() - t
        final = dice_of(read_weights(fold_dir, "last")[0], the_plan, val_cases)
        averaged = dice_of(ema.shadow, the_plan, val_cases)
        arms[arm] = {
            "precision_used": result.precision,
            "speed_record": json.loads((fold_dir / "precision.json").read_text()),
            "iterations": result.iterations,
            "iterations_per_second": result.iterations_per_second,
            "wall_seconds": round(wall, 1),
            "best_epoch_val_dice": result.best_val_dice,
            "final_weights_val_dice": final,
            "ema_weights_val_dice": averaged,
        }
        print(arm, json.dumps(arms[arm]), flush=True)
    data = {
        "benchmark": "train_precision",
        "dataset": "Task04_Hippocampus (splits/hippocampus.json fold: 166 train, 42 val)",
        "machine": info,
        "preprocessing_seconds": round(prep_seconds, 1),
        "ema_decay": args.ema_decay,
        "arms": arms,
    }
    if "fp32" in arms:
        f = arms["fp32"]
        data["over_fp32"] = {
            name: {
                "iterations_per_second_ratio": round(
                    a["iterations_per_second"] / f["iterations_per_second"], 3
                ),
                "final_dice_difference": round(
                    a["final_weights_val_dice"]["mean"] - f["final_weights_val_dice"]["mean"], 4
                ),
            }
            for name, a in arms.items()
            if name != "fp32"
        }
    data["ema_minus_final_dice"] = {
        k: round(v["ema_weights_val_dice"]["mean"] - v["final_weights_val_dice"]["mean"], 4)
        for k, v in arms.items()
    }
    write_result(data, args.out)
    print(json.dumps({k: v for k, v in data.items() if k != "machine"}, indent=1, default=str))


if __name__ == "__main__":
    main()
