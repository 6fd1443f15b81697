"""How a training run computes: float32 or bfloat16 autocast, eager or ``torch.compile``.

Native bfloat16 (AVX512-BF16, AMX) is not enough to make bf16 faster: one AMD EPYC with
AVX512-BF16 ran the eager hippocampus step in 0.63 s in bf16 against 0.51 s in fp32,
another in 0.87 s against 1.07 s. ``torch.compile`` (inductor) fuses the normalization and
activation kernels around the convolutions; on the second machine it cut the step to
0.73 s (fp32) and 0.39 s (bf16) after 30-40 s of compiling. So ``"auto"`` measures: a
probe times a few steps of the run's own first batch in every candidate mode and keeps the
fastest, where bf16 must beat fp32 by 8 % (a near tie keeps float32's accuracy) and a
compiled step must beat the eager one by 5 %.

Candidates: bfloat16 only on a CPU with native bf16 (``precision="auto"``) and runs of at
least 5 minutes (shorter ones do not pay back the probe, and train in fp32); compiled
modes only with ``compile="auto"`` on runs of at least 10 minutes (or ``"on"``), where a
C++ compiler is present (inductor needs one on CPU). A mode that fails to compile is
dropped. CUDA keeps its float16 AMP (``amp``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from medseg.runtime import PRECISIONS, native_cpu_bf16

COMPILE_SETTINGS = ("auto", "on", "off")
# bf16 must take at most this share of the fp32 step (a near tie keeps float32).
SPEED_MARGIN = 0.92
# a compiled step must take at most this share of the eager one
COMPILE_MARGIN = 0.95
# "auto" runs shorter than these (seconds of budget, or estimated) skip the probe / compiling
MIN_RUN_SECONDS_FOR_PROBE = 300.0
MIN_RUN_SECONDS_FOR_COMPILE = 600.0
PROBE_ROUNDS = 3

# A probe step: forward, loss and backward (no optimizer update) in one mode.
ProbeStep = Callable[[bool, bool], None]  # (compiled, bf16) -> None


@dataclass(frozen=True)
class SpeedChoice:
    """How a run computes and why (written to the fold folder as ``precision.json``)."""

    requested: str
    precision: str  # "fp32" or "bf16" (CUDA: "fp16-amp" or "fp32")
    reason: str
    native_bf16: bool
    compile_setting: str = "off"
    compiled: bool = False
    compile_reason: str = "off"
    step_seconds: dict[str, float] = field(default_factory=dict)  # per probed mode
    cpu_flags: list[str] = field(default_factory=lambda: bf16_cpu_flags())

    def to_json(self) -> dict:
        return asdict(self)


def bf16_cpu_flags() -> list[str]:
    """The CPU's bfloat16-related feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (``$CXX``, c++, g++, clang++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def should_compile(
    setting: str, *, device: torch.device, expected_run_seconds: float | None
) -> tuple[bool, str]:
    """Whether a run tries compiled modes (``setting``: auto, on, off) and why."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"unknown compile setting {setting!r} (use {', '.join(COMPILE_SETTINGS)})")
    if setting == "off":
        return False, "off"
    if device.type == "cpu" and cxx_compiler() is None:
        return False, "no C++ compiler for inductor on CPU"
    if setting == "on":
        return True, "requested"
    if expected_run_seconds is None or expected_run_seconds < MIN_RUN_SECONDS_FOR_COMPILE:
        return False, "short run: compiling would not pay back"
    return True, "long run"


def mode_name(compiled: bool, bf16: bool) -> str:
    return ("compiled " if compiled else "eager ") + ("bf16" if bf16 else "fp32")


def probe_modes(
    step: ProbeStep, modes: list[tuple[bool, bool]], *, rounds: int = PROBE_ROUNDS
) -> tuple[dict[tuple[bool, bool], float], str | None]:
    """Median seconds of ``step`` in each mode, rounds alternated so drift hits all.

    One untimed step per mode comes first (oneDNN picks kernels; a compiled mode compiles).
    A compiled mode whose first step raises is dropped with the others compiled; the
    second value then says why.
    """
    failure = None
    usable = []
    for compiled, bf16 in modes:
        if compiled and failure is not None:
            continue
        try:
            step(compiled, bf16)
        except Exception as exc:  # inductor could not compile this network here
            if not compiled:
                raise
            failure = f"compiling failed ({type(exc).__name__}: {str(exc)[:120]})"
            continue
        usable.append((compiled, bf16))
    if failure is not None:
        usable = [m for m in usable if not m[0]]
    times: dict[tuple[bool, bool], list[float]] = {m: [] for m in usable}
    for _ in range(rounds):
        for mode in usable:
            t0 = time.perf_counter()
            step(*mode)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}, failure


def effective_seconds(mode: tuple[bool, bool], seconds: float) -> float:
    """A mode's time as compared: bf16 and compiling must win by their margins."""
    compiled, bf16 = mode
    return seconds / (SPEED_MARGIN if bf16 else 1.0) / (COMPILE_MARGIN if compiled else 1.0)


