"""Federated hippocampus: centralised vs each site alone vs FedAvg, FedProx and FedAvg + DP (issue 19).

Task04_Hippocampus, the fixed split (benchmarks/splits/hippocampus.json: 166 training and 42
validation cases). The training cases are split into three sites by the stored image data
type: the ``uint8`` images form one site (a different export pipeline, a documented
"scanner shift"), the ``float32`` ones are split at random into two. Every arm is scored on
the same 42 validation cases (mean Dice of the two classes at the plan's resolution, no TTA).

Arms, at equal total optimizer steps ``S = sites x rounds x local_steps`` (batch of the plan):
- ``fedavg_deployment``: FedAvg over the real Flower deployment on loopback (a SuperLink
  and one SuperNode process per site, TLS, node keys), ``medseg.federated.deploy``;
- ``fedprox`` and ``fedavg_dp`` (epsilon 8, delta 1e-5 per site): the same coordinator and
  site code with the sites called in this process (``medseg.federated.simulate``);
- ``centralised``: all training cases pooled, ``S`` steps, same optimizer (AdamW, cosine);
- ``site_alone_<k>``: each site on its own cases for its share of the federation,
  ``rounds x local_steps`` steps.
The plan is the one the federation agreed from the sites' fingerprints; all arms use it.

Usage (one core, as README rule 4 asks)::

    /work/tools/slot one .venv/bin/python benchmarks/federated.py --rounds 6 --local-steps 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import REPO, RESULTS, SHARED, machine, write_result

from medseg.federated.coordinator import FederationConfig, run_federation
from medseg.federated.deploy import run_local_deployment
from medseg.federated.simulate import LocalTransport, split_sites
from medseg.federated.site import Site
from medseg.io.dataset import load_dataset
from medseg.model_folder import build_network, read_weights
from medseg.planning.plan import read_plan
from medseg.preprocessing import preprocess_dataset
from medseg.preprocessing.preprocess import load_preprocessed
from medseg.training import Engine, LoopConfig, SegmentationTask, TrainConfig
from medseg.training.segmentation import validate


def score(weights, plan, val_cases) -> dict:
    model = build_network(plan)
    model.load_state_dict(weights)
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        per_class = validate(model, val_cases, plan, torch.device("cpu"), mirror=False)
    names = [n for v, n in plan.labels if v > 0]
    return {
        "dice_mean": float(np.nanmean(per_class)),
        "dice_per_class": dict(zip(names, map(float, per_class))),
        "eval_seconds": round(time.perf_counter() - t, 1),
    }


def train_pooled(
    plan, spec, ids, folder: Path, steps: int, lr: float, seed: int
) -> tuple[dict, float]:
    """Plain engine training on ``ids`` for ``steps`` steps (AdamW, cosine to zero)."""
    pre = preprocess_dataset(spec, plan, folder, case_ids=ids, num_workers=1, show_progress=False)
    config = TrainConfig(
        optimizer="adamw", learning_rate=lr, seed=seed, num_threads=1, device="cpu"
    )
    task = SegmentationTask(plan, pre, folder / "fold", config, train_ids=ids, val_ids=[])
    loop = LoopConfig(
        iterations_per_epoch=steps,
        max_epochs=1,
        max_steps=steps,
        optimizer="adamw",
        learning_rate=lr,
        weight_decay=config.weight_decay,
        warmup_fraction=0.0,
        grad_clip=12.0,
        device="cpu",
        num_threads=1,
        seed=seed,
        tensorboard=False,
    )
    t = time.perf_counter()
    result = Engine(task, folder / "fold", loop, resume=False, show_progress=False).fit()
    return result.model.state_dict(), time.perf_counter() - t


def summarise_rounds(history: dict) -> dict:
    rounds = history["rounds"]
    return {
        "rounds": len(rounds),
        "bytes_sent_per_round": rounds[0]["bytes_sent"],
        "bytes_received_per_round": rounds[0]["bytes_received"],
        "round_wall_seconds": [r["round_seconds"] for r in rounds],
        "train_cpu_seconds_per_round": [
            round(sum(a.get("train_cpu_seconds", 0.0) for a in r["accepted"]), 2) for r in rounds
        ],
        "rejected": [r["rejected"] for r in rounds if r["rejected"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dp-epsilon", type=float, default=8.0)
    parser.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "federated"))
    parser.add_argument("--out", default=str(RESULTS / "federated.json"))
    parser.add_argument("--skip", default="", help="arms to skip, comma-separated")
    parser.add_argument(
        "--finalize", action="store_true", help="recompute goals and Markdown of --out only"
    )
    parser.add_argument(
        "--max-cases", type=int, help="smoke test: first N training and N/4 validation cases"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.finalize:
        result = json.loads(Path(args.out).read_text())
        finalize(result)
        write_result(result, args.out)
        write_markdown(result, Path(args.out).with_suffix(".md"))
        print(json.dumps(result["goals"], indent=2))
        return
    work = Path(args.work_dir)
    spec = load_dataset(SHARED / "Task04_Hippocampus")
    split = json.loads((REPO / "benchmarks" / "splits" / "hippocampus.json").read_text())
    if args.max_cases:
        split = {
            "train": split["train"][: args.max_cases],
            "val": split["val"][: max(1, args.max_cases // 4)],
        }
    groups = split_sites(spec, sites=3, split_by="dtype", case_ids=split["train"])
    steps_total = len(groups) * args.rounds * args.local_steps
    config = FederationConfig(
        rounds=args.rounds,
        local_steps=args.local_steps,
        min_clients=len(groups),
        learning_rate=args.lr,
        straggler_seconds=600,
        round_timeout_seconds=7200,
        dataset_name="Hippocampus",
    )
    result: dict = {
        "benchmark": "federated",
        "dataset": "Task04_Hippocampus",
        "split": "benchmarks/splits/hippocampus.json",
        "sites": {k: len(v) for k, v in groups.items()},
        "site_split": "by stored image data type: the uint8 images are one site, the float32 ones two random halves",
        "n_val": len(split["val"]),
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "total_steps_per_arm": steps_total,
        "scaled_down": (
            f"{steps_total} optimizer steps per arm (batch of the plan) so that every arm fits "
            "about 30 slot-minutes of one CPU core (README rule 4); the trained hippocampus "
            "reference took ~900 steps for Dice 0.857, so all Dice values here are early-training "
            "values and the comparisons are between equally short runs"
        ),
        "machine": machine(),
        "arms": {},
    }
    out_path = Path(args.out)

    def save():
        write_result(result, out_path)

    t_all = time.perf_counter()
    # 1. FedAvg over the real deployment; its plan is everyone's plan
    deploy_dir = work / "deploy"
    if "fedavg_deployment" not in skip:
        shutil.rmtree(deploy_dir, ignore_errors=True)
        t = time.perf_counter()
        history = run_local_deployment(spec, groups, deploy_dir, config, num_threads=1)
        wall = time.perf_counter() - t
        result["arms"]["fedavg_deployment"] = {
            "wall_seconds": round(wall, 1),
            **summarise_rounds(history),
        }
        save()
    plan = read_plan(deploy_dir / "server" / "plan.json")
    val_pre = preprocess_dataset(
        spec, plan, work / "val", case_ids=split["val"], num_workers=1, show_progress=False
    )
    val_cases = load_preprocessed(val_pre, split["val"])
    result["plan"] = {
        "patch_size": plan.patch_size,
        "batch_size": plan.batch_size,
        "network": plan.network.name,
    }
    if "fedavg_deployment" in result["arms"]:
        final = deploy_dir / "server" / f"round_{args.rounds:03d}" / "fold_0"
        result["arms"]["fedavg_deployment"].update(
            score(read_weights(final, "last")[0], plan, val_cases)
        )
        save()

    # 2. centralised and each site alone (plain engine training, same plan and optimizer)
    if "centralised" not in skip:
        weights, wall = train_pooled(
            plan, spec, split["train"], work / "central", steps_total, args.lr, 0
        )
        result["arms"]["centralised"] = {
            "wall_seconds": round(wall, 1),
            "steps": steps_total,
            **score(weights, plan, val_cases),
        }
        save()
    for k, (name, ids) in enumerate(groups.items()):
        arm = f"site_alone_{name}"
        if arm in skip or "site_alone" in skip:
            continue
        steps = args.rounds * args.local_steps
        weights, wall = train_pooled(plan, spec, ids, work / arm, steps, args.lr, k + 1)
        result["arms"][arm] = {
            "wall_seconds": round(wall, 1),
            "steps": steps,
            **score(weights, plan, val_cases),
        }
        save()

    # 3. the simulated arms (same coordinator and site code, sites in this process)
    sim_sites = work / "sim_sites"
    for arm, overrides in (
        ("fedprox", {"strategy": "fedprox"}),
        ("fedavg_dp", {"dp_epsilon": args.dp_epsilon}),
    ):
        if arm in skip:
            continue
        for name in groups:
            (sim_sites / name / "privacy.json").unlink(missing_ok=True)
        out = work / arm
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copy(deploy_dir / "server" / "plan.json", out / "plan.json")
        sites = [
            Site(spec, sim_sites / n, case_ids=ids, name=n, num_threads=1)
            for n, ids in groups.items()
        ]
        t = time.perf_counter()
        history = run_federation(LocalTransport(sites), out, replace(config, **overrides))
        wall = time.perf_counter() - t
        same_plan = (out / "plan.json").read_text() == (
            deploy_dir / "server" / "plan.json"
        ).read_text()
        final = out / f"round_{args.rounds:03d}" / "fold_0"
        entry = {
            "wall_seconds": round(wall, 1),
            "same_plan_as_deployment": same_plan,
            **summarise_rounds(history),
        }
        if arm == "fedavg_dp":
            last = history["rounds"][-1]
            entry["dp"] = {
                "epsilon_total_max_over_sites": last.get("dp_epsilon_total_max"),
                "epsilon_per_round_max": last.get("dp_epsilon_round_max"),
                "delta": config.dp_delta,
                "clip": config.dp_clip,
                "noise_multiplier": {
                    a["site"]: a.get("dp_noise_multiplier") for a in last["accepted"]
                },
            }
        entry.update(score(read_weights(final, "last")[0], plan, val_cases))
        result["arms"][arm] = entry
        save()

    finalize(result)
    result["total_wall_seconds"] = round(time.perf_counter() - t_all, 1)
    save()
    write_markdown(result, out_path.with_suffix(".md"))
    print(json.dumps(result["goals"], indent=2))


def finalize(result: dict) -> None:
    """Orchestration share and the issue's goals from the arms measured so far."""
    arms = result["arms"]
    dep = arms.get("fedavg_deployment", {})
    if dep:
        wall = dep["wall_seconds"]
        cpu = sum(dep["train_cpu_seconds_per_round"])
        dep["orchestration_share"] = round(1 - cpu / wall, 3) if wall else None
    goals = {}
    central, fedavg = arms.get("centralised"), arms.get("fedavg_deployment")
    if central and fedavg:
        goals["fedavg_vs_centralised"] = {
            "ratio": round(fedavg["dice_mean"] / central["dice_mean"], 3),
            "goal": ">= 0.98",
            "met": fedavg["dice_mean"] >= 0.98 * central["dice_mean"],
        }
    alone = {k: v["dice_mean"] for k, v in arms.items() if k.startswith("site_alone")}
    if fedavg and alone:
        goals["site_alone_below_fedavg"] = {
            "gaps": {k: round(fedavg["dice_mean"] - v, 3) for k, v in alone.items()},
            "goal": ">= 0.02 each",
            "met": all(fedavg["dice_mean"] - v >= 0.02 for v in alone.values()),
        }
    if fedavg and "fedavg_dp" in arms:
        cost = fedavg["dice_mean"] - arms["fedavg_dp"]["dice_mean"]
        goals["dp_cost"] = {"dice_cost": round(cost, 3), "goal": "<= 0.05", "met": cost <= 0.05}
    if dep.get("orchestration_share") is not None:
        goals["orchestration_share"] = {
            "share": dep["orchestration_share"],
            "goal": "<= 0.10",
            "met": dep["orchestration_share"] <= 0.10,
        }
    result["goals"] = goals


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Federated hippocampus (issue 19)",
        "",
        f"Sites: {result['sites']} ({result['site_split']}); validation: {result['n_val']} fixed cases.",
        f"Equal compute: {result['total_steps_per_arm']} optimizer steps per arm "
        f"({len(result['sites'])} sites x {result['rounds']} rounds x {result['local_steps']} local steps); "
        "each site alone gets its own share (rounds x local steps).",
        "",
        "| arm | Dice (mean of 2 classes) | wall s | bytes sent / round | notes |",
        "|---|---|---|---|---|",
    ]
    for arm, v in result["arms"].items():
        note = ""
        if "dp" in v:
            note = (
                f"epsilon {v['dp']['epsilon_total_max_over_sites']:.2f} (delta {v['dp']['delta']})"
            )
        if "orchestration_share" in v:
            note = f"orchestration share {v['orchestration_share']:.2f}"
        lines.append(
            f"| {arm} | {v.get('dice_mean', float('nan')):.3f} | {v.get('wall_seconds', '')} | "
            f"{v.get('bytes_sent_per_round', '')} | {note} |"
        )
    lines += ["", "Goals:", "", "```", json.dumps(result.get("goals", {}), indent=2), "```", ""]
    lines.append(f"Command: `{result['machine']['command']}`")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
