"""Classical methods: golden values from scikit-image and SimpleITK, ground truth by construction."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.classical import blob, dice

from medseg.classical import (
    run_method,
)
from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.io import Image, read_image, write_image


def test_run_method_rejects_unknown_options():
    with pytest.raises(MedsegError, match="unexpected keyword"):
        run_method(Image(np.ones((4, 4)), (1.0, 1.0)), "otsu", bogus=1)
    with pytest.raises(MedsegError, match="unknown method"):
        run_method(Image(np.ones((4, 4)), (1.0, 1.0)), "magic")


def test_cli_classical_on_a_folder_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for i in range(2):
        image, _ = blob((40, 36), (0.5, 0.5), 6.0, rng)
        write_image(
            image.with_array(np.clip(image.array, 0, 255).astype(np.uint8)),
            tmp_path / "in" / f"c{i}.png",
        )
    image3, truth3 = blob((20, 20, 10), (1.0, 1.0, 2.0), 6.0, rng)
    write_image(image3, tmp_path / "v.nii.gz")
    assert main(["classical", "otsu", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c0.png", "c1.png"]
    out = tmp_path / "rg.nii.gz"
    args = ["classical", "region_growing", str(tmp_path / "v.nii.gz"), "-o", str(out)]
    assert main([*args, "--seed", "10,10,5", "-p", "tolerance=40"]) == 0
    result = read_image(out)
    assert result.same_geometry(image3) and dice(result.array, truth3) > 0.9
    assert main([*args, "--seed", "10,10,5", "-p", "tolerance=40"]) == 2  # exists
    assert main([*args, "--seed", "10,10,50", "-p", "tolerance=40", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "outside the image" in err and "v.nii.gz" in err
    assert (
        main(
            [
                "classical",
                "fcm",
                str(tmp_path / "v.nii.gz"),
                "-o",
                str(tmp_path / "f.nii.gz"),
                "-p",
                "m=0.5",
            ]
        )
        == 2
    )
