"""Structured pruning: exact by construction (keep=1, and channels that are zero by
construction), a loadable model folder, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from zoo_helpers import fake_model_dir, tiny_plan

from medseg import api
from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.export.prune import prune_unet
from medseg.inference.predictor import Predictor
from medseg.model_folder import build_network
from medseg.models import create_model
from medseg.planning.plan import read_plan
from medseg.training.finetune import load_matching_weights


def _unet(ndim: int, norm: str = "instance", features=(6, 10, 16)):
    torch.manual_seed(0)
    model = create_model(
        "unet", ndim=ndim, in_channels=2, num_classes=3, features=features, norm=norm
    )
    return model.eval()


def _zero_channels(model, keep: float, rng: np.random.Generator) -> None:
    """Zero (filters, bias, norm affine) all but ``keep`` of every prunable output channel:
    such a channel is 0 after norm and activation, so the network does not depend on it."""

    def silence(conv, norm, transposed=False):
        width = conv.weight.shape[1 if transposed else 0]
        drop = rng.choice(width, width - max(1, round(width * keep)), replace=False)
        drop = torch.as_tensor(drop)
        if transposed:
            conv.weight[:, drop] = 0
        else:
            conv.weight[drop] = 0
            conv.bias[drop] = 0
            norm.weight[drop] = 0
            norm.bias[drop] = 0

    with torch.no_grad():
        for block in [*model.encoder, *model.decoder]:
            for layer in block:
                silence(layer[0], layer[1])
        for up in model.upsample:
            silence(up, None, transposed=True)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_keep_all_is_the_same_network(ndim, norm):
    model = _unet(ndim, norm)
    x = torch.randn(2, 2, *([16] * ndim))
    pruned = prune_unet(model, 1.0).eval()
    assert torch.allclose(model(x), pruned(x), atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_pruning_channels_that_are_zero_changes_nothing(ndim):
    model = _unet(ndim)
    _zero_channels(model, 0.5, np.random.default_rng(ndim))
    x = torch.randn(2, 2, *([16] * ndim))
    pruned = prune_unet(model, 0.5).eval()
    assert [b[1][0].out_channels for b in pruned.encoder] == [3, 5, 8]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned) < 0.4 * count(model)
    assert torch.allclose(model(x), pruned(x), atol=1e-5)


def test_pruning_keeps_the_strongest_filters_not_the_first():
    model = _unet(2)
    with torch.no_grad():  # make the last inner channel of stage 0 the only strong one
        model.encoder[0][0][0].weight[-1] *= 100
    pruned = prune_unet(model, 1 / 6)  # 6 -> 1 channel
    kept = pruned.encoder[0][0][0].weight[0]
    assert torch.equal(kept, model.encoder[0][0][0].weight[-1])


def test_prune_refuses_other_architectures_and_bad_ratios():
    resunet = create_model("resunet", ndim=2, in_channels=1, num_classes=2, features=(4, 8))
    with pytest.raises(MedsegError, match="plain U-Net"):
        prune_unet(resunet, 0.5)
    with pytest.raises(MedsegError, match="keep"):
        prune_unet(_unet(2), 0.0)


def test_pruned_model_folder_predicts_and_fine_tunes(disk_dataset, tmp_path):
    plan = tiny_plan(api.plan(disk_dataset, tmp_path / "base", show_progress=False))
    source = fake_model_dir(tmp_path / "model", plan, folds=(0, 1))
    report = api.prune(source, tmp_path / "same", keep=1.0)
    assert report["features_after"] == list(plan.network.features)
    data = np.random.default_rng(0).normal(size=(1, *plan.patch_size)).astype(np.float32)
    a = Predictor(source, device="cpu", precision="fp32").logits(data)
    b = Predictor(tmp_path / "same", device="cpu", precision="fp32").logits(data)
    assert torch.allclose(a, b, atol=1e-5)

    report = api.prune(source, tmp_path / "half", keep=0.5)
    assert report["features_after"] == [2, 4] and report["folds"] == [0, 1]
    assert report["parameters_after"] < report["parameters_before"]
    written = json.loads((tmp_path / "half" / "plan.json").read_text())
    assert written["network"]["features"] == [2, 4]
    assert Predictor(tmp_path / "half", device="cpu").logits(data).shape == a.shape
    with pytest.raises(MedsegError, match="overwrite"):
        api.prune(source, tmp_path / "half", keep=0.5)
    # Fine-tuning from the pruned folder loads every layer (same shapes).
    student = build_network(read_plan(tmp_path / "half"))
    transfer = load_matching_weights(student, tmp_path / "half")
    assert transfer["loaded"] and not transfer["skipped"]


def test_cli_prune_errors_in_one_line(disk_dataset, tmp_path, capsys):
    plan = tiny_plan(api.plan(disk_dataset, tmp_path / "base", show_progress=False))
    source = fake_model_dir(tmp_path / "attention", plan, model="attention_unet")
    code = main(["prune", str(source), "-o", str(tmp_path / "out"), "--keep", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "plain U-Net" in err[0]
    assert not (tmp_path / "out").exists()
    good = fake_model_dir(tmp_path / "unet", plan)
    assert main(["prune", str(good), "-o", str(tmp_path / "out"), "--keep", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["features_after"] == [2, 4]
