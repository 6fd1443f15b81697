"""Ensembles: mean / weighted / vote, agreement with hand-computed means, CV selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zoo_helpers import fake_model_dir, tiny_plan

from medseg import api
from medseg.ensembling import (
    combine,
    ensemble_predict_folder,
    load_member,
    majority_vote,
    mean_probabilities,
    select_best,
    tune_weights,
)
from medseg.errors import MedsegError
from medseg.inference import Predictor
from medseg.io import read_image
from medseg.io.dataset import load_dataset, read_case_image
from medseg.preprocessing.preprocess import preprocess_image
from medseg.serialization import write_json_atomic
from medseg.training import make_folds


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_models(disk_dataset, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two differently built models (U-Net, FCN) on the same tiny 2D plan and splits."""
    root = tmp_path_factory.mktemp("ens")
    plan = tiny_plan(api.plan(disk_dataset, root / "work", show_progress=False))
    write_json_atomic(plan, root / "work" / "plan.json")
    spec = load_dataset(disk_dataset)
    write_json_atomic(spec.to_json(), root / "dataset.json")
    splits = make_folds([c.case_id for c in spec.cases], num_folds=2, seed=0)
    kw = dict(folds=(0, 1), splits=splits, dataset_json=root / "dataset.json")
    a = fake_model_dir(root / "a", plan, model="unet", seed=1, **kw)
    b = fake_model_dir(root / "b", plan, model="fcn", seed=2, **kw)
    return a, b, disk_dataset


def test_two_model_ensemble_equals_hand_computed_mean(two_models, tmp_path):
    a, b, dataset = two_models
    spec = load_dataset(dataset)
    case = spec.cases[0]
    channels = read_case_image(spec, case)
    # Reference path: the public Predictor's probabilities of each model, averaged by hand.
    pa, pb = (Predictor(m, folds=[0], device="cpu", precision="fp32") for m in (a, b))
    data, geometry = preprocess_image(channels, pa.plan)
    expected = (pa.probabilities(data) + pb.probabilities(data)) / 2
    if tuple(expected.shape[1:]) != geometry.cropped_shape:
        expected = F.interpolate(expected[None], size=geometry.cropped_shape, mode="bilinear")[0]
    full = torch.zeros((expected.shape[0], *geometry.shape))
    full[0] = 1
    full[(slice(None),) + tuple(slice(lo, hi) for lo, hi in geometry.bbox)] = expected
    members = [load_member(m, folds=[0]) for m in (a, b)]
    ours = mean_probabilities([m.probabilities(channels) for m in members])
    assert torch.allclose(ours, full, atol=1e-5)
    # End to end through files: the written label is the argmax of that mean.
    out = ensemble_predict_folder(
        [a, b], case.images[0], tmp_path / "out", folds=[0], show_progress=False
    )
    label = read_image(out[0]).array
    assert label.shape == tuple(geometry.shape)
    agree = (label == full.argmax(0).numpy()).mean()
    assert agree > 0.999  # ties at float precision aside


def test_weighted_mean_and_vote_by_construction():
    p1 = torch.tensor([[0.9, 0.2], [0.1, 0.8]])  # (K=2, 2 voxels)
    p2 = torch.tensor([[0.4, 0.6], [0.6, 0.4]])
    p3 = torch.tensor([[0.3, 0.7], [0.7, 0.3]])
    assert torch.allclose(mean_probabilities([p1, p2], [3, 1]), 0.75 * p1 + 0.25 * p2)
    # Votes per voxel: argmaxes (0,1), (1,0), (1,0) -> (1, 0).
    assert combine([p1, p2, p3], method="vote").tolist() == [1, 0]
    assert majority_vote([np.array([2, 1]), np.array([1, 1])], 3).tolist() == [1, 1]  # tie: lowest
    with pytest.raises(MedsegError, match="unknown ensemble method"):
        combine([p1], method="max")
    with pytest.raises(MedsegError, match="weights"):
        mean_probabilities([p1, p2], [1.0])


def test_tuned_weights_pick_the_right_member():
    ref = np.array([[0, 1, 1, 0]])
    good = torch.tensor([[[0.9, 0.2, 0.3, 0.8]], [[0.1, 0.8, 0.7, 0.2]]])  # (K, 1, 4), right
    bad = 1 - good  # always wrong, and confident
    weights, score = tune_weights([[bad, good]], [ref], step=0.25)
    assert score == pytest.approx(1.0) and weights[1] > weights[0]


def test_select_best_scores_every_combination_out_of_fold(two_models, tmp_path):
    a, b, _ = two_models
    sel = select_best([a, b], methods=("mean", "vote"), show_progress=False)
    assert sel.folds == (0, 1) and sel.num_cases == 10  # every case once, out of fold
    kinds = {(len(c.members), c.method) for c in sel.candidates}
    assert kinds == {(1, "single"), (2, "mean"), (2, "vote")}
    assert sel.best.mean_dice == max(c.mean_dice for c in sel.candidates)
    path = api.select_ensemble(
        [a, b], tmp_path / "ensemble.json", methods=("mean",), show_progress=False
    )
    assert path.exists()
    with pytest.raises(MedsegError, match="already exists"):
        api.select_ensemble([a, b], path, show_progress=False)


def test_members_with_other_labels_are_refused(two_models, tmp_path):
    from dataclasses import replace

    from medseg.planning.plan import read_plan

    a, _, dataset = two_models
    plan = read_plan(a)
    other = replace(plan, labels=((0, "background"), (1, "disk"), (2, "other")))
    c = fake_model_dir(tmp_path / "c", other)
    with pytest.raises(MedsegError, match="labels"):
        ensemble_predict_folder([a, c], dataset, tmp_path / "o", show_progress=False)


def test_cli_ensemble_and_selection(two_models, tmp_path):
    from medseg.cli.main import main

    a, b, dataset = two_models
    spec = load_dataset(dataset)
    image = spec.cases[1].images[0]
    out = tmp_path / "cli"
    code = main(
        [
            "--quiet",
            "ensemble",
            image,
            "-o",
            str(out),
            "--models",
            f"{a},{b}",
            "--method",
            "weighted",
            "--weights",
            "0.7,0.3",
            "--folds",
            "0",
        ]
    )
    assert code == 0 and len(list(out.iterdir())) == 1
    sel = tmp_path / "sel.json"
    code = main(
        ["--quiet", "ensemble-select", "--models", f"{a},{b}", "-o", str(sel), "--methods", "mean"]
    )
    assert code == 0 and sel.exists()
    code = main(
        [
            "--quiet",
            "ensemble",
            image,
            "-o",
            str(tmp_path / "cli2"),
            "--models",
            str(a),
            "--from-selection",
            str(sel),
        ]
    )
    assert code == 0
    # A user mistake is exit code 2, no traceback.
    assert (
        main(
            [
                "--quiet",
                "ensemble",
                image,
                "-o",
                str(out),
                "--models",
                str(a),
                "--method",
                "weighted",
            ]
        )
        == 2
    )
