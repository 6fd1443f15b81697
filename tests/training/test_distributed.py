"""Data-parallel training: 2 gloo ranks equal one process with the whole batch; a dead
rank stops the other with a clear error; resume; the small pieces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import write_split
from safetensors.numpy import load_file

from medseg import api
from medseg.training import TrainConfig
from medseg.training.distributed import (
    RankEnv,
    batch_share,
    rank_env,
    rank_seed,
    threads_per_rank,
)
from medseg.transforms import AugmentConfig

# no augmentation and a per-voxel loss: the global batch's gradient is then exactly the
# mean of the ranks' gradients (batch Dice and augmentation streams are per rank)
EXACT = TrainConfig(
    max_epochs=2,
    iterations_per_epoch=3,
    batch_size=4,
    seed=3,
    loss="ce",
    augmentation=AugmentConfig(enabled=False),
    num_threads=1,
    learning_rate=0.02,
)


def weights(work: Path) -> dict[str, np.ndarray]:
    return load_file(str(work / "model" / "fold_0" / "weights_last.safetensors"))


def test_batch_share_splits_the_global_batch_and_rank_zero_keeps_the_seed():
    shares = [batch_share(9, r, 2) for r in range(2)]
    assert shares == [slice(0, 5), slice(5, 9)]
    assert [batch_share(4, r, 4) for r in range(4)] == [slice(r, r + 1) for r in range(4)]
    with pytest.raises(Exception, match="smaller than the 3 ranks"):
        batch_share(2, 0, 3)
    assert rank_seed(11, 0) == 11 and rank_seed(11, 1) != rank_seed(11, 2) != 11


def test_rank_env_and_threads_per_rank():
    assert rank_env({}) is None
    env = rank_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1234"})
    assert env == RankEnv(1, 2, 1, 2, "127.0.0.1", 1234)
    n, note = threads_per_rank(env, None, {"OMP_NUM_THREADS": "1"})  # torchrun's default
    assert n == 1 and "torchrun" in note
    n, note = threads_per_rank(env, 3, {})
    assert n == 3 and "as asked" in note


def test_two_ranks_equal_one_process_with_the_whole_batch(disk_dataset, tmp_path):
    """2 gloo ranks x 2 patches = 1 process x 4 patches: same weights, same validation."""
    split = write_split(
        tmp_path / "split.json", [f"case_{i:02d}" for i in range(6)], ["case_07", "case_08"]
    )
    one = api.train(
        disk_dataset, tmp_path / "one", config=EXACT, split_file=split, show_progress=False
    )[0]
    two = api.train(
        disk_dataset,
        tmp_path / "two",
        config=EXACT,
        split_file=split,
        show_progress=False,
        nproc=2,
    )[0]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    # float tolerance: the sums of gloo's all-reduce and of one batch differ in order,
    # and SGD with momentum 0.99 carries that over 6 steps (another seed differs by ~1e-2)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4, err_msg=key)
    flat_a = np.concatenate([a[k].ravel() for k in a])
    flat_b = np.concatenate([b[k].ravel() for k in a])
    assert np.linalg.norm(flat_a - flat_b) < 1e-4 * np.linalg.norm(flat_a)
    assert two.iterations == one.iterations == 6
    assert abs(two.best_val_dice - one.best_val_dice) < 1e-4  # gathered over both ranks
    info = json.loads((tmp_path / "two" / "model" / "fold_0" / "data_parallel.json").read_text())
    assert info["world_size"] == 2 and info["rank_batch"] == 2 and info["backend"] == "gloo"
    assert "1 thread(s) per rank" in info["threads_note"]
    # resume: two more epochs continue from rank 0's checkpoint with both ranks' streams
    more = api.train(
        disk_dataset,
        tmp_path / "two",
        config=replace(EXACT, max_epochs=3),
        split_file=split,
        show_progress=False,
        nproc=2,
    )[0]
    assert more.epochs == 3 and more.iterations == 9


def _rank_command(dataset: Path, work: Path, split: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medseg.cli.main",
        "--quiet",
        "train",
        str(dataset),
        "-w",
        str(work),
        "--split",
        str(split),
        "--epochs",
        "50",
        "--iterations-per-epoch",
        "50",
        "--batch-size",
        "2",
        "--threads",
        "1",
    ]


def test_a_killed_rank_stops_the_other_with_a_clear_error(disk_dataset, tmp_path):
    """torchrun-style ranks: SIGKILL rank 1 mid-training, rank 0 exits 2 within the timeout."""
    split = write_split(tmp_path / "split.json", [f"case_{i:02d}" for i in range(6)], ["case_07"])
    work = tmp_path / "work"
    port = 29000 + os.getpid() % 2000
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "MEDSEG_DIST_TIMEOUT": "30",
        }
        procs.append(
            subprocess.Popen(
                [*_rank_command(disk_dataset, work, split), "--no-resume"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        info = work / "model" / "fold_0" / "data_parallel.json"
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, procs[0].communicate()[1]
            time.sleep(0.2)
        assert info.exists(), "the ranks never started training"
        time.sleep(1.0)  # both ranks are stepping now
        procs[1].send_signal(signal.SIGKILL)
        t = time.monotonic()
        _, err = procs[0].communicate(timeout=45)
        waited = time.monotonic() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 2, err
    assert "another rank died or stopped answering" in err and "Traceback" not in err
    assert waited < 30
