"""Optuna search: 3 tiny trials that resume after an interruption; bad spaces fail early."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from zoo_helpers import tiny_plan

from medseg import api
from medseg.errors import MedsegError
from medseg.planning.plan import read_plan
from medseg.serialization import write_json_atomic
from medseg.training import TrainConfig
from medseg.transforms import AugmentConfig
from medseg.tuning import apply_params, load_space

optuna = pytest.importorskip("optuna")

TINY = TrainConfig(
    max_epochs=2,
    iterations_per_epoch=3,
    batch_size=2,
    num_folds=3,
    max_validation_cases=2,
    augmentation=AugmentConfig(enabled=False),
    device="cpu",
    num_threads=1,
)
SPACE = {
    "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
    "plan.network.width": [1.0, 2.0],
}


@pytest.fixture
def work(disk_dataset, tmp_path):
    w = tmp_path / "work"
    plan = tiny_plan(api.plan(disk_dataset, w, show_progress=False))
    write_json_atomic(plan, w / "plan.json")
    return w


def test_three_trials_resume_after_an_interruption(disk_dataset, work, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "learning_rate: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\n"
        "optimizer: {type: categorical, choices: [sgd, adamw]}\n"
        "plan.network.width: [1.0, 2.0]\n"
    )
    first = api.tune(
        disk_dataset,
        work,
        space=space,
        trials=2,
        sampler="random",
        config=TINY,
        show_progress=False,
    )
    assert first["trials"]["complete"] + first["trials"]["pruned"] == 2
    # A search killed in the middle of a trial leaves it RUNNING in the SQLite study.
    study = optuna.load_study(study_name="medseg", storage=f"sqlite:///{work}/tuning/study.db")
    killed = study.ask(
        {"learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)}
    )
    assert killed.number == 2
    summary = api.tune(
        disk_dataset,
        work,
        space=space,
        trials=3,
        sampler="random",
        config=TINY,
        show_progress=False,
    )
    t = summary["trials"]
    assert t["complete"] + t["pruned"] == 3 and t["fail"] == 1 and t["running"] == 0
    # The re-queued trial ran with the parameters the killed one had drawn.
    study = optuna.load_study(study_name="medseg", storage=f"sqlite:///{work}/tuning/study.db")
    finished = [tr for tr in study.trials if tr.state.is_finished() and tr.number > 2]
    assert finished[0].params["learning_rate"] == killed.params["learning_rate"]
    best = read_plan(work / "tuning" / "best_plan.json")
    width = summary["best_params"]["plan.network.width"]
    assert best.network.features == tuple(int(round(f * width)) for f in (4, 8))
    report = (work / "tuning" / "report.html").read_text()
    assert "Parallel coordinates" in report and "Trials" in report
    # Nothing left to do: a third call runs no trial.
    again = api.tune(
        disk_dataset,
        work,
        space=space,
        trials=3,
        sampler="random",
        config=TINY,
        show_progress=False,
    )
    assert again["trials"] == t


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optimizer": {"type": "categorical", "choices": []}}, "no valid values"),
        ({"learning_rate": {"type": "float", "low": 1.0, "high": 0.1}}, "no valid values"),
        ({"batch_size": {"type": "int", "low": 2.2, "high": 2.8}}, "no integer"),
        ({"colour": [1, 2]}, "not a tunable"),
        ({"plan.patch_size": [[8, 8]]}, "can be tuned"),
        ({"model": ["unet", "nope"]}, "unknown architecture 'nope'"),
        ({}, "empty search space"),
    ],
)
def test_bad_search_spaces_fail_before_training(disk_dataset, work, space, message):
    with pytest.raises(MedsegError, match=message):
        api.tune(disk_dataset, work, space=space, trials=3, config=TINY, show_progress=False)
    assert not list(work.glob("tuning/trial_*"))


def test_grid_sampler_needs_listed_values(disk_dataset, work):
    with pytest.raises(MedsegError, match="grid sampler needs a list"):
        api.tune(
            disk_dataset,
            work,
            space=SPACE,
            trials=1,
            sampler="grid",
            config=TINY,
            show_progress=False,
        )


def test_apply_params_changes_plan_and_config():
    from medseg.planning.plan import NetworkPlan, Plan

    plan = Plan(
        "d",
        2,
        "2d",
        ("c",),
        ((0, "bg"), (1, "fg")),
        (1.0, 1.0),
        (),
        (32, 32),
        2,
        NetworkPlan(features=(8, 16)),
        (32, 32),
    )
    p, c = apply_params(
        plan, TinyConfig(), {"plan.batch_size": 4, "plan.network.width": 0.5, "learning_rate": 0.1}
    )
    assert p.batch_size == 4 and p.network.features == (4, 8) and c.learning_rate == 0.1
    assert load_space({"optimizer": ["sgd"]}) == {
        "optimizer": {"type": "categorical", "choices": ["sgd"]}
    }
    assert json.dumps(load_space(SPACE))  # plain data, stored with the study


def TinyConfig():  # noqa: N802
    return replace(TINY)


def test_cli_trial_minutes_give_each_trial_its_own_time_budget(disk_dataset, work):
    from medseg.cli.main import main

    args = ["--quiet", "tune", str(disk_dataset), "-w", str(work), "--space"]
    space = work / "space.yaml"
    space.write_text("learning_rate: [0.003]\n")
    assert main([*args, str(space), "--trials", "1", "--trial-minutes", "0"]) == 2
    assert main([*args, str(space), "--trials", "1", "--trial-minutes", "0.01"]) == 0
    config = json.loads((work / "tuning" / "trial_0" / "fold_0" / "train_config.json").read_text())
    # Under a time budget the automatic optimizer is AdamW with the trial's own schedule.
    assert config["time_budget_minutes"] == 0.01
    assert config["optimizer"] == "adamw" and config["learning_rate"] == 0.003
