"""Tiny multi-modal cases: two contrasts of one analytic phantom, on chosen grids, and a
two-channel model folder (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medseg.io import Image, write_image
from medseg.model_folder import build_network, write_weights
from medseg.planning.plan import read_plan

BLOBS = (  # centre (mm), radius (mm), weight
    ((12.0, 14.0, 10.0), 5.0, 1.0),
    ((21.0, 10.0, 13.0), 3.5, 0.6),
    ((15.0, 22.0, 8.0), 4.0, -0.5),
    ((9.0, 8.0, 15.0), 2.5, 0.8),
)


def anatomy(points: np.ndarray) -> np.ndarray:
    """A smooth 3D 'anatomy' (sum of Gaussian blobs) at world points ``(..., 3)`` in mm."""
    out = np.full(points.shape[:-1], 0.2)
    for centre, radius, weight in BLOBS:
        d2 = np.sum((points - np.asarray(centre)) ** 2, axis=-1)
        out = out + weight * np.exp(-d2 / (2 * radius**2))
    return out


def grid_points(shape, spacing, origin) -> np.ndarray:
    axes = [o + s * np.arange(n) for n, s, o in zip(shape, spacing, origin)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def t1_image(shape=(30, 30, 24), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Image:
    values = 100 + 400 * anatomy(grid_points(shape, spacing, origin))
    return Image(values.astype(np.float32), spacing, origin)


def t2_image(
    shift=(0.0, 0.0, 0.0), shape=(22, 22, 14), spacing=(1.4, 1.4, 1.8), origin=(-0.5, 0.3, 0.2)
) -> Image:
    """Another contrast (inverted, non-linear) of the anatomy moved by ``-shift``:
    T2(p) = contrast(anatomy(p + shift)), on its own grid."""
    a = anatomy(grid_points(shape, spacing, origin) + np.asarray(shift))
    values = 900 * np.exp(-1.5 * a) + 150 * a**2
    return Image(values.astype(np.float32), spacing, origin)


def label_of(image: Image) -> Image:
    """Label 1 where the T1 phantom is bright (the big blob), on the T1 grid."""
    return image.with_array((image.array > 100 + 400 * 0.6).astype(np.uint8))


def write_two_channel_dataset(root: Path, *, shifts, names=("T1", "T2")) -> Path:
    """An nnU-Net v2 dataset whose channel 1 is on another grid, moved by ``shifts[i]``."""
    for i, shift in enumerate(shifts):
        t1 = t1_image()
        write_image(t1, root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        write_image(t2_image(shift), root / "imagesTr" / f"case_{i:03d}_0001.nii.gz")
        write_image(label_of(t1), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(names)},
        "labels": {"background": 0, "blob": 1},
        "numTraining": len(shifts),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_two_channel_model_dir(
    root: Path, *, network: str = "late_fusion", modality_dropout: float = 0.5, seed: int = 0
) -> Path:
    """A model folder of a tiny randomly initialized two-channel network (T1, T2), fold 0,
    with the training record a run with ``modality_dropout`` writes."""
    plan = {
        "dataset_name": "tiny_mm",
        "ndim": 3,
        "configuration": "3d",
        "channel_names": ["T1", "T2"],
        "labels": [[0, "background"], [1, "blob"]],
        "target_spacing": [1.0, 1.0, 1.0],
        "normalization": [
            {"scheme": "zscore", "clip_low": 0.0, "clip_high": 0.0, "mean": 0.0, "std": 1.0}
        ]
        * 2,
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "network": {
            "name": network,
            "features": [4, 8],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "residual": False,
            "deep_supervision": False,
        },
        "median_shape": [20, 20, 20],
        "crop_to_nonzero": False,
    }
    model_dir = root / "model"
    (model_dir / "fold_0").mkdir(parents=True)
    (model_dir / "plan.json").write_text(json.dumps(plan))
    (model_dir / "fold_0" / "train_config.json").write_text(
        json.dumps({"model": network, "modality_dropout": modality_dropout})
    )
    torch.manual_seed(seed)
    model = build_network(read_plan(model_dir), deep_supervision=False)
    write_weights(model_dir / "fold_0", "best", model.state_dict(), metadata={"network": network})
    return model_dir
