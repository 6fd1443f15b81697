"""Atomic file writes: write a hidden temporary file beside the target, then rename it into place.

A reader never sees a half-written file, and a killed writer leaves only a ``.tmp-*`` file
(which :func:`medseg.inference.batch.remove_stale_temporaries` cleans up for prediction
folders). Images, JSON, checkpoints, weights, reports, transforms, exported models and DICOM
outputs are all written through :func:`atomic_path`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import MedsegError

TEMPORARY_PREFIX = ".tmp-"
# Below this much free space, a failed write is put down to a full disk: ITK, torch and
# safetensors report it in their own words (or, for ITK's NIfTI writer, not at all).
LOW_SPACE_BYTES = 1 << 20


class DiskFull(MedsegError):
    """A write failed because the file system is full."""


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < LOW_SPACE_BYTES or stat.f_favail == 0


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends.

    Parameters
    ----------
    path
        The destination file (its folder is created).
    suffix
        The temporary file's suffix (default: ``path``'s), for writers that choose the
        format by extension (e.g. ``.nii.gz``).

    Yields
    ------
    pathlib.Path
        An existing empty file with the usual (umask) permissions; write to it (or
        replace it). If the block raises, the temporary file is removed and ``path`` is
        left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=TEMPORARY_PREFIX,
            suffix=path.suffix if suffix is None else suffix,
            dir=path.parent,
        )
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on {path.parent} (writing {path.name})") from None
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        if not isinstance(exc, DiskFull) and _is_disk_full(exc, path.parent):
            # one line for the user instead of ITK's, torch's or the OS's own words
            raise DiskFull(f"no space left on {path.parent} (writing {path.name})") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
