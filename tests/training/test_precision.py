"""Training precision: bf16 only with native bf16 and a faster probe; the probe changes nothing else."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch
from helpers.training import CONFIG, TinyRegression, assert_same_weights

from medseg.training import precision as precision_module
from medseg.training.engine import Engine
from medseg.training.precision import choose_speed, should_compile

CPU = torch.device("cpu")


def timed_step(fp32_seconds: float, bf16_seconds: float, calls: list, compiled_factor=1.0):
    def step(compiled: bool, bf16: bool) -> None:
        calls.append((compiled, bf16))
        seconds = bf16_seconds if bf16 else fp32_seconds
        time.sleep(seconds * (compiled_factor if compiled else 1.0))

    return step


def refusing_step(compiled: bool, bf16: bool) -> None:
    raise AssertionError("the probe must not run here")


def test_without_native_bf16_auto_never_chooses_bf16():
    # even a bf16 step that would be ten times faster is not used where bf16 is emulated
    choice = choose_speed(
        "auto", device=CPU, amp=True, expected_run_seconds=3600, step=refusing_step, native=False
    )
    assert choice.precision == "fp32"
    assert "no native" in choice.reason


def probed_on_native_bf16(step, compile_setting: str = "off"):
    """``auto`` on a CPU with native bf16, an hour-long run, timed by ``step``."""
    return choose_speed(
        "auto",
        compile_setting=compile_setting,
        device=CPU,
        amp=True,
        expected_run_seconds=3600,
        step=step,
        native=True,
    )


def test_native_bf16_is_chosen_only_when_the_probe_finds_it_faster():
    calls: list = []
    faster = probed_on_native_bf16(timed_step(0.03, 0.01, calls))
    assert faster.precision == "bf16" and not faster.compiled
    assert faster.step_seconds["eager bf16"] < faster.step_seconds["eager fp32"]
    assert calls.count((False, True)) == calls.count((False, False)) >= 2  # both timed
    slower = probed_on_native_bf16(timed_step(0.01, 0.03, []))
    assert slower.precision == "fp32"
    # a near tie (within the margin) keeps float32
    tie = probed_on_native_bf16(timed_step(0.02, 0.0195, []))
    assert tie.precision == "fp32"


def test_short_runs_and_explicit_settings_skip_the_probe():
    short = choose_speed(
        "auto", device=CPU, amp=True, expected_run_seconds=10, step=refusing_step, native=True
    )
    assert short.precision == "fp32"
    for requested in ("fp32", "bf16"):
        choice = choose_speed(
            requested, device=CPU, amp=True, expected_run_seconds=3600, step=refusing_step
        )
        assert choice.precision == requested
    cuda = choose_speed(
        "auto", device=torch.device("cuda"), amp=True, expected_run_seconds=3600, step=None
    )
    assert cuda.precision == "fp16-amp"
    with pytest.raises(ValueError, match="unknown precision"):
        choose_speed("fp8", device=CPU, amp=True, expected_run_seconds=1)


class RecordsDtype(TinyRegression):
    def setup(self, device):
        self.dtypes: list = []
        return super().setup(device)

    def forward_loss(self, model, batch):
        outputs, loss = super().forward_loss(model, batch)
        self.dtypes.append(outputs.dtype)
        return outputs, loss


def test_bf16_training_runs_the_forward_pass_in_bfloat16(tmp_path):
    task = RecordsDtype()
    engine = Engine(task, tmp_path, replace(CONFIG, precision="bf16"), show_progress=False)
    result = engine.fit()
    assert result.precision == "bf16"
    assert set(task.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights
    record = json.loads((tmp_path / "precision.json").read_text())
    assert record["precision"] == "bf16" and record["requested"] == "bf16"


def test_the_probe_leaves_the_run_as_if_it_had_not_happened(tmp_path, monkeypatch):
    # force a probe on the tiny task: native bf16 claimed, no minimum run length
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(precision_module, "MIN_RUN_SECONDS_FOR_PROBE", 0.0)
    probed = Engine(
        TinyRegression(), tmp_path / "auto", replace(CONFIG, precision="auto"), show_progress=False
    ).fit()
    record = json.loads((tmp_path / "auto" / "precision.json").read_text())
    assert record["reason"].startswith("probe")
    assert record["step_seconds"]["eager fp32"] > 0 and record["step_seconds"]["eager bf16"] > 0
    assert probed.precision == record["precision"] in ("fp32", "bf16")
    # the same run with the chosen precision fixed: same batches, dropout, weights
    fixed = Engine(
        TinyRegression(),
        tmp_path / "fixed",
        replace(CONFIG, precision=probed.precision),
        show_progress=False,
    ).fit()
    assert_same_weights(probed.model.state_dict(), fixed.model.state_dict())


def test_auto_on_a_cpu_without_native_bf16_trains_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: False)
    monkeypatch.setattr(precision_module, "MIN_RUN_SECONDS_FOR_PROBE", 0.0)
    task = RecordsDtype()
    result = Engine(task, tmp_path, replace(CONFIG, precision="auto"), show_progress=False).fit()
    assert result.precision == "fp32"
    assert set(task.dtypes) == {torch.float32}


def test_compile_runs_only_where_it_can_pay_back(monkeypatch):
    assert should_compile("off", device=CPU, expected_run_seconds=1e6) == (False, "off")
    assert not should_compile("auto", device=CPU, expected_run_seconds=60)[0]
    monkeypatch.setattr(precision_module, "cxx_compiler", lambda: None)
    compiled, why = should_compile("on", device=CPU, expected_run_seconds=1e6)
    assert not compiled and "C++" in why  # inductor cannot build CPU kernels without one
    with pytest.raises(ValueError, match="unknown compile"):
        should_compile("sometimes", device=CPU, expected_run_seconds=1)


class Uncompilable(torch.nn.Module):
    """What torch.compile returns where inductor fails: its first call raises."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        raise RuntimeError("inductor: no kernel for this op")


