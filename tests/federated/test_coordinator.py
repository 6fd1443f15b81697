"""The coordinator's rounds with a scripted transport: aggregation, rejection, resume."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.errors import MedsegError
from medseg.federated.aggregate import Update
from medseg.federated.coordinator import FederationConfig, round_folder, run_federation
from medseg.federated.summary import site_summary
from medseg.io.dataset import load_dataset
from medseg.model_folder import ModelFolder, read_weights


class ScriptedTransport:
    """Two sites that add 1 (3 cases) and 3 (1 case) to every weight; optionally a NaN site."""

    def __init__(self, summary: str, *, nan_site: bool = False, fail_at: int | None = None):
        self.summary, self.nan_site, self.fail_at, self.rounds = summary, nan_site, fail_at, 0

    def nodes(self):
        return ["a", "b", "c"] if self.nan_site else ["a", "b"]

    def fingerprints(self, nodes, *, timeout):
        return {n: self.summary for n in nodes}

    def train(self, nodes, weights, plan_json, config, **_):
        self.rounds += 1
        if self.fail_at == config.round:
            raise KeyboardInterrupt  # the coordinator dies mid-run
        out = [
            Update("a", {k: v + 1 for k, v in weights.items()}, 3),
            Update("b", {k: v + 3 for k, v in weights.items()}, 1),
        ]
        if self.nan_site:
            out.append(Update("c", {k: v * math.nan for k, v in weights.items()}, 5))
        return out


@pytest.fixture(scope="module")
def summary(phantom_dataset):
    spec = load_dataset(phantom_dataset)
    return site_summary(spec, case_ids=[c.case_id for c in spec.cases[:2]])


def _float(weights):
    return {k: v for k, v in weights.items() if v.is_floating_point()}


def test_rounds_average_reject_nan_and_resume_after_a_restart(tmp_path, summary):
    config = FederationConfig(rounds=3, min_clients=2)
    with pytest.raises(KeyboardInterrupt):
        run_federation(
            ScriptedTransport(summary, nan_site=True, fail_at=3),
            tmp_path,
            config,
            log=lambda s: None,
        )
    first, _ = read_weights(round_folder(tmp_path, 1) / "fold_0", "last")
    assert not round_folder(tmp_path, 3).exists()
    record = (round_folder(tmp_path, 2) / "round.json").read_text()
    assert "not finite" in record
    messages = []
    transport = ScriptedTransport(summary)
    history = run_federation(transport, tmp_path, config, log=messages.append)
    assert transport.rounds == 1 and "resuming after round 2" in messages[0]
    assert history["completed"] and [r["round"] for r in history["rounds"]] == [1, 2, 3]
    last, _ = read_weights(round_folder(tmp_path, 3) / "fold_0", "last")
    # FedAvg with weights 3:1 of +1 and +3 moves every weight by 1.5 per round
    for name, value in _float(last).items():
        torch.testing.assert_close(value, first[name] + 3.0, rtol=0, atol=1e-5)
    assert ModelFolder.open(round_folder(tmp_path, 3)).folds() == [0]


def test_too_few_valid_updates_stop_with_a_clear_error(tmp_path, summary):
    class OneGood(ScriptedTransport):
        def train(self, *args, **kwargs):
            return super().train(*args, **kwargs)[:1]

    with pytest.raises(MedsegError, match="only 1 valid update"):
        run_federation(OneGood(summary), tmp_path, FederationConfig(rounds=1), log=lambda s: None)
