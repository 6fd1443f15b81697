"""One command at a time per folder: a lock file holding the holder's PID.

``folder/.medseg.lock`` is locked with ``flock`` (the kernel drops the lock when its holder
dies, even by ``kill -9``) and holds JSON naming the holder: PID, host, command and start
time. A second command on the same folder refuses with that information; a lock file left by
a killed process is taken over, with a one-line note on stderr. The lock is re-entrant within
one process (``run`` takes it, then ``train`` inside it takes it again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import MedsegError

__all__ = ["LOCK_NAME", "FolderLocked", "folder_lock", "holds_folder", "lock_holder"]

LOCK_NAME = ".medseg.lock"
_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, depth) held by this process
_guard = threading.Lock()


def _forget_in_child() -> None:
    # A forked worker (a preprocessing pool) must not keep its parent's lock alive after a
    # kill -9 of the parent: close its copies (the parent's lock stays, flock is per open file).
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class FolderLocked(MedsegError):
    """Another live process holds the folder's lock."""


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """What the lock file of ``folder`` says about its (last) holder, or None."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"`medseg {holder.get('command', '?')}` (PID {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {when})"
    )


def _acquire(folder: Path, command: str) -> int:
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FolderLocked(
                f"{folder}: in use by {_describe(lock_holder(folder))}; wait for it to "
                "finish or stop it"
            ) from None
        try:  # the file may have been replaced between open and flock: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = lock_holder(folder)
    if stale and stale.get("pid") != os.getpid():
        print(
            f"medseg: {folder}: took over the lock left by {_describe(stale)}, which is no "
            "longer running",
            file=sys.stderr,
        )
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.time(),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MedsegError(f"no space left on {folder} (writing {LOCK_NAME})") from None
        raise
    return fd


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (the folder is created).

    Parameters
    ----------
    folder
        The work, model or output folder.
    command
        What holds it (``"train"``, ``"predict"`` ...), shown to a second command.

    Raises
    ------
    FolderLocked
        One line naming the folder and the live holder's command and PID.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _guard:
        held = _held.get(key)
        if held is not None:
            _held[key] = (held[0], held[1] + 1)
        else:
            _held[key] = (_acquire(folder, command), 1)
    try:
        yield folder
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                # emptied, not removed: removing it would race with a waiting opener
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                if created:  # a command that failed before writing leaves no empty folder
                    with contextlib.suppress(OSError):
                        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                            (folder / LOCK_NAME).unlink()
                            folder.rmdir()


def holds_folder(
    command: str, argument: str, *, unless: Callable[[], bool] | None = None
) -> Callable[[Callable], Callable]:
    """Decorate a function so that it runs holding the lock of its ``argument`` folder.

    Parameters
    ----------
    command
        Shown to a second command that finds the folder locked.
    argument
        The name of the parameter that holds the folder (no lock when it is None).
    unless
        When this returns True the lock is not taken (e.g. in a data-parallel rank, whose
        launcher holds it).
    """

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments.get(argument)
            if folder is None or (unless is not None and unless()):
                return function(*args, **kwargs)
            with folder_lock(folder, command):
                return function(*args, **kwargs)

        return locked

    return decorate
