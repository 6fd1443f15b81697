"""``medseg federated certs`` and ``simulate`` from the command line."""

from __future__ import annotations

import json

from medseg.cli.main import main
from medseg.model_folder import ModelFolder


def test_certs_then_a_one_round_simulation(tmp_path, phantom_dataset, capsys):
    assert main(["federated", "certs", "-o", str(tmp_path / "c"), "--sites", "h1,h2"]) == 0
    assert (tmp_path / "c" / "nodes" / "h2.key").is_file()
    capsys.readouterr()
    code = main(
        [
            "federated", "simulate", str(phantom_dataset), "-o", str(tmp_path / "sim"),
            "--sites", "2", "--split-by", "3", "--rounds", "1", "--local-steps", "1",
            "--min-clients", "2",
        ]
    )  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rounds"]) == 1 and len(out["rounds"][0]["accepted"]) == 2
    assert ModelFolder.open(out["final_model"]).folds() == [0]


def test_a_bad_option_is_one_line_and_exit_2(tmp_path, phantom_dataset, capsys):
    code = main(
        ["federated", "simulate", str(phantom_dataset), "-o", str(tmp_path), "--sites", "99"]
    )
    assert code == 2
    assert "cannot split" in capsys.readouterr().err
