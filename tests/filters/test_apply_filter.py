"""Image filters: physical sizes, noise reduction, N4 on a known bias field, CLAHE, matching, windows."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.filters import step_image

from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.filters import (
    anisotropic_diffusion,
    apply_filters,
    gaussian,
)
from medseg.io import Image, read_image, write_image


def test_filter_parameters_are_checked():
    image = Image(np.ones((10, 10), np.float32), (1.0, 1.0))
    with pytest.raises(MedsegError, match="sigma_mm"):
        gaussian(image, sigma_mm=0)
    with pytest.raises(MedsegError, match="time_step"):
        anisotropic_diffusion(image, time_step=1.0)
    with pytest.raises(MedsegError, match="empty"):
        gaussian(np.zeros((0, 4)))
    with pytest.raises(MedsegError, match="unknown filter"):
        apply_filters(image, ["sharpen"])
    with pytest.raises(MedsegError, match="unexpected keyword"):
        apply_filters(image, [{"name": "gaussian", "radius": 2}])


def test_cli_filter_file_and_folder(tmp_path, capsys):
    rng = np.random.default_rng(7)
    _, image = step_image((30, 20), (0.5, 0.5), rng)
    for name in ("a", "b"):
        write_image(
            image.with_array(np.clip(image.array, 0, 255).astype(np.uint8)),
            tmp_path / "in" / f"{name}.png",
        )
    assert (
        main(
            [
                "filter",
                "median",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "out"),
                "--cast",
                "uint8",
            ]
        )
        == 0
    )
    out = read_image(tmp_path / "out" / "a.png")
    assert out.array.dtype == np.uint8 and out.spacing == (0.5, 0.5)
    # Without a cast, float results from PNG inputs go to NIfTI in a folder.
    assert (
        main(
            [
                "filter",
                "gaussian",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "f"),
                "-p",
                "sigma_mm=1",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    ref = tmp_path / "in" / "b.png"
    target = tmp_path / "m.nii.gz"
    assert (
        main(
            [
                "filter",
                "histogram_match",
                str(tmp_path / "in" / "a.png"),
                "-o",
                str(target),
                "--reference",
                str(ref),
            ]
        )
        == 0
    )
    assert (
        main(["filter", "window", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "w.nii.gz")])
        == 2
    )
    assert "preset, or both level and width" in capsys.readouterr().err
