"""medseg.imaging: the one Dice (and its empty-mask policy), components, morphology in mm,
atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from medseg.imaging import (
    atomic_path,
    write_bytes_atomic,
    write_text_atomic,
)


def test_atomic_path_renames_into_place_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_path(target, suffix=".nii.gz") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-")
        assert tmp.name.endswith(".nii.gz") and not target.exists()
        tmp.write_bytes(b"data")
    assert target.read_bytes() == b"data"
    assert list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic("old", tmp_path / "a.txt")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert write_bytes_atomic(b"new", target).read_bytes() == b"new"
