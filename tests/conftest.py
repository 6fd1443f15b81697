"""Shared fixtures: tiny synthetic datasets made on the fly, and the path to ../shared/datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.io import Image, write_image
from medseg.io.phantoms import write_phantom_dataset

# the distillation and fine-tuning tests share one module-scoped teacher fixture (`setup`)
pytest_plugins = ["helpers.distillation"]

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.fail(f"shared dataset missing: {path} (integration tests need ../shared/datasets)")
    return path


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """A tiny 3D MSD-layout dataset: 8 training and 2 test phantoms of 24x24x20 voxels."""
    root = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(root / "data", num_train=8, num_test=2, shape=(24, 24, 20))


def disk_case(rng: np.random.Generator, shape=(64, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy bright ellipse on a dark background (2D, like a fetal head)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = rng.uniform(0.35, 0.65) * shape[0], rng.uniform(0.35, 0.65) * shape[1]
    rx, ry = rng.uniform(0.18, 0.3) * shape[0], rng.uniform(0.2, 0.3) * shape[1]
    mask = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    image = np.clip(40 + 120 * mask + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


@pytest.fixture(scope="session")
def disk_dataset(tmp_path_factory) -> Path:
    """A tiny plain 2D dataset (images/ + masks/ with 0/255 PNG masks)."""
    root = tmp_path_factory.mktemp("disks") / "data"
    rng = np.random.default_rng(0)
    for i in range(10):
        image, mask = disk_case(rng)
        write_image(Image(image, (1.0, 1.0)), root / "images" / f"case_{i:02d}.png")
        write_image(Image(mask, (1.0, 1.0)), root / "masks" / f"case_{i:02d}.png")
    return root


def write_split(path: Path, train: list[str], val: list[str]) -> Path:
    path.write_text(json.dumps({"train": train, "val": val}))
    return path
