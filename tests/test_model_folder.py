"""The model-folder contract (medseg.model_folder): safetensors weights written and read
bit for bit, legacy pickle checkpoints converted once and kept, one-line errors, and a crafted
pickle that is refused everywhere a model folder is read, without running."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import api
from medseg.cli.main import main
from medseg.ensembling.members import load_fold_models
from medseg.errors import MedsegError
from medseg.inference import Predictor
from medseg.io import Image, write_image
from medseg.model_folder import (
    ModelFolder,
    build_network,
    has_weights,
    read_state_dict_file,
    read_weights,
    weights_path,
    write_weights,
)
from medseg.planning.plan import ChannelNormalization, NetworkPlan, Plan, read_plan
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training.finetune import check_teacher, load_matching_weights

PLAN = Plan(
    dataset_name="tiny",
    ndim=3,
    configuration="3d",
    channel_names=("MRI",),
    labels=((0, "background"), (1, "a"), (2, "b")),
    target_spacing=(1.0, 1.0, 1.0),
    normalization=(ChannelNormalization("zscore"),),
    patch_size=(16, 16, 16),
    batch_size=2,
    network=NetworkPlan(
        name="unet",
        features=(4, 8),
        strides=((1, 1, 1), (2, 2, 2)),
        kernel_sizes=((3, 3, 3), (3, 3, 3)),
        deep_supervision=False,
    ),
    median_shape=(20, 20, 20),
    crop_to_nonzero=False,
)


def _net(seed: int = 0, name: str | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(PLAN, name=name, deep_supervision=False)


def _folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(PLAN, root / "plan.json")
    return root


def _legacy_model_dir(root: Path, *, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A model folder as the previous version wrote it: fold_0/checkpoint_best.pt, a pickle."""
    model_dir = _folder(root)
    fold = model_dir / "fold_0"
    fold.mkdir()
    state = _net(seed).state_dict()
    write_json_atomic({"model": None, "fold": 0}, fold / "train_config.json")
    torch.save(
        {"model": state, "epoch": 7, "val_dice": 0.625, "plan": to_jsonable(PLAN)},
        fold / "checkpoint_best.pt",
    )
    return model_dir, state


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_model_dir(root: Path, marker: Path, *, raw_pickle: bool = False) -> Path:
    """A model folder whose fold_0/checkpoint_best.pt runs a payload when unpickled."""
    model_dir = _folder(root)
    fold = model_dir / "fold_0"
    fold.mkdir()
    state = {"model": _net().state_dict(), "epoch": 0, "extra": Payload(marker)}
    if raw_pickle:  # not torch's zip format: a bare pickle stream
        (fold / "checkpoint_best.pt").write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, fold / "checkpoint_best.pt")
    return model_dir


# --------------------------------------------------------------------------- writing and reading


def test_weights_round_trip_is_bit_identical_with_metadata(tmp_path):
    base = torch.randn(6, 4)
    tied = torch.nn.Parameter(torch.randn(3, 3))
    state = {
        "float": torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d),
        "half": torch.randn(5, dtype=torch.float16),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "count": torch.tensor(12, dtype=torch.int64),
        "view": base[:, 1:3],  # shares memory with "base", not contiguous
        "base": base,
        "tied_a": tied,  # the same tensor under two names (tied weights)
        "tied_b": tied,
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }
    write_weights(tmp_path / "fold_0", "best", state, metadata={"network": "x", "val_dice": 0.5})
    tensors, metadata = read_weights(tmp_path / "fold_0")
    assert set(tensors) == set(state)
    for name, value in state.items():
        got = tensors[name]
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.is_contiguous()
        bits = value.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(got.reshape(-1).view(torch.uint8), bits), name  # bit for bit
    assert metadata == {"format_version": 1, "network": "x", "val_dice": 0.5}
    assert sorted(p.name for p in (tmp_path / "fold_0").iterdir()) == [
        "weights_best.json",
        "weights_best.safetensors",
    ]
    assert has_weights(tmp_path / "fold_0") and not has_weights(tmp_path / "fold_0", "last")


def test_write_weights_refuses_non_tensors_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="'step'"):
        write_weights(tmp_path, "best", {"w": torch.ones(2), "step": 3}, metadata={})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="weights kind"):
        write_weights(tmp_path, "final", {"w": torch.ones(2)}, metadata={})


