"""Pretraining on the engine: the loss falls, the result fine-tunes with --init-from
(encoder bit-exact, decoder new), a mismatched folder is refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from zoo_helpers import tiny_plan

from medseg import api
from medseg.cli.main import main
from medseg.errors import MedsegError
from medseg.io import Image, write_image
from medseg.model_folder import build_network, read_weights
from medseg.pretraining import PretrainConfig, pretrain
from medseg.serialization import write_json_atomic
from medseg.training.finetune import load_matching_weights

QUICK = PretrainConfig(
    iterations_per_epoch=4, max_epochs=2, device="cpu", num_threads=1, learning_rate=3e-3
)


def _volumes(folder, n=3, shape=(20, 20, 16)):
    """Smooth blobs: structure a network can learn to fill in."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for i in range(n):
        centre = (
            rng.uniform(0.3, 0.7, 3)[:, None, None, None] * np.array(shape)[:, None, None, None]
        )
        r = np.sqrt(((grid - centre) ** 2).sum(0))
        image = 100 + 200 * np.exp(-((r / 5.0) ** 2)) + rng.normal(0, 5, shape)
        write_image(Image(image.astype(np.float32), (1.0, 1.0, 1.0)), folder / f"v{i}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def pretrained(disk_dataset, tmp_path_factory):
    """A tiny 2D fine-tuning plan and an MAE-pretrained folder made with it."""
    root = tmp_path_factory.mktemp("pre")
    plan = tiny_plan(api.plan(disk_dataset, root / "base", show_progress=False))
    write_json_atomic(plan, root / "ft" / "plan.json")
    result = api.pretrain(
        disk_dataset / "images", root / "pre", config=QUICK, plan=root / "ft", show_progress=False
    )
    return root, plan, result


def test_reconstruction_loss_falls_on_a_tiny_volume(tmp_path):
    images = _volumes(tmp_path / "images")
    for method in ("mae", "genesis"):
        config = replace(QUICK, method=method, max_epochs=4, iterations_per_epoch=6, batch_size=2)
        result = pretrain(images, tmp_path / method, config=config, show_progress=False)
        rows = (tmp_path / method / "model" / "fold_0" / "log.csv").read_text().splitlines()
        header = rows[0].split(",")
        losses = [float(r.split(",")[header.index("val_loss")]) for r in rows[1:]]
        assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], (method, losses)
        assert result.best_loss == pytest.approx(min(losses))
    assert (tmp_path / "mae" / "model" / "pretraining_examples.png").stat().st_size > 1000
    # resume: more epochs continue from the checkpoint, not from scratch
    longer = replace(QUICK, method="genesis", max_epochs=5, iterations_per_epoch=6, batch_size=2)
    again = pretrain(images, tmp_path / "genesis", config=longer, show_progress=False)
    assert again.epochs == 5 and again.iterations == 30


def test_init_from_loads_the_encoder_bit_exactly_and_the_decoder_is_new(
    pretrained, disk_dataset, tmp_path
):
    root, plan, result = pretrained
    source, meta = read_weights(root / "pre" / "model" / "fold_0")
    assert meta["pretraining"] == "mae"
    model = build_network(plan)
    transfer = load_matching_weights(model, root / "pre")
    own = model.state_dict()
    encoder = [k for k in own if k.startswith("encoder.")]
    assert encoder and sorted(encoder) == [k for k in transfer["loaded"]]
    for k in encoder:
        assert torch.equal(own[k], source[k]), k
    assert transfer["new"] and all(
        k.startswith(("decoder.", "upsample.", "heads.")) for k in transfer["new"]
    )
    assert transfer["unused"] and all(k.startswith("pretrain_head.") for k in transfer["unused"])
    assert "loaded" in transfer["summary"] and "\n" not in transfer["summary"]

    # End to end through the CLI: a labelled subset, fine-tuned from the pretrained folder.
    work = tmp_path / "ft"
    write_json_atomic(plan, work / "plan.json")
    argv = ["--quiet", "--device", "cpu", "train", str(disk_dataset), "-w", str(work)]
    argv += ["--epochs", "1", "--iterations-per-epoch", "2", "--batch-size", "2", "--seed", "3"]
    argv += ["--init-from", str(root / "pre"), "--freeze-epochs", "1", "--labelled-cases", "3"]
    assert main(argv) == 0
    fold = work / "model" / "fold_0"
    record = json.loads((fold / "init_from.json").read_text())
    assert record["loaded"] == transfer["loaded"] and record["unused"] == transfer["unused"]
    subset = json.loads((fold / "labelled_subset.json").read_text())
    splits = json.loads((work / "model" / "splits.json").read_text())
    assert len(subset["train"]) == 3 and set(subset["train"]) <= set(splits[0]["train"])
    trained, _ = read_weights(fold, "last")  # frozen for the one epoch: still the source's
    assert all(torch.equal(trained[k], source[k]) for k in encoder)


