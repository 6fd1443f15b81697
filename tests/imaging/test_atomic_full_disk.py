"""A full disk: `medseg predict` and `medseg train` stop with one line "no space left on <path>".

The output goes to a small tmpfs, filled up to the last few kilobytes. The tmpfs is mounted
in a private user and mount namespace (``unshare -rm``), which needs neither root nor any
change to the machine; where that is not allowed the tests skip with the reason.
Afterwards: a non-zero exit, no half-written file (no ``.tmp-*`` left, nothing under a final
name that does not read back) and the input untouched.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.inference import make_model_dir

from medseg.api import plan, preprocess
from medseg.imaging.atomic import DiskFull, atomic_path
from medseg.io import Image, write_image

VERIFY = Path(__file__).parents[1] / "helpers" / "reliability.py"
FREE_KB = 4  # left free on the tmpfs: one page, for the lock file; no room for an output


def _namespaces_work() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"],
        capture_output=True,
        text=True,
    )
    if proc.stdout.strip() != "ok":
        return f"cannot mount a tmpfs in a user namespace ({proc.stderr.strip()[:120]})"
    return None


SKIP = _namespaces_work()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"full-disk tests: {SKIP}")


def on_full_tmpfs(mount: Path, setup: str, command: list[str]) -> tuple[int, str, list[str]]:
    """Run ``command`` with a nearly full tmpfs at ``mount``; (exit code, stderr, files left)."""
    mount.mkdir(parents=True, exist_ok=True)
    quoted = " ".join(f"'{c}'" for c in command)
    script = f"""
set -u
mount -t tmpfs -o size=4m tmpfs '{mount}' || exit 90
{setup}
head -c {FREE_KB * 1024} /dev/zero > '{mount}/.reserve'
cat /dev/zero > '{mount}/.filler' 2>/dev/null
rm '{mount}/.reserve'
{quoted} 2> '{mount}.stderr'
echo "rc=$?"
find '{mount}' -type f ! -name .filler
'{sys.executable}' '{VERIFY}' '{mount}'
"""
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    code = next(int(x[3:]) for x in lines if x.startswith("rc="))
    files = [x for x in lines if x.startswith("/") or x.startswith("BROKEN")]
    return code, Path(f"{mount}.stderr").read_text(), files


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def assert_clean_failure(code: int, err: str, files: list[str], mount: Path) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0, err
    assert "Traceback" not in err, err
    assert any(f"no space left on {mount}" in line for line in lines), err
    assert not [f for f in files if Path(f).name.startswith(".tmp-")], files
    assert not [f for f in files if f.startswith("BROKEN")], files  # all else reads back


def test_atomic_path_turns_enospc_into_one_line(tmp_path):
    def write():
        with atomic_path(tmp_path / "x.bin") as tmp:
            raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(DiskFull, match=f"no space left on {tmp_path}"):
        write()
    assert list(tmp_path.iterdir()) == []


def test_predict_on_a_full_disk(tmp_path):
    model_dir = make_model_dir(tmp_path)
    inputs = tmp_path / "in"
    rng = np.random.default_rng(0)
    write_image(
        Image(rng.normal(size=(24, 24, 24)).astype(np.float32), (1.0,) * 3), inputs / "case.nii.gz"
    )
    before = digest(inputs)
    mount = tmp_path / "full"
    command = [sys.executable, "-m", "medseg.cli.main", "--quiet", "predict", str(model_dir)]
    code, err, files = on_full_tmpfs(
        mount, "", [*command, str(inputs), "-o", f"{mount}/pred", "--uncertainty"]
    )
    assert_clean_failure(code, err, files, mount)
    assert digest(inputs) == before


def test_train_on_a_full_disk(tmp_path, phantom_dataset):
    work = tmp_path / "prepared"
    plan(phantom_dataset, work, show_progress=False)
    preprocess(phantom_dataset, work, show_progress=False)
    before = digest(phantom_dataset)
    mount = tmp_path / "full"
    command = [sys.executable, "-m", "medseg.cli.main", "--quiet", "--device", "cpu", "train"]
    options = ["--epochs", "1", "--iterations-per-epoch", "1", "--no-augmentation"]
    code, err, files = on_full_tmpfs(
        mount,
        f"cp -r '{work}' '{mount}/work'",
        [*command, str(phantom_dataset), "-w", f"{mount}/work", *options],
    )
    assert_clean_failure(code, err, files, mount)
    assert not [f for f in files if f.endswith((".safetensors", "checkpoint_last.pt"))]
    assert digest(phantom_dataset) == before
