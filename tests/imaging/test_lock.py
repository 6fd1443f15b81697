"""One command per folder: the lock names its live holder, and a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.cli.main import main
from medseg.imaging.lock import LOCK_NAME, FolderLocked, folder_lock, holds_folder, lock_holder

HOLD = """
import sys, time
from medseg.imaging.lock import folder_lock
with folder_lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_the_pid(tmp_path):
    proc = hold_in_another_process(tmp_path / "work")
    try:
        with pytest.raises(FolderLocked) as info, folder_lock(tmp_path / "work", "preprocess"):
            pass
        message = str(info.value)
        assert f"PID {proc.pid}" in message and "medseg train" in message
        assert str(tmp_path / "work") in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    proc = hold_in_another_process(tmp_path / "work")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_holder(tmp_path / "work")["pid"] == proc.pid  # the file still names it
    with folder_lock(tmp_path / "work", "train"):
        assert lock_holder(tmp_path / "work")["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"PID {proc.pid}" in err and "took over" in err
    assert (tmp_path / "work" / LOCK_NAME).read_text() == ""  # released: emptied


def test_lock_is_reentrant_in_one_process(tmp_path):
    calls = []

    @holds_folder("run", "work_dir")
    def outer(work_dir):
        inner(work_dir=work_dir)

    @holds_folder("train", "work_dir")
    def inner(*, work_dir):
        calls.append(json.loads((Path(work_dir) / LOCK_NAME).read_text())["command"])

    outer(tmp_path)
    assert calls == ["run"] and (tmp_path / LOCK_NAME).read_text() == ""


def test_cli_refuses_a_busy_work_folder(tmp_path, capsys, phantom_dataset):
    proc = hold_in_another_process(tmp_path / "work")
    try:
        code = main(["--quiet", "preprocess", str(phantom_dataset), "-w", str(tmp_path / "work")])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert f"PID {proc.pid}" in err and "in use by" in err and len(err.splitlines()) == 1
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "work" / "plan.json").exists()


def test_waiting_opener_cannot_steal_a_replaced_lock(tmp_path):
    # a lock file replaced between open and flock is detected (inode check) and reopened
    with folder_lock(tmp_path, "a"):
        pass
    (tmp_path / LOCK_NAME).unlink()
    with folder_lock(tmp_path, "b"):
        assert lock_holder(tmp_path)["command"] == "b"


def test_a_folder_made_only_for_the_lock_is_removed(tmp_path):
    with folder_lock(tmp_path / "new", "predict"):
        pass
    assert not (tmp_path / "new").exists()  # a command that failed early leaves nothing
    with folder_lock(tmp_path / "kept", "predict"):
        (tmp_path / "kept" / "out.txt").write_text("x")
    assert (tmp_path / "kept" / "out.txt").exists()
