"""Registration: classical recovery by construction, fields, quality, labels, transforms, atlases, learned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers.registration import blobs, moved

from medseg.errors import MedsegError
from medseg.io import Image, read_image
from medseg.registration.classical import (
    register_linear,
)
from medseg.registration.fields import (
    transform_to_field,
    warp_image,
)
from medseg.registration.learned import (
    RegistrationTrainConfig,
    VelocityUNet,
    build_registration_network,
    load_registration_model,
    register_learned,
    train_registration,
)
from medseg.registration.quality import (
    deformation_quality,
)
from medseg.serialization import to_jsonable, write_json_atomic


def test_network_starts_near_identity_and_checks_sizes():
    net = VelocityUNet(ndim=2, features=(8, 16, 16), decoder=(16, 16))
    x = torch.rand(1, 1, 32, 24)
    disp, v = net(x, x)
    assert disp.shape == (1, 2, 32, 24) and v.shape == (1, 2, 16, 12)
    assert disp.abs().max() < 1e-2
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.rand(1, 1, 30, 24), torch.rand(1, 1, 30, 24))


def test_train_resume_and_register_learned(phantom_dataset, tmp_path):
    config = RegistrationTrainConfig(
        features=(4, 8, 8),
        decoder=(8, 8),
        canvas_shape=(24, 24, 24),
        iterations_per_epoch=2,
        max_epochs=1,
        validation_pairs=1,
        num_threads=1,
    )
    out = tmp_path / "model"
    result = train_registration(phantom_dataset, out, config=config, show_progress=False)
    assert result.epochs == 1 and result.iterations == 2
    assert (out / "log.csv").exists() and (out / "weights_best.safetensors").exists()
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)  # the engine's state
    assert state["epoch"] == 1 and "rng" in state["task"]
    from dataclasses import replace

    again = train_registration(
        phantom_dataset, out, config=replace(config, max_epochs=2), show_progress=False
    )
    assert again.iterations == 4  # resumed from checkpoint_last.pt, one more epoch
    model = load_registration_model(out)
    assert load_registration_model(out / "weights_last.safetensors").ndim == 3
    spec = json.loads((out / "registration_model.json").read_text())
    images = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))
    f, m = read_image(images[0]), read_image(images[1])
    forward, inverse = register_learned(f, m, model, return_inverse=True)
    warped = warp_image(m, f, forward)
    assert warped.same_geometry(f) and spec["model"] == "voxelmorph"
    stats, _ = deformation_quality(forward, f, inverse=inverse)
    assert stats["folding_percent"] == 0.0
    assert stats["inverse_consistency_mean_mm"] < 0.5

    from medseg.cli.main import main

    reg_out = tmp_path / "reg"
    args = ["register", str(images[0]), str(images[1]), "-o", str(reg_out), "--method", "learned"]
    assert main(args) == 2  # no --model
    assert main([*args, "--model", str(out), "--no-report"]) == 0
    bf16 = load_registration_model(out, precision="bf16")
    d32 = transform_to_field(register_learned(f, m, model), f)
    d16 = transform_to_field(register_learned(f, m, bf16), f)
    assert np.abs(d16 - d32).max() < 0.05 + 0.05 * np.abs(d32).max()
    quality = json.loads((reg_out / "quality.json").read_text())
    assert quality["quality"]["folding_percent"] == 0.0
    assert sitk.ReadTransform(str(reg_out / "transform.h5")).GetDimension() == 3
    cli_model = tmp_path / "cli_model"
    train_args = [
        "train-registration",
        str(phantom_dataset),
        "-o",
        str(cli_model),
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "1",
        "--threads",
        "1",
    ]
    assert main(train_args) == 0
    assert json.loads((cli_model / "train_result.json").read_text())["iterations"] == 1


def test_a_registration_model_of_the_earlier_format_is_converted(tmp_path):
    """checkpoint_best.pt (a pickle) of an earlier version: read with weights_only=True,
    converted once to safetensors, same network."""
    config = RegistrationTrainConfig(features=(4, 8, 8), decoder=(8, 8), canvas_shape=(16, 16))
    torch.manual_seed(0)
    net = build_registration_network(config, 2)
    torch.save(
        {
            "model": net.state_dict(),
            "config": to_jsonable(config),
            "ndim": 2,
            "num_classes": 2,
            "epoch": 3,
        },
        tmp_path / "checkpoint_best.pt",
    )
    write_json_atomic(config, tmp_path / "registration_config.json")
    write_json_atomic({"model": "voxelmorph", "ndim": 2}, tmp_path / "registration_model.json")
    loaded = load_registration_model(tmp_path, device="cpu")
    assert (tmp_path / "weights_best.safetensors").exists()
    state = net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.network.state_dict().items())
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():  # (channels-last after loading: equal up to rounding)
        assert torch.allclose(loaded.network(x, x)[0], net.eval()(x, x)[0], atol=1e-6)
    with pytest.raises(MedsegError, match="no trained registration model"):
        load_registration_model(tmp_path / "missing", device="cpu")


def test_random_sampling_is_reproducible_with_the_same_seed():
    fixed = Image(blobs((24, 24, 20), seed=8), (1.0, 1.0, 1.0))
    moving = moved(fixed, sitk.TranslationTransform(3, (1.0, -1.5, 0.5)))
    runs = [
        register_linear(
            fixed, moving, method="affine", metric="mattes", sampling_fraction=0.2, seed=0
        )
        for _ in range(2)
    ]
    # same sample; only multi-threaded summation order may differ
    np.testing.assert_allclose(
        runs[0].transform.GetParameters(), runs[1].transform.GetParameters(), atol=1e-6
    )
