"""Helpers shared by the tests in tests/inference/ and beyond."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from medseg.io import Image, write_image
from medseg.model_folder import build_network, write_weights
from medseg.planning.plan import read_plan


def make_model_dir(root: Path, *, ndim: int = 3, num_classes: int = 3, seed: int = 0) -> Path:
    """A model folder with a tiny randomly initialized U-Net (fold 0): no training needed."""
    plan = {
        "dataset_name": "tiny",
        "ndim": ndim,
        "configuration": f"{ndim}d",
        "channel_names": ["MRI"],
        "labels": [[c, f"class{c}"] for c in range(num_classes)],
        "target_spacing": [1.0] * ndim,
        "normalization": [
            {"scheme": "zscore", "clip_low": 0.0, "clip_high": 0.0, "mean": 0.0, "std": 1.0}
        ],
        "patch_size": [16] * ndim,
        "batch_size": 2,
        "network": {
            "name": "unet",
            "features": [4, 8],
            "strides": [[1] * ndim, [2] * ndim],
            "kernel_sizes": [[3] * ndim, [3] * ndim],
            "residual": False,
            "deep_supervision": False,
        },
        "median_shape": [20] * ndim,
        "crop_to_nonzero": False,
    }
    model_dir = root / "model"
    (model_dir / "fold_0").mkdir(parents=True)
    (model_dir / "plan.json").write_text(json.dumps(plan))
    torch.manual_seed(seed)
    model = build_network(read_plan(model_dir), deep_supervision=False)
    write_weights(model_dir / "fold_0", "best", model.state_dict(), metadata={"network": "unet"})
    return model_dir


def write_cases(folder: Path, n: int, shape=(20, 18, 17), spacing=(1.0, 1.0, 1.0)) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        array = rng.normal(size=shape).astype(np.float32)
        write_image(Image(array, spacing, (1.0, 2.0, 3.0)), folder / f"case_{i:02d}.nii.gz")
    return folder
