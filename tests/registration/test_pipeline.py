"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from helpers.registration import blobs, moved

from medseg.io import Image, read_image, write_image


def test_cli_register_and_atlas_segment(tmp_path, phantom_dataset):
    from medseg.cli.main import main

    fixed = Image(blobs((48, 40), seed=7), (1.0, 1.0))
    moving = moved(fixed, sitk.Euler2DTransform((23.5, 19.5), 0.1, (2.0, -1.0)))
    fl = fixed.with_array((fixed.array > 60).astype(np.uint8))
    ml = moving.with_array((moving.array > 60).astype(np.uint8))
    paths = {}
    for name, img in (("f", fixed), ("m", moving), ("fl", fl), ("ml", ml)):
        paths[name] = write_image(img, tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    args = [
        "register",
        str(paths["f"]),
        str(paths["m"]),
        "-o",
        str(out),
        "--method",
        "rigid",
        "--metric",
        "mse",
        "--labels",
        str(paths["ml"]),
        "--fixed-labels",
        str(paths["fl"]),
    ]
    assert main(args) == 0
    quality = json.loads((out / "quality.json").read_text())
    assert quality["dice_mean"] > 0.95
    for name in (
        "transform.tfm",
        "warped.nii.gz",
        "warped_labels.nii.gz",
        "report.html",
        "checkerboard.png",
    ):
        assert (out / name).exists(), name
    assert read_image(out / "warped_labels.nii.gz").array.dtype == np.uint8
    assert main(args) == 2  # refuses to overwrite
    assert main([*args, "--overwrite", "--method", "demons"]) == 0
    assert (out / "jacobian.nii.gz").exists() and (out / "transform.h5").exists()
    other = write_image(Image(blobs((16, 16, 16)), (1.0, 1.0, 1.0)), tmp_path / "v.nii.gz")
    assert main(["register", str(paths["f"]), str(other), "-o", str(tmp_path / "bad")]) == 2
    empty = write_image(
        fixed.with_array(np.zeros(fixed.shape, np.uint8)), tmp_path / "empty.nii.gz"
    )
    assert (
        main(
            [
                "register",
                str(paths["f"]),
                str(paths["m"]),
                "-o",
                str(tmp_path / "e"),
                "--fixed-mask",
                str(empty),
            ]
        )
        == 2
    )
    target = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))[0]
    seg = tmp_path / "seg.nii.gz"
    assert (
        main(
            [
                "atlas-segment",
                str(target),
                "--atlases",
                str(phantom_dataset),
                "-o",
                str(seg),
                "--method",
                "affine",
                "--max-atlases",
                "3",
            ]
        )
        == 0
    )
    ref = read_image(phantom_dataset / "labelsTr" / target.name.replace("_0000", "")).array
    pred = read_image(seg).array
    assert pred.shape == ref.shape
    assert 2 * np.sum((pred > 0) & (ref > 0)) / (np.sum(pred > 0) + np.sum(ref > 0)) > 0.5
