"""Helpers for the issue-8 tests: tiny model folders made without training."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from medseg.model_folder import build_network, write_weights
from medseg.planning.plan import Plan, read_plan
from medseg.serialization import write_json_atomic
from medseg.training import TrainConfig


def tiny_plan(plan: Plan) -> Plan:
    """The same preprocessing with a small network and patch, for fast tests."""
    ndim = plan.ndim
    network = replace(
        plan.network,
        features=(4, 8),
        strides=((1,) * ndim, (2,) * ndim),
        kernel_sizes=((3,) * ndim,) * 2,
        deep_supervision=True,
    )
    patch = tuple(min(32, p) for p in plan.patch_size)
    return replace(plan, network=network, patch_size=patch, batch_size=2)


def fake_model_dir(
    folder: Path,
    plan: Plan,
    *,
    model: str = "unet",
    folds: tuple[int, ...] = (0,),
    seed: int = 0,
    splits: list | None = None,
    dataset_json: Path | None = None,
) -> Path:
    """A model folder with randomly initialized fold networks (what training leaves behind)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan, folder / "plan.json")
    if splits is not None:
        write_json_atomic(splits, folder / "splits.json")
    if dataset_json is not None:
        (folder / "dataset.json").write_text(dataset_json.read_text())
    for fold in folds:
        torch.manual_seed(seed + fold)
        net = build_network(plan, name=model, deep_supervision=False)
        fold_dir = folder / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        write_json_atomic(TrainConfig(model=model, fold=fold), fold_dir / "train_config.json")
        write_weights(fold_dir, "best", net.state_dict(), metadata={"network": model, "epoch": 0})
    return folder


def work_plan(work: Path) -> Plan:
    return read_plan(work / "plan.json")


def read_json(path: Path):
    return json.loads(Path(path).read_text())
