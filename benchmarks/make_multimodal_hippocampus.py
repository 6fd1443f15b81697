"""Build a SYNTHETIC two-contrast hippocampus dataset: the real T1 plus a made-up "T2syn".

No labelled multi-modal dataset is available here, so the second channel is simulated
from each hippocampus T1 image (MSD Task04), seeded per case:

1. a non-linear, non-monotonic intensity remap (dark T1 voxels become bright, a bump at
   mid-grey), so that the two channels are different contrasts of one anatomy;
2. a rigid misalignment (rotation up to +-3 degrees about each axis, translation up to
   +-2 mm per axis, about the image centre), as if the patient moved between sequences;
3. a different grid: spacing (1.25, 1.25, 1.5) mm instead of 1 mm, same centre;
4. a smooth multiplicative bias field (exp of a random quadratic, about +-20 %);
5. Rician noise (sigma 3 % of the signal range).

The result is written in the nnU-Net v2 layout (the only one that holds channels on
different grids): ``imagesTr/<case>_0000.nii.gz`` (the T1 file, as it is),
``imagesTr/<case>_0001.nii.gz`` (T2syn, on its own grid), ``labelsTr/<case>.nii.gz``.
``truth/<case>.json`` and ``truth/<case>_0001.tfm`` hold the simulated motion ``T`` (T2syn
grid points -> T1 points); the ideal co-registration transform (T1 points -> T2syn points)
is its inverse. THE SECOND CHANNEL IS SYNTHETIC: it carries no information that the T1
does not, so results on it say how the fusion machinery behaves, not how real T2 helps.

Usage::

    python benchmarks/make_multimodal_hippocampus.py [--out DIR] [--cases N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED  # noqa: E402

SOURCE = SHARED / "Task04_Hippocampus"
DEFAULT_OUT = Path(__file__).resolve().parent / "work" / "Hippocampus_T1_T2syn"
T2_SPACING = (1.25, 1.25, 1.5)
MAX_ROTATION_DEG = 3.0
MAX_TRANSLATION_MM = 2.0
BIAS_STRENGTH = 0.2
NOISE_FRACTION = 0.03
SEED = 22


def remap(t1: np.ndarray) -> np.ndarray:
    """T2-like contrast: inverted, non-linear and non-monotonic in the T1 intensity."""
    values = t1[t1 > 0]
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    u = np.clip((t1 - lo) / max(hi - lo, 1e-6), 0.0, 1.2)
    v = 0.25 + 0.75 * (1.0 - np.minimum(u, 1.0)) ** 1.5 + 0.35 * np.exp(-(((u - 0.55) / 0.12) ** 2))
    return (800.0 * v).astype(np.float32)


def motion(image: sitk.Image, rng: np.random.Generator) -> sitk.Euler3DTransform:
    """A random rigid transform about the image centre (T2syn points -> T1 points)."""
    size = np.array(image.GetSize(), dtype=float)
    centre = image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2))
    angles = np.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    shift = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    tx = sitk.Euler3DTransform()
    tx.SetCenter(centre)
    tx.SetRotation(*[float(a) for a in angles])
    tx.SetTranslation(tuple(float(s) for s in shift))
    return tx


def t2_grid(t1: sitk.Image) -> sitk.Image:
    """An empty grid with spacing :data:`T2_SPACING`, the T1's direction and centre."""
    size = np.array(t1.GetSize(), dtype=float)
    spacing = np.array(t1.GetSpacing()) * np.array(T2_SPACING)  # 1 mm T1 -> T2_SPACING mm
    new_size = np.maximum(np.round(size * np.array(t1.GetSpacing()) / spacing), 4).astype(int)
    centre = np.array(t1.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))
    direction = np.array(t1.GetDirection()).reshape(3, 3)
    origin = centre - direction @ (spacing * (new_size - 1) / 2)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(t1.GetDirection())
    return grid


def bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """exp of a random quadratic over [-1, 1]^3, scaled to about +-BIAS_STRENGTH."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = [*axes] + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    field = sum(rng.normal(0, 1) * t for t in terms)
    field = field / max(np.abs(field).max(), 1e-6) * BIAS_STRENGTH
    return np.exp(field).astype(np.float32)


def synthetic_t2(t1: sitk.Image, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Transform]:
    """The T2syn image of one T1 and the motion used to make it."""
    array = sitk.GetArrayFromImage(t1).astype(np.float32)
    contrast = sitk.GetImageFromArray(remap(array))
    contrast.CopyInformation(t1)
    tx = motion(t1, rng)
    moved = sitk.Resample(contrast, t2_grid(t1), tx, sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    out = np.clip(sitk.GetArrayFromImage(moved), 0, None)  # (z, y, x)
    out *= bias_field(out.shape, rng)
    sigma = NOISE_FRACTION * float(out.max())
    out = np.sqrt(
        (out + rng.normal(0, sigma, out.shape)) ** 2 + rng.normal(0, sigma, out.shape) ** 2
    )
    result = sitk.GetImageFromArray(out.astype(np.float32))
    result.CopyInformation(moved)
    return result, tx


def build(out: Path, *, cases: int | None = None, seed: int = SEED, source: Path = SOURCE) -> Path:
    """Write the dataset to ``out`` (skipping cases already written); returns ``out``."""
    meta = json.loads((source / "dataset.json").read_text())
    entries = meta["training"][:cases] if cases else meta["training"]
    for sub in ("imagesTr", "labelsTr", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for entry in entries:
        case = Path(entry["image"]).name.removesuffix(".nii.gz")
        done = out / "truth" / f"{case}.json"
        if done.exists():
            continue
        number = int(case.rsplit("_", 1)[-1])
        rng = np.random.default_rng([seed, number])
        t1_path = source / entry["image"].removeprefix("./")
        t1 = sitk.ReadImage(str(t1_path), sitk.sitkFloat32)
        t2, tx = synthetic_t2(t1, rng)
        shutil.copyfile(t1_path, out / "imagesTr" / f"{case}_0000.nii.gz")
        sitk.WriteImage(t2, str(out / "imagesTr" / f"{case}_0001.nii.gz"), useCompression=True)
        shutil.copyfile(
            source / entry["label"].removeprefix("./"), out / "labelsTr" / f"{case}.nii.gz"
        )
        sitk.WriteTransform(tx, str(out / "truth" / f"{case}_0001.tfm"))
        record = {
            "case_id": case,
            "motion": "T2syn grid points -> T1 points (Euler3D about the image centre)",
            "rotation_deg": [
                float(np.degrees(a)) for a in (tx.GetAngleX(), tx.GetAngleY(), tx.GetAngleZ())
            ],
            "translation_mm": list(tx.GetTranslation()),
            "center": list(tx.GetCenter()),
            "t2_spacing": list(t2.GetSpacing()),
            "t2_size": list(t2.GetSize()),
        }
        tmp = done.with_name(f".tmp-{done.name}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, done)
    dataset = {
        "name": "Hippocampus_T1_T2syn",
        "description": (
            "SYNTHETIC second contrast: T2syn is simulated from the MSD Task04 hippocampus T1 "
            "(non-linear remap, rigid motion, 1.25x1.25x1.5 mm grid, bias field, Rician noise; "
            f"seed {seed}); see benchmarks/make_multimodal_hippocampus.py"
        ),
        "channel_names": {"0": "T1", "1": "T2syn"},
        "labels": {name: int(value) for value, name in meta["labels"].items()},  # MSD -> v2
        "numTraining": len(entries),
        "file_ending": ".nii.gz",
        "synthetic": True,
        "seed": seed,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", type=int, help="only the first N cases of dataset.json")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    print(build(args.out, cases=args.cases, seed=args.seed))


if __name__ == "__main__":
    main()
