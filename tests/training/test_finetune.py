"""Knowledge distillation (KL to the teacher decreases), fine-tuning with --init-from,
class-imbalance options, and early errors for bad configurations."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers.distillation import FAST
from zoo_helpers import fake_model_dir

from medseg import api
from medseg.errors import MedsegError
from medseg.model_folder import build_network, read_weights
from medseg.serialization import write_json_atomic


def test_unknown_architecture_fails_before_training(setup, tmp_path):
    root, plan, teacher, dataset = setup
    with pytest.raises(MedsegError, match="unknown architecture 'nope'"):
        api.distill(
            dataset,
            tmp_path / "w",
            teachers=[teacher],
            student="nope",
            config=FAST,
            show_progress=False,
        )
    work = tmp_path / "w2"
    write_json_atomic(plan, work / "plan.json")
    for bad, message in (
        (replace(FAST, model="nope"), "unknown architecture"),
        (replace(FAST, class_sampling="often"), "unknown class sampling"),
        (replace(FAST, optimizer="lion"), "unknown optimizer 'lion'"),
        (replace(FAST, class_weighting="magic"), "unknown class weighting"),
        (replace(FAST, init_from=str(tmp_path / "missing")), "no medseg checkpoint"),
    ):
        with pytest.raises(MedsegError, match=message):
            api.train(dataset, work, config=bad, show_progress=False)
        assert not (work / "model" / "fold_0" / "log.csv").exists()


def test_fine_tuning_loads_matching_layers_and_freezes_then_unfreezes(setup, tmp_path):
    root, plan, _, dataset = setup
    # A source model trained "on another dataset": three classes, so its heads do not fit.
    other = replace(plan, labels=((0, "background"), (1, "a"), (2, "b")))
    source = fake_model_dir(tmp_path / "source", other, seed=11)
    src, _ = read_weights(source / "fold_0")
    work = tmp_path / "ft"
    write_json_atomic(plan, work / "plan.json")
    config = replace(
        FAST,
        max_epochs=1,
        init_from=str(source),
        freeze_epochs=1,
        class_weighting="inverse_sqrt",
        class_sampling="inverse_frequency",
    )
    api.train(dataset, work, config=config, show_progress=False)
    transfer = json.loads((work / "model" / "fold_0" / "init_from.json").read_text())
    assert any(k.startswith("heads.") for k in transfer["skipped"])
    assert "encoder.0.0.0.weight" in transfer["loaded"]
    state, _ = read_weights(work / "model" / "fold_0", "last")
    # Frozen during the first epoch: the transferred encoder is exactly the source's.
    assert torch.equal(state["encoder.0.0.0.weight"], src["encoder.0.0.0.weight"])
    # The new head trained.
    fresh = build_network(plan, deep_supervision=False).state_dict()["heads.0.weight"]
    assert state["heads.0.weight"].shape == fresh.shape
    # One more epoch after the freeze: the encoder moves.
    api.train(dataset, work, config=replace(config, max_epochs=2), show_progress=False)
    state2, _ = read_weights(work / "model" / "fold_0", "last")
    assert not torch.equal(state2["encoder.0.0.0.weight"], src["encoder.0.0.0.weight"])


def test_class_sampling_modes_follow_their_rule():
    from medseg.preprocessing.preprocess import LoadedCase
    from medseg.training.sampling import PatchSampler

    label = np.zeros((40, 40), dtype=np.uint8)
    label[:20] = 1
    label[30:32, 30:32] = 2
    locs = {c: np.argwhere(label == c) for c in (1, 2)}
    case = LoadedCase("c", np.zeros((1, 40, 40), np.float32), label, None, locs)
    freq = [0.5 - 4 / 1600, 0.5, 4 / 1600]
    counts = {}
    for mode in ("rarest_half", "uniform", "inverse_frequency"):
        s = PatchSampler(
            [case],
            patch_size=(8, 8),
            region=(8, 8),
            batch_size=1,
            class_sampling=mode,
            class_frequencies=freq,
            seed=0,
        )
        picks = [s._pick_class([1, 2], locs) for _ in range(2000)]
        counts[mode] = picks.count(2) / 2000
    assert counts["uniform"] == pytest.approx(0.5, abs=0.05)
    assert counts["rarest_half"] == pytest.approx(0.75, abs=0.05)
    assert counts["inverse_frequency"] == pytest.approx(0.5 / (0.5 + 4 / 1600), abs=0.02)


def test_cli_errors_are_exit_code_2(setup, tmp_path):
    from medseg.cli.main import main

    root, plan, teacher, dataset = setup
    other = replace(plan, labels=((0, "background"), (1, "disk"), (2, "rim")))
    bad = fake_model_dir(tmp_path / "bad", other)
    w = str(tmp_path / "w")
    assert (
        main(["--quiet", "distill", str(dataset), "-w", w, "--teacher", str(bad), "--epochs", "1"])
        == 2
    )
    assert (
        main(
            [
                "--quiet",
                "distill",
                str(dataset),
                "-w",
                w,
                "--teacher",
                str(teacher),
                "--student",
                "nope",
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    space = tmp_path / "space.yaml"
    space.write_text("optimizer: {type: categorical, choices: []}\n")
    assert (
        main(
            [
                "--quiet",
                "tune",
                str(dataset),
                "-w",
                w,
                "--space",
                str(space),
                "--trials",
                "1",
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "--quiet",
                "train",
                str(dataset),
                "-w",
                w,
                "--epochs",
                "1",
                "--init-from",
                str(tmp_path / "missing"),
            ]
        )
        == 2
    )
