"""medseg.runtime: device, usable cores, memory format, precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg import runtime
from medseg.errors import MedsegError


def _fake_cgroup(monkeypatch, files: dict[str, str]) -> None:
    real_read_text = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if str(self) in files:
            return files[str(self)]
        if str(self).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


def test_usable_cores_respects_a_cgroup_v2_quota(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: set(range(8)))
    _fake_cgroup(monkeypatch, {"/sys/fs/cgroup/cpu.max": "300000 100000\n"})
    assert runtime.usable_cores() == 3


def test_usable_cores_without_a_quota_is_the_affinity(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: {0, 1, 5})
    _fake_cgroup(monkeypatch, {"/sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert runtime.usable_cores() == 3


def test_usable_cores_respects_a_cgroup_v1_quota_and_never_says_zero(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: set(range(4)))
    _fake_cgroup(
        monkeypatch,
        {
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "50000\n",
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert runtime.usable_cores() == 1


def test_a_quota_above_the_affinity_does_not_raise_the_count(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: {0, 1})
    _fake_cgroup(monkeypatch, {"/sys/fs/cgroup/cpu.max": "800000 100000"})
    assert runtime.usable_cores() == 2


def test_configure_threads_sets_torch_threads_on_cpu_only():
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(torch.device("cpu"), 1) == 1
        assert torch.get_num_threads() == 1
        assert runtime.configure_threads(torch.device("cuda"), 3) == 3
        assert torch.get_num_threads() == 1  # a GPU run leaves the CPU pool alone
    finally:
        torch.set_num_threads(before)


def test_choose_device():
    assert runtime.choose_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.choose_device("auto").type == expected
    with pytest.raises(MedsegError, match="unknown device"):
        runtime.choose_device("tpu-please")


@pytest.mark.parametrize(
    ("ndim", "expected"), [(2, torch.channels_last), (3, torch.channels_last_3d)]
)
def test_memory_format_is_channels_last(ndim, expected):
    shape = (1, 4) + (6,) * ndim
    x = torch.zeros(shape).contiguous(memory_format=runtime.memory_format(ndim))
    assert x.is_contiguous(memory_format=expected)
    assert x.stride(1) == 1  # channels vary fastest


def test_auto_precision_picks_bf16_only_where_the_cpu_has_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: True)
    assert runtime.resolve_precision("auto", backend="torch", device=cpu) == "bf16"
    assert runtime.resolve_precision("auto", backend="onnx", device=cpu) == "fp32"
    assert runtime.resolve_precision("auto", backend="torch", device=cuda) == "fp32"
    assert runtime.resolve_precision("fp32", backend="torch", device=cpu) == "fp32"
    monkeypatch.setattr(runtime, "native_cpu_bf16", lambda: False)
    assert runtime.resolve_precision("auto", backend="torch", device=cpu) == "fp32"
    assert runtime.resolve_precision("bf16", backend="torch", device=cpu) == "bf16"
    with pytest.raises(MedsegError, match="unknown precision"):
        runtime.resolve_precision("fp8", backend="torch", device=cpu)