def choose_speed(
    requested: str,
    *,
    compile_setting: str = "off",
    device: torch.device,
    amp: bool,
    expected_run_seconds: float | None,
    step: ProbeStep | None = None,
    native: bool | None = None,
    can_compile: bool = True,
) -> SpeedChoice:
    """Resolve ``requested`` precision (auto, fp32, bf16) and the compile setting for a run.

    Parameters
    ----------
    requested
        The precision setting.
    compile_setting
        ``"auto"``, ``"on"`` or ``"off"`` (see :func:`should_compile`).
    device
        Where it trains; on CUDA ``amp`` decides the precision (float16 autocast).
    amp
        The CUDA AMP setting.
    expected_run_seconds
        The time budget (or an estimate); ``None``: unknown (no probe, no compiling).
    step
        One probe step in a mode, ``step(compiled, bf16)``; ``None``: no probe possible.
    native
        Whether the CPU computes bfloat16 natively (``None``: ask the CPU).
    can_compile
        False when the network is wrapped (data parallel): eager only.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (use {', '.join(PRECISIONS)})")
    compile_it, compile_reason = should_compile(
        compile_setting, device=device, expected_run_seconds=expected_run_seconds
    )
    if compile_it and not can_compile:
        compile_it, compile_reason = False, "a hook wraps the network (data parallel)"
    if device.type == "cuda":
        native = False
        precision, reason = ("fp16-amp" if amp else "fp32"), "CUDA: float16 AMP follows `amp`"
        precisions = [False]
    else:
        native = native_cpu_bf16() if native is None else native
        if requested != "auto":
            precision, reason = requested, "requested"
            if requested == "bf16" and not native:
                reason = "requested (bf16 emulated)"
            precisions = [requested == "bf16"]
        elif not native:
            precision, reason, precisions = "fp32", "no native bfloat16 on this CPU", [False]
        elif expected_run_seconds is None or expected_run_seconds < MIN_RUN_SECONDS_FOR_PROBE:
            precision, reason, precisions = "fp32", "short run: no probe", [False]
        else:
            precision, reason, precisions = "fp32", "probe", [False, True]
    modes = [(c, b) for c in ([False, True] if compile_it else [False]) for b in precisions]
    common = {
        "requested": requested,
        "native_bf16": bool(native),
        "compile_setting": compile_setting,
    }
    if len(modes) == 1 or step is None:
        return SpeedChoice(
            precision=precision,
            reason=reason,
            compiled=False,
            compile_reason=compile_reason if not compile_it else "no probe possible",
            **common,
        )
    seconds, failure = probe_modes(step, modes)
    best = min(seconds, key=lambda m: effective_seconds(m, seconds[m]))
    timings = ", ".join(f"{mode_name(*m)} {t:.3f} s" for m, t in seconds.items())
    if device.type == "cpu":
        precision = "bf16" if best[1] else "fp32"
        if reason == "probe":
            reason = f"probe: {timings}"
    compiled = best[0]
    if failure is not None:
        compile_reason = failure
    elif compile_it:
        compile_reason = f"probe: {timings}"
    return SpeedChoice(
        precision=precision,
        reason=reason,
        compiled=compiled,
        compile_reason=compile_reason,
        step_seconds={mode_name(*m): round(t, 4) for m, t in seconds.items()},
        **common,
    )
