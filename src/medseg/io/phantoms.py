"""Synthetic but realistic 3D phantoms for the demo and tests: shapes, noise, bias field, partial volume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.io.files import write_image
from medseg.io.image import Image

PHANTOM_LABELS = {"0": "background", "1": "organ", "2": "lesion"}


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def make_phantom(
    shape: tuple[int, int, int] = (40, 40, 32),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    *,
    seed: int = 0,
    supersample: int = 2,
) -> tuple[Image, Image]:
    """One MR-like phantom: a body, an ellipsoidal organ (label 1) holding a lesion (label 2).

    Intensities get partial volume (rendered at ``supersample`` x resolution and
    averaged), a smooth multiplicative bias field and Rician-like noise.
    """
    rng = np.random.default_rng(seed)
    fine = tuple(n * supersample for n in shape)
    # Physical coordinates (mm) of fine voxel centres, centred on the volume.
    axes = [
        (np.arange(n) + 0.5) / supersample * s - n / supersample * s / 2
        for n, s in zip(fine, spacing)
    ]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    extent = np.array(shape) * np.array(spacing) / 2

    body = np.sum((grid / (extent * rng.uniform(0.8, 0.92, 3))) ** 2, axis=-1) <= 1
    organ_center = rng.uniform(-0.2, 0.2, 3) * extent
    organ_radii = extent * rng.uniform(0.35, 0.5, 3)
    rot = _rotation(rng)
    local = (grid - organ_center) @ rot
    organ = np.sum((local / organ_radii) ** 2, axis=-1) <= 1
    lesion_radius = rng.uniform(0.5, 0.65) * organ_radii.min()
    lesion_center = organ_center + rot @ (
        rng.uniform(-0.35, 0.35, 3) * (organ_radii - lesion_radius)
    )
    lesion = np.sum((grid - lesion_center) ** 2, axis=-1) <= lesion_radius**2
    lesion &= organ

    intensity = np.where(body, 100.0, 10.0)
    intensity[organ] = 160.0 + rng.normal(0, 5)
    intensity[lesion] = 90.0 + rng.normal(0, 5)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, fine), 2 * supersample) * 40
    intensity = intensity + texture * body

    def down(a: np.ndarray) -> np.ndarray:
        s = supersample
        return a.reshape(shape[0], s, shape[1], s, shape[2], s).mean(axis=(1, 3, 5))

    image = down(intensity)
    label = np.zeros(shape, dtype=np.uint8)
    label[down(organ.astype(float)) >= 0.5] = 1
    label[down(lesion.astype(float)) >= 0.5] = 2

    coords = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    coefficients = rng.normal(0, 0.15, (3,))
    bias = np.exp(
        np.tensordot(coefficients, coords, axes=1) + rng.normal(0, 0.08) * (coords**2).sum(0)
    )
    image = image * bias
    noise_sigma = rng.uniform(8, 14)
    image = np.sqrt(
        (image + rng.normal(0, noise_sigma, shape)) ** 2 + rng.normal(0, noise_sigma, shape) ** 2
    )

    origin = tuple(float(v) for v in rng.uniform(-50, 50, 3))
    geometry = {"spacing": spacing, "origin": origin}
    return (
        Image(image.astype(np.float32), **geometry),
        Image(label, **geometry),
    )


def write_phantom_dataset(
    root: str | os.PathLike,
    *,
    num_train: int = 24,
    num_test: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] = (40, 40, 32),
) -> Path:
    """Write an MSD-layout dataset of phantoms; test cases go to ``imagesTs``/``labelsTs``."""
    root = Path(root)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(num_train + num_test):
        case_id = f"phantom_{i:03d}"
        image, label = make_phantom(shape, seed=seed * 1000 + i)
        split = "Tr" if i < num_train else "Ts"
        write_image(image, root / f"images{split}" / f"{case_id}_0000.nii.gz", overwrite=True)
        write_image(label, root / f"labels{split}" / f"{case_id}.nii.gz", overwrite=True)
        if split == "Tr":
            training.append(
                {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
            )
    meta = {
        "name": "medseg_phantoms",
        "description": "Synthetic MR-like phantoms: organ with a lesion, bias field, noise, partial volume",
        "modality": {"0": "MR"},
        "labels": PHANTOM_LABELS,
        "numTraining": num_train,
        "numTest": num_test,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