def test_model_folder_loads_what_was_written(tmp_path):
    model_dir = _folder(tmp_path / "model")
    nets = {0: _net(0), 2: _net(2, "mobile_unet")}
    for fold, net in nets.items():
        write_weights(
            model_dir / f"fold_{fold}",
            "best",
            net.state_dict(),
            metadata={"network": "unet" if fold == 0 else "mobile_unet"},
        )
    folder = ModelFolder.open(tmp_path)  # a work folder holding model/
    assert folder.path == model_dir and folder.folds() == [0, 2] and folder.folds("last") == []
    assert folder.labels == {0: "background", 1: "a", 2: "b"}
    assert [folder.network_name(f) for f in (0, 2)] == ["unet", "mobile_unet"]
    loaded = folder.load_networks(device="cpu", fuse_batchnorm=False)
    for net, original in zip(loaded, nets.values()):
        assert not net.training
        expected = original.state_dict()
        for name, value in net.state_dict().items():
            assert torch.equal(value, expected[name])
    assert len(folder.load_networks([2])) == 1  # BatchNorm fused: still loads and runs
    with pytest.raises(MedsegError, match=r"no best weights for fold\(s\) \[1\]"):
        folder.select_folds([0, 1])


def test_network_name_comes_from_metadata_then_training_record_then_plan(tmp_path):
    model_dir = _folder(tmp_path)
    fold = model_dir / "fold_0"
    write_weights(fold, "best", _net().state_dict(), metadata={})
    folder = ModelFolder.open(model_dir)
    assert folder.network_name(0) == "unet"  # the plan's
    write_json_atomic({"model": "mobile_unet", "fold": 0}, fold / "train_config.json")
    assert folder.network_name(0) == "mobile_unet"  # the record, read as plain JSON
    assert folder.training_record(0) == {"model": "mobile_unet", "fold": 0}
    write_weights(fold, "best", _net().state_dict(), metadata={"network": "fcn"})
    assert folder.network_name(0) == "fcn"  # what was saved with the weights


# --------------------------------------------------------------------------- one-line errors


def test_folders_without_plan_or_weights_give_one_line_errors(tmp_path):
    with pytest.raises(MedsegError) as no_plan:
        ModelFolder.open(tmp_path / "nothing")
    assert "no plan.json" in str(no_plan.value) and str(tmp_path / "nothing") in str(no_plan.value)
    untrained = _folder(tmp_path / "untrained")
    (untrained / "fold_0").mkdir()
    (untrained / "fold_0" / "train_config.json").write_text("{}")
    for call in (
        lambda: ModelFolder.open(untrained),
        lambda: Predictor(untrained, device="cpu"),
        lambda: load_fold_models(untrained),
        lambda: api.export(untrained, fmt="torchscript"),
        lambda: api.prune(untrained, tmp_path / "pruned"),
    ):
        with pytest.raises(MedsegError) as error:
            call()
        message = str(error.value)
        assert "no trained fold" in message and str(untrained) in message, message
        assert "\n" not in message
    with pytest.raises(MedsegError, match="no best weights"):
        read_weights(untrained / "fold_0")


# --------------------------------------------------------------------------- legacy folders


def test_legacy_folder_is_converted_once_and_the_pickle_is_kept(tmp_path, capsys):
    model_dir, state = _legacy_model_dir(tmp_path / "old")
    legacy = model_dir / "fold_0" / "checkpoint_best.pt"
    before = legacy.read_bytes()
    folder = ModelFolder.open(model_dir)
    assert folder.folds() == [0]
    (net,) = folder.load_networks(fuse_batchnorm=False)
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[name])
    err = capsys.readouterr().err.strip().splitlines()
    new = weights_path(model_dir / "fold_0")
    assert err == [f"medseg: converted {legacy} to {new} (safetensors); the .pt file is kept"]
    assert legacy.read_bytes() == before  # user data is never removed or changed
    tensors, metadata = read_weights(model_dir / "fold_0")
    assert metadata == {
        "format_version": 1,
        "converted_from": "checkpoint_best.pt",
        "epoch": 7,
        "val_dice": 0.625,
    }
    assert all(torch.equal(tensors[k], v) for k, v in state.items())
    Predictor(model_dir, device="cpu")
    assert capsys.readouterr().err == ""  # converted once


def test_legacy_last_checkpoint_gives_its_model_entry(tmp_path, capsys):
    model_dir, _ = _legacy_model_dir(tmp_path / "old")
    net = _net(5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.zeros(1, 1, 16, 16, 16)).sum().backward()
    optimizer.step()
    torch.save(  # the previous trainer's resumable state
        {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": None,
            "epoch": 3,
            "iteration": 30,
            "elapsed": 12.5,
            "best_dice": 0.5,
            "best_epoch": 1,
            "best_per_class": {"a": 0.5, "b": float("nan")},
            "log": [{"epoch": 0, "train_loss": 1.0}],
            "sampler_rng": np.random.default_rng(0).bit_generator.state,
            "augment_rng": torch.Generator().get_state(),
            "torch_rng": torch.get_rng_state(),
            "plan": to_jsonable(PLAN),
        },
        model_dir / "fold_0" / "checkpoint_last.pt",
    )
    (loaded,) = ModelFolder.open(model_dir).load_networks(kind="last", fuse_batchnorm=False)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, net.state_dict()[name])
    assert "checkpoint_last.pt to" in capsys.readouterr().err
    assert (model_dir / "fold_0" / "checkpoint_last.pt").exists()


