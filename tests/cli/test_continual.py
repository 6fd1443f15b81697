"""``medseg extend``: a colliding label id is one line on stderr and exit code 2."""

from __future__ import annotations

from helpers.continual import write_blob_dataset
from zoo_helpers import fake_model_dir, tiny_plan

from medseg import api
from medseg.cli.main import main


def test_extend_refuses_colliding_label_id(tmp_path, capsys):
    old = write_blob_dataset(tmp_path / "old", labels={1: "ball"}, num_cases=2, seed=0)
    clash = write_blob_dataset(tmp_path / "clash", labels={1: "box"}, num_cases=2, seed=1)
    model = fake_model_dir(
        tmp_path / "model", tiny_plan(api.plan(old, tmp_path / "p", show_progress=False))
    )
    code = main(
        [
            "extend",
            str(model),
            str(clash),
            "-w",
            str(tmp_path / "w"),
            "--method",
            "mib",
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "label id 1 is 'box'" in err[0]
