"""Helpers shared by the tests in tests/distillation/."""

from __future__ import annotations

import pytest
from zoo_helpers import fake_model_dir, tiny_plan

from medseg import api
from medseg.io.dataset import load_dataset
from medseg.serialization import write_json_atomic
from medseg.training import TrainConfig, make_folds
from medseg.transforms import AugmentConfig

FAST = TrainConfig(
    max_epochs=3,
    iterations_per_epoch=6,
    batch_size=2,
    optimizer="adamw",
    learning_rate=3e-3,
    augmentation=AugmentConfig(enabled=False),
    device="cpu",
    num_threads=1,
    seed=3,
)


@pytest.fixture(scope="module")
def setup(disk_dataset, tmp_path_factory):
    """A tiny 2D plan, its splits, and a (randomly initialized) teacher model folder."""
    root = tmp_path_factory.mktemp("kd")
    plan = tiny_plan(api.plan(disk_dataset, root / "base", show_progress=False))
    spec = load_dataset(disk_dataset)
    splits = make_folds([c.case_id for c in spec.cases], num_folds=2, seed=0)
    write_json_atomic(spec.to_json(), root / "dataset.json")
    teacher = fake_model_dir(
        root / "teacher",
        plan,
        folds=(0, 1),
        seed=7,
        splits=splits,
        dataset_json=root / "dataset.json",
    )
    return root, plan, teacher, disk_dataset