def test_a_mismatched_folder_is_refused_in_one_line(pretrained, disk_dataset, tmp_path):
    root, plan, _ = pretrained
    wider = replace(plan, network=replace(plan.network, features=(6, 12)))
    with pytest.raises(MedsegError) as error:
        load_matching_weights(build_network(wider), root / "pre")
    message = str(error.value)
    assert "\n" not in message
    assert "encoder.0.0.0.weight" in message
    assert "(4, 1, 3, 3)" in message and "(6, 1, 3, 3)" in message
    work = tmp_path / "w"
    write_json_atomic(wider, work / "plan.json")
    argv = ["--quiet", "--device", "cpu", "train", str(disk_dataset), "-w", str(work)]
    assert main([*argv, "--epochs", "1", "--init-from", str(root / "pre")]) == 2


def test_contrastive_pretraining_runs_and_its_head_is_unused(pretrained, disk_dataset, tmp_path):
    root, plan, _ = pretrained
    config = replace(QUICK, method="contrastive", max_epochs=1)
    result = api.pretrain(
        disk_dataset, tmp_path / "c", config=config, plan=root / "ft", show_progress=False
    )
    assert result.examples_png is None and np.isfinite(result.best_loss)
    transfer = load_matching_weights(build_network(plan), tmp_path / "c")
    assert all(k.startswith("pretrain_head.mlp") for k in transfer["unused"])


def test_cli_pretrain_and_its_one_line_errors(pretrained, disk_dataset, tmp_path, capsys):
    root, _, _ = pretrained
    argv = ["--quiet", "--device", "cpu", "pretrain"]
    ok = main(
        [
            *argv,
            str(disk_dataset),
            "-w",
            str(tmp_path / "p"),
            "--plan",
            str(root / "ft"),
            "--epochs",
            "1",
            "--iterations-per-epoch",
            "2",
            "--method",
            "genesis",
        ]
    )
    assert ok == 0
    assert (tmp_path / "p" / "model" / "fold_0" / "weights_best.safetensors").is_file()
    capsys.readouterr()
    again = [*argv, str(disk_dataset), "-w", str(tmp_path / "p"), "--epochs", "2"]
    assert main(again) == 2  # the checkpoint is genesis's: no silent mix-up
    assert "pretrained with --method genesis" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"not an image")
    flat = tmp_path / "flat"
    write_image(Image(np.ones((20, 20), np.float32), (1.0, 1.0)), flat / "slice.nii.gz")
    volume_plan = tmp_path / "vplan"
    _volumes(tmp_path / "vols", n=2)
    api.pretrain(
        tmp_path / "vols", volume_plan, config=replace(QUICK, max_epochs=1), show_progress=False
    )
    capsys.readouterr()
    for folder, plan, words in (
        (tmp_path / "empty", None, "no images"),
        (tmp_path / "missing", None, "not found"),
        (bad, None, "broken.nii.gz: cannot read image"),
        (flat, volume_plan, "slice.nii.gz: a 2D image, but the plan is 3D"),
    ):
        extra = ["--plan", str(plan)] if plan else []
        code = main([*argv, str(folder), "-w", str(tmp_path / "x"), "--epochs", "1", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and len(err.splitlines()) == 1, (folder, err)
