"""A site's round on the engine: weights back, drills, FedProx, DP metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medseg.federated.site import ProximalHook, RoundConfig, Site
from medseg.federated.summary import fingerprint_from_json
from medseg.io.dataset import load_dataset
from medseg.model_folder import build_network
from medseg.planning.plan import make_plan


def test_the_proximal_term_adds_mu_times_the_distance_to_the_global_weights():
    model = nn.Linear(2, 1)
    ref = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    hook = ProximalHook(ref, mu=0.5)
    engine = SimpleNamespace(model=model)
    hook.on_start(engine)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    hook.on_gradients(engine)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, 1 + 0.5 * p.detach())


@pytest.fixture(scope="module")
def site_and_plan(phantom_dataset, tmp_path_factory):
    spec = load_dataset(phantom_dataset)
    ids = [c.case_id for c in spec.cases[:4]]
    site = Site(spec, tmp_path_factory.mktemp("site"), case_ids=ids, name="s", num_threads=1)
    plan = make_plan(fingerprint_from_json(site.summary()))
    torch.manual_seed(0)
    return site, plan, build_network(plan).state_dict()


def test_a_round_trains_from_the_global_weights(site_and_plan):
    site, plan, weights = site_and_plan
    config = RoundConfig(round=1, rounds=2, local_steps=2, learning_rate=1e-3, proximal_mu=0.01)
    result = site.train_round(weights, plan, config)
    assert result.num_examples == 4 and result.metrics["steps"] == 2
    assert set(result.weights) == set(weights)
    assert any(not torch.equal(result.weights[k], weights[k]) for k in weights)


def test_dp_rounds_report_epsilon_and_drills_corrupt_the_update(site_and_plan):
    site, plan, weights = site_and_plan
    config = RoundConfig(round=1, rounds=2, local_steps=1, learning_rate=1e-3, dp_epsilon=8.0)
    result = site.train_round(weights, plan, config)
    assert 0 < result.metrics["dp_epsilon_round"] <= result.metrics["dp_epsilon_total"] < 8.0
    site.fault = "shape"
    try:
        bad = site.train_round(
            weights, plan, RoundConfig(round=2, rounds=2, local_steps=1, learning_rate=1e-3)
        )
    finally:
        site.fault = None
    first = next(iter(weights))
    assert bad.weights[first].shape != weights[first].shape
