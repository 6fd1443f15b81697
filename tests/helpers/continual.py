"""Tiny 3D datasets for the continual-learning tests: a ball (old class) and a box (new).

``write_blob_dataset`` writes an MSD-layout dataset whose images hold a bright ball and a
darker box; which of them the labels mark is chosen by ``labels`` (the other one is
background there, as in a class-incremental step).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.io import Image, write_image

BALL, BOX = 1, 2


def blob_case(
    rng: np.random.Generator, shape: tuple[int, int, int] = (20, 20, 16), *, gain: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """An image with a ball (value 1 in the full label) and a box (value 2)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    label = np.zeros(shape, np.uint8)
    center = np.array([rng.uniform(0.3, 0.45) * s for s in shape])
    radius = rng.uniform(3.0, 4.0)
    ball = ((grid - center[:, None, None, None]) ** 2).sum(0) <= radius**2
    lo = np.array([int(rng.uniform(0.6, 0.7) * s) for s in shape])
    box = np.all([(grid[a] >= lo[a]) & (grid[a] < lo[a] + 4) for a in range(3)], axis=0)
    label[ball] = BALL
    label[box & ~ball] = BOX
    image = 50 + 100 * ball + 60 * (box & ~ball) + rng.normal(0, 8, shape)
    return (gain * image).astype(np.float32), label


def write_blob_dataset(
    root: Path,
    *,
    labels: dict[int, str],
    num_cases: int = 6,
    seed: int = 0,
    gain: float = 1.0,
) -> Path:
    """An MSD dataset whose labels keep only the classes in ``labels`` (0 always)."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(num_cases):
        image, full = blob_case(rng, gain=gain)
        label = np.where(np.isin(full, [v for v in labels if v > 0]), full, 0).astype(np.uint8)
        cid = f"blob_{i:03d}"
        write_image(Image(image, (1.0, 1.0, 1.0)), root / "imagesTr" / f"{cid}_0000.nii.gz")
        write_image(Image(label, (1.0, 1.0, 1.0)), root / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {
        "name": "blobs",
        "modality": {"0": "MR"},
        "labels": {str(k): v for k, v in sorted({0: "background", **labels}.items())},
        "numTraining": num_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
