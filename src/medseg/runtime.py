"""Where and how tensors run: device, usable cores, memory format and precision.

A leaf module: every stage asks it instead of probing the machine on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medseg.errors import MedsegError

PRECISIONS = ("auto", "fp32", "bf16")


def choose_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MedsegError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def _cgroup_cpu_limit() -> int | None:
    """Whole cores allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 cfs files), if any."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, int(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, quota // period)
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    """Cores this process may really use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def configure_threads(device: torch.device, num_threads: int | None = None) -> int:
    """On a CPU, let torch use ``num_threads`` (default: :func:`usable_cores`); returns the count."""
    threads = num_threads or usable_cores()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return threads


def memory_format(ndim: int) -> torch.memory_format:
    """Channels-last for ``ndim``-D images: oneDNN runs 3D convolutions (and their
    backward) several times faster on CPU in this layout than in the default one."""
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16).

    Elsewhere PyTorch emulates bfloat16 and autocast is slower than float32.
    """
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private probes moved: stay with float32
        return False


def resolve_precision(precision: str, *, backend: str, device: torch.device) -> str:
    """``"auto"``: bf16 for the PyTorch backend on a CPU with native bfloat16, else fp32.

    On the hippocampus benchmark bf16 changed mean Dice by 3e-5 and halved the
    inference time (``benchmarks/results/inference.json``). CUDA always runs
    float16 autocast.
    """
    if precision not in PRECISIONS:
        raise MedsegError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision != "auto":
        return precision
    return "bf16" if backend == "torch" and device.type == "cpu" and native_cpu_bf16() else "fp32"