def test_legacy_folder_in_a_read_only_place_still_loads(tmp_path, capsys, monkeypatch):
    model_dir, state = _legacy_model_dir(tmp_path / "old")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("medseg.model_folder.write_weights", refuse)
    tensors, _ = read_weights(model_dir / "fold_0")
    assert all(torch.equal(tensors[k], v) for k, v in state.items())
    assert "could not convert it" in capsys.readouterr().err
    assert not weights_path(model_dir / "fold_0").exists()


# --------------------------------------------------------------------------- crafted pickles


def test_the_payload_is_real(tmp_path):
    """The crafted checkpoint does run code when unpickled by a plain unpickler (so the
    tests below, which show that it does not run, can fail)."""
    marker = tmp_path / "ran"
    model_dir = _crafted_model_dir(tmp_path / "evil", marker, raw_pickle=True)
    pickle.loads((model_dir / "fold_0" / "checkpoint_best.pt").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["torch-zip", "bare-pickle"])
def test_crafted_pickle_is_refused_everywhere_and_never_runs(tmp_path, raw_pickle):
    marker = tmp_path / "ran"
    model_dir = _crafted_model_dir(tmp_path / "evil", marker, raw_pickle=raw_pickle)
    checkpoint = model_dir / "fold_0" / "checkpoint_best.pt"
    if not raw_pickle:  # the payload's call is in the pickle inside torch's zip
        with zipfile.ZipFile(checkpoint) as archive:
            (pkl,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
            assert b"open" in archive.read(pkl)
    inputs = tmp_path / "in"
    write_image(Image(np.zeros((16, 16, 16), np.float32), (1.0, 1.0, 1.0)), inputs / "c.nii.gz")
    student = _net(1)
    calls = {
        "read_weights": lambda: read_weights(model_dir / "fold_0"),
        "ModelFolder.load_networks": lambda: ModelFolder.open(model_dir).load_networks(),
        "Predictor": lambda: Predictor(model_dir, device="cpu"),
        "api.predict": lambda: api.predict(model_dir, inputs, tmp_path / "out", device="cpu"),
        "ensembling": lambda: load_fold_models(model_dir),
        "init-from folder": lambda: load_matching_weights(student, model_dir),
        "init-from file": lambda: load_matching_weights(student, checkpoint),
        "state dict file": lambda: read_state_dict_file(checkpoint),
        "export": lambda: api.export(model_dir, fmt="torchscript"),
        "prune": lambda: api.prune(model_dir, tmp_path / "pruned"),
    }
    for name, call in calls.items():
        with pytest.raises(MedsegError) as error:
            call()
        message = str(error.value)
        assert "refused" in message and str(checkpoint) in message, (name, message)
        assert "\n" not in message
        assert not marker.exists(), f"{name} ran the payload"
    assert main(["--quiet", "predict", str(model_dir), str(inputs), "-o", str(tmp_path / "o")]) == 2
    assert not marker.exists()
    assert check_teacher(model_dir, PLAN) == PLAN  # the plan alone is JSON: no pickle
    assert not weights_path(model_dir / "fold_0").exists()  # nothing converted
    assert checkpoint.exists()


# --------------------------------------------------------------------------- init-from files


def test_init_from_takes_a_plain_state_dict_file(tmp_path):
    source = _net(3)
    encoder = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    torch.save(encoder, tmp_path / "encoder.pt")
    write_weights(tmp_path / "w", "best", source.state_dict(), metadata={})
    for path in (tmp_path / "encoder.pt", tmp_path / "w" / "weights_best.safetensors"):
        student = _net(4)
        transfer = load_matching_weights(student, path)
        assert set(encoder) <= set(transfer["loaded"])
        assert torch.equal(
            student.state_dict()["encoder.0.0.0.weight"], encoder["encoder.0.0.0.weight"]
        )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedsegError, match="unreadable checkpoint"):
        read_state_dict_file(tmp_path / "junk.pt")


def test_pruned_and_trained_folders_write_safetensors_only(tmp_path):
    model_dir = _folder(tmp_path / "model")
    write_weights(model_dir / "fold_0", "best", _net().state_dict(), metadata={"network": "unet"})
    api.prune(model_dir, tmp_path / "half", keep=0.5)
    fold = tmp_path / "half" / "fold_0"
    assert sorted(p.name for p in fold.iterdir()) == [
        "weights_best.json",
        "weights_best.safetensors",
    ]
    assert json.loads((fold / "weights_best.json").read_text())["pruned_keep"] == 0.5
    assert read_plan(tmp_path / "half").network.features == (2, 4)
