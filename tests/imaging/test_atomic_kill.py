"""kill -9 at random moments of preprocess, train, predict, evaluate, export and a service job.

After each kill no half-written file exists under its final name (every file reads back;
``.tmp-*`` leftovers are allowed and removed by the next run), and running the same command
again completes. This is the short CI version (one random moment per command);
``benchmarks/reliability.py`` runs many (see docs/reliability.md).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers.inference import make_model_dir
from helpers.reliability import Zygote, kill_commands, kill_trial, serve_trial

from medseg.cli.main import main

TRIALS = int(os.environ.get("MEDSEG_KILL_TRIALS", "1"))
# kill moments drawn in [0, DELAY_MAX_S]: from the start of the command to past its end
DELAY_MAX_S = {"preprocess": 1.5, "train": 6.0, "predict": 2.0, "evaluate": 2.0, "export": 4.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, phantom_dataset):
    root = tmp_path_factory.mktemp("kill")
    model_dir = make_model_dir(root)
    inputs = phantom_dataset / "imagesTs"
    predictions = root / "predictions"
    assert (
        main(
            [
                "--quiet",
                "--device",
                "cpu",
                "predict",
                str(model_dir),
                str(inputs),
                "-o",
                str(predictions),
            ]
        )
        == 0
    )
    zygote = Zygote()
    yield {
        "root": root,
        "dataset": phantom_dataset,
        "model_dir": model_dir,
        "inputs": inputs,
        "predictions": predictions,
        "refs": phantom_dataset / "labelsTs",
        "zygote": zygote,
    }
    zygote.close()


@pytest.mark.parametrize("name", sorted(DELAY_MAX_S))
def test_kill_minus_9_leaves_no_half_written_output(setup, name, tmp_path):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for trial in range(TRIALS):
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        shutil.copytree(setup["model_dir"], root / "model")
        commands = kill_commands(
            root,
            dataset=setup["dataset"],
            model_dir=setup["model_dir"],
            inputs=setup["inputs"],
            predictions=setup["predictions"],
            refs=setup["refs"],
        )
        argv, done = commands[name]
        delay = float(rng.uniform(0, DELAY_MAX_S[name]))
        result = kill_trial(setup["zygote"], name, argv, done, root, delay)
        assert result["broken_after_kill"] == [], (delay, result)
        assert result["rerun_code"] == 0, result["log"]
        assert result["broken_after_rerun"] == [] and result["done"], result


def test_kill_minus_9_during_a_service_job(setup, tmp_path):
    upload = next(setup["inputs"].iterdir())
    result = serve_trial(setup["zygote"], setup["model_dir"], upload, tmp_path, delay_s=0.3)
    assert result["broken_after_kill"] == [] and result["broken_after_rerun"] == [], result
    assert result["rerun_status"] == "done", result