def test_a_failed_compile_falls_back_to_the_eager_step(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cxx_compiler", lambda: "c++")
    monkeypatch.setattr(torch, "compile", lambda model: Uncompilable(model))
    config = replace(CONFIG, precision="fp32", compile="on")
    result = Engine(TinyRegression(), tmp_path / "on", config, show_progress=False).fit()
    record = json.loads((tmp_path / "on" / "precision.json").read_text())
    assert record["compiled"] is False
    assert record["compile_reason"].startswith("compiling failed (RuntimeError")
    eager = Engine(
        TinyRegression(), tmp_path / "off", replace(config, compile="off"), show_progress=False
    ).fit()
    assert_same_weights(result.model.state_dict(), eager.model.state_dict())


class SlowCompiled(torch.nn.Module):
    """A 'compiled' network that computes the same, slower than the eager step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        time.sleep(0.05)
        return self.model(x)


def test_a_compiled_step_that_is_not_faster_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cxx_compiler", lambda: "c++")
    monkeypatch.setattr(torch, "compile", lambda model: SlowCompiled(model))
    config = replace(CONFIG, precision="fp32", compile="on", max_epochs=3)
    Engine(TinyRegression(), tmp_path, config, show_progress=False).fit()
    record = json.loads((tmp_path / "precision.json").read_text())
    assert record["compiled"] is False and record["compile_reason"].startswith("probe")
    assert record["step_seconds"]["compiled fp32"] > record["step_seconds"]["eager fp32"]


class FastCompiled(SlowCompiled):
    """A 'compiled' network that computes the same while the eager one is slowed."""

    def forward(self, x):
        return self.model(x)


class SlowEager(TinyRegression):
    def forward_loss(self, model, batch):
        if not isinstance(model, FastCompiled):
            time.sleep(0.03)
        return super().forward_loss(model, batch)


def test_a_faster_compiled_step_trains_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cxx_compiler", lambda: "c++")
    monkeypatch.setattr(torch, "compile", lambda model: FastCompiled(model))
    config = replace(CONFIG, precision="fp32", compile="on")
    engine = Engine(SlowEager(), tmp_path, config, show_progress=False)
    engine.fit()
    record = json.loads((tmp_path / "precision.json").read_text())
    assert record["compiled"] is True and isinstance(engine.train_model, FastCompiled)
    assert record["step_seconds"]["compiled fp32"] < record["step_seconds"]["eager fp32"]


def test_probe_picks_compiled_bf16_only_when_it_wins_by_the_margins():
    # compiled halves both steps, bf16 is 30 % faster: compiled bf16 wins
    choice = probed_on_native_bf16(timed_step(0.02, 0.014, [], compiled_factor=0.5), "on")
    assert (choice.precision, choice.compiled) == ("bf16", True)
    assert len(choice.step_seconds) == 4


@pytest.mark.skipif(precision_module.cxx_compiler() is None, reason="inductor needs a C++ compiler")
def test_real_torch_compile_probe_trains_to_the_eager_result(tmp_path):
    config = replace(CONFIG, precision="fp32", compile="on", max_epochs=2)
    compiled = Engine(TinyRegression(), tmp_path / "on", config, show_progress=False).fit()
    record = json.loads((tmp_path / "on" / "precision.json").read_text())
    assert set(record["step_seconds"]) == {"eager fp32", "compiled fp32"}
    eager = Engine(
        TinyRegression(), tmp_path / "off", replace(config, compile="off"), show_progress=False
    ).fit()
    # compiled kernels may sum in another order: equal to float tolerance, not bitwise
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, rtol=1e-4, atol=1e-5)
