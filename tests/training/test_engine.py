"""The training engine on a tiny task: resume after a kill, time budget, hooks, federated rounds."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.training import CONFIG, TinyRegression, assert_same_weights
from torch import nn

from medseg.model_folder import read_weights
from medseg.training.engine import (
    CHECKPOINT_LAST,
    Engine,
    Hook,
    LoopConfig,
    learning_rate,
)


def fit(folder: Path, config: LoopConfig = CONFIG, hooks=(), task=None, **kwargs):
    engine = Engine(task or TinyRegression(), folder, config, hooks=hooks, show_progress=False)
    return engine.fit(**kwargs)


def read_log(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


class CrashAt(Hook):
    """Raises after the given step, like a killed process: the last checkpoint stays."""

    name = "crash"

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, engine: Engine, loss: float) -> None:
        if engine.iteration == self.step:
            raise KeyboardInterrupt("killed")


class StopAfterEpochs(Hook):
    name = "stop"

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, engine: Engine, row: dict) -> str | None:
        return "stopped_for_test" if engine.epoch >= self.epochs else None


@pytest.mark.parametrize("interrupt", ["killed_mid_epoch", "stopped_at_epoch_end"])
def test_resume_after_a_kill_gives_the_same_weights(tmp_path, interrupt):
    whole = fit(tmp_path / "whole")
    assert whole.iterations == 12 and whole.stopped_because == "max_epochs"

    folder = tmp_path / "interrupted"
    if interrupt == "killed_mid_epoch":
        with pytest.raises(KeyboardInterrupt):
            fit(folder, hooks=[CrashAt(step=8)])  # epoch 2 of 4, one step before its end
    else:
        first = fit(folder, hooks=[StopAfterEpochs(2)])
        assert first.stopped_because == "stopped_for_test" and first.iterations == 6
    state = torch.load(folder / CHECKPOINT_LAST, weights_only=True)
    assert state["epoch"] == 2 and state["iteration"] == 6
    resumed = fit(folder)
    assert (resumed.epochs, resumed.iterations, resumed.session_iterations) == (4, 12, 6)

    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert_same_weights(
        read_weights(tmp_path / "whole", "last")[0], read_weights(folder, "last")[0]
    )
    assert_same_weights(
        read_weights(tmp_path / "whole", "best")[0], read_weights(folder, "best")[0]
    )
    drop = {"elapsed_seconds", "iterations_per_second"}
    strip = [{k: v for k, v in r.items() if k not in drop} for r in read_log(folder)]
    assert strip == [
        {k: v for k, v in r.items() if k not in drop} for r in read_log(tmp_path / "whole")
    ]
    assert [int(r["epoch"]) for r in read_log(folder)] == [0, 1, 2, 3]


class SignalAt(Hook):
    """Sends SIGTERM to this process after the given step."""

    name = "signal"

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, engine: Engine, loss: float) -> None:
        if engine.iteration == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_ends_after_the_current_step_with_a_checkpoint(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    result = fit(tmp_path, hooks=[SignalAt(step=4)])
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert (result.stopped_because, result.iterations, result.epochs) == ("signal", 4, 2)
    state = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    assert (state["epoch"], state["iteration"]) == (2, 4)
    assert fit(tmp_path).iterations == 4 + 2 * 3  # resumes with the next epoch


def test_without_resume_a_run_starts_over(tmp_path):
    fit(tmp_path, hooks=[StopAfterEpochs(2)])
    again = Engine(TinyRegression(), tmp_path, CONFIG, resume=False, show_progress=False).fit()
    assert again.session_iterations == 12 and again.epochs == 4


def test_time_budget_ends_cleanly_with_a_checkpoint(tmp_path):
    config = replace(CONFIG, max_epochs=10_000, time_budget_minutes=0.03, optimizer="adamw")
    start = time.perf_counter()
    result = fit(tmp_path, config, task=TinyRegression(delay=0.02))
    seconds = time.perf_counter() - start
    assert result.stopped_because == "time_budget"
    assert 0 < result.epochs < 10_000 and seconds < 0.03 * 60 + 10
    state = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    assert state["epoch"] == result.epochs and state["iteration"] == result.iterations
    assert (tmp_path / "weights_best.safetensors").exists()
    assert (tmp_path / "weights_last.safetensors").exists()
    # AdamW under a budget: warm-up then cosine, by the share of the budget spent
    rates = [float(r["learning_rate"]) for r in read_log(tmp_path)]
    assert all(0 < lr <= 0.05 for lr in rates)


class Counter(Hook):
    """Counts every call at every hook point, and keeps its count across a resume."""

    name = "counter"

    def __init__(self) -> None:
        self.steps = self.losses = self.gradients = self.rows = 0
        self.resumed_from = 0
        self.started = False

    def on_start(self, engine: Engine) -> None:
        self.started = engine.optimizer is not None and engine.model is not None

    def loss(self, outputs, batch, loss):
        self.losses += 1
        return loss + 0.0 * outputs.sum()

    def on_gradients(self, engine: Engine) -> None:
        self.gradients += 1
        assert all(p.grad is not None for p in engine.model.parameters())

    def after_step(self, engine: Engine, loss: float) -> None:
        self.steps += 1
        assert engine.iteration == self.steps + self.resumed_from

    def row(self, engine: Engine) -> dict:
        self.rows += 1
        return {"hook_steps": self.steps + self.resumed_from}

    def state_dict(self) -> dict:
        return {"steps": self.steps + self.resumed_from}

    def load_state_dict(self, state) -> None:
        self.resumed_from = state["steps"]


def test_a_hook_sees_every_step(tmp_path):
    counter = Counter()
    result = fit(tmp_path, hooks=[counter])
    assert counter.started
    assert counter.steps == counter.losses == counter.gradients == result.iterations == 12
    assert counter.rows == result.epochs == 4
    assert [int(r["hook_steps"]) for r in read_log(tmp_path)] == [3, 6, 9, 12]
    state = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    assert state["hooks"]["counter"] == {"steps": 12}


def test_max_steps_ends_inside_an_epoch(tmp_path):
    counter = Counter()
    result = fit(tmp_path, replace(CONFIG, max_steps=7), hooks=[counter])
    assert (result.stopped_because, result.iterations, result.epochs) == ("max_steps", 7, 3)
    assert counter.steps == 7
    assert read_log(tmp_path)[-1]["iteration"] == "7"


def test_the_resumable_checkpoint_loads_with_weights_only(tmp_path):
    fit(tmp_path, hooks=[Counter()])
    state = torch.load(tmp_path / CHECKPOINT_LAST, weights_only=True)
    assert {"model", "optimizer", "torch_rng", "task", "hooks", "log", "epoch"} <= set(state)
    assert state["task"]["rng"]["bit_generator"] == "PCG64"
    assert isinstance(state["torch_rng"], torch.Tensor)


def test_a_federated_round_trains_n_steps_from_given_weights(tmp_path):
    """A client round is the engine with ``max_steps`` and ``initial_weights``; FedAvg runs
    outside the loop on the returned networks."""
    round_config = replace(CONFIG, max_steps=5, iterations_per_epoch=5, max_epochs=100)
    global_weights = {
        k: v.clone()
        for k, v in fit(tmp_path / "init", replace(CONFIG, max_epochs=1)).model.state_dict().items()
    }

    def client_round(name: str, weights: dict, seed: int, config: LoopConfig = round_config):
        task = TinyRegression(seed=seed)
        engine = Engine(task, tmp_path / name, config, resume=False, show_progress=False)
        result = engine.fit(initial_weights=weights)
        assert result.stopped_because == "max_steps" and result.iterations == 5
        return {k: v.detach().clone() for k, v in result.model.state_dict().items()}

    # With a zero learning rate the round hands back exactly the weights it was given.
    still = client_round("frozen", global_weights, 0, replace(round_config, learning_rate=0.0))
    assert_same_weights(still, global_weights)
    a = client_round("client_a", global_weights, seed=1)
    b = client_round("client_b", global_weights, seed=2)
    assert not torch.equal(a["0.weight"], global_weights["0.weight"])
    assert_same_weights(a, client_round("client_a_again", global_weights, seed=1))
    averaged = {k: (a[k] + b[k]) / 2 for k in a}
    next_round = client_round("round_2", averaged, seed=1)
    assert not torch.equal(next_round["0.weight"], averaged["0.weight"])


class KeepOldOutputs(Hook):
    """Continual learning's shape (LwF): penalize moving away from a frozen old network's
    outputs on the same batch."""

    name = "keep_old_outputs"

    def __init__(self, old: nn.Module, weight: float) -> None:
        self.old, self.weight = old.eval(), weight

    def loss(self, outputs, batch, loss):
        with torch.no_grad():
            target = self.old(batch[0])
        return loss + self.weight * nn.functional.mse_loss(outputs, target)


def test_a_regularizer_hook_keeps_the_old_outputs(tmp_path):
    old = fit(tmp_path / "old", replace(CONFIG, max_epochs=1)).model
    start = {k: v.clone() for k, v in old.state_dict().items()}
    x = torch.from_numpy(TinyRegression().x)

    def drift(hooks) -> float:
        new = fit(tmp_path / f"new{len(hooks)}", hooks=hooks, initial_weights=start).model
        with torch.no_grad():
            return float(nn.functional.mse_loss(new.eval()(x), old.eval()(x)))

    assert drift([KeepOldOutputs(old, weight=50.0)]) < 0.5 * drift([])


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: forwards to the network, counts calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


class DataParallelLike(Hook):
    """The shape of a data-parallel strategy: wrap the forward model; rank > 0 writes nothing."""

    name = "data_parallel"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_start(self, engine: Engine) -> None:
        engine.main_process = self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.wrapper = Wrapper(model)
        return self.wrapper


def test_a_wrapping_hook_trains_through_the_wrapper(tmp_path):
    hook = DataParallelLike(rank=0)
    result = fit(tmp_path / "rank0", hooks=[hook])
    assert hook.wrapper.calls == result.iterations
    assert set(read_weights(tmp_path / "rank0", "last")[0]) == set(result.model.state_dict())
    other = DataParallelLike(rank=1)
    fit(tmp_path / "rank1", hooks=[other])
    assert other.wrapper.calls == 12
    assert not any((tmp_path / "rank1").iterdir())  # only the main process writes


def test_learning_rate_schedules():
    sgd = LoopConfig(optimizer="sgd", learning_rate=0.01)
    assert learning_rate(sgd, 0.0) == 0.01
    assert learning_rate(sgd, 0.5) == pytest.approx(0.01 * 0.5**0.9)
    assert learning_rate(sgd, 1.5) == 0.0
    adamw = LoopConfig(optimizer="adamw", learning_rate=3e-3, warmup_fraction=0.1)
    assert learning_rate(adamw, 0.05) == pytest.approx(1.5e-3)
    assert learning_rate(adamw, 0.1) == pytest.approx(3e-3)
    assert learning_rate(adamw, 0.55) == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(adamw, 1.0) == pytest.approx(0.0)


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        Engine(TinyRegression(), tmp_path, replace(CONFIG, optimizer="lion"))
    with pytest.raises(ValueError, match="distinct names"):
        Engine(TinyRegression(), tmp_path, CONFIG, hooks=[Counter(), Counter()])
    assert not any(tmp_path.iterdir())


def test_training_does_not_import_the_regimes_built_on_it():
    code = (
        "import sys, medseg.training; "
        "bad = [m for m in sys.modules if m.startswith(('medseg.distillation', "
        "'medseg.registration', 'medseg.tuning', 'medseg.api'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class LastWeightsProbe(Hook):
    """At every epoch end, the last weights on disk are the network's current weights."""

    name = "probe"

    def __init__(self) -> None:
        self.checked = 0

    def on_epoch_end(self, engine: Engine, row: dict) -> None:
        assert_same_weights(read_weights(engine.folder, "last")[0], engine.model.state_dict())
        self.checked += 1


def test_last_weights_follow_every_epoch_and_survive_a_kill(tmp_path: Path):
    probe = LastWeightsProbe()
    fit(tmp_path / "probe", hooks=[probe])
    assert probe.checked == CONFIG.max_epochs
    # killed in epoch 2: the last weights are those of the checkpoint a resume starts from
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "killed", hooks=[CrashAt(step=2 * CONFIG.iterations_per_epoch + 1)])
    checkpoint = torch.load(tmp_path / "killed" / CHECKPOINT_LAST, weights_only=True)
    assert checkpoint["epoch"] == 2
    assert_same_weights(read_weights(tmp_path / "killed", "last")[0], checkpoint["model"])
