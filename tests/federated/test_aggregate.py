"""Update checks and the three strategies, against sums written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.federated.aggregate import (
    FedAdam,
    FedAvg,
    Update,
    check_update,
    make_strategy,
    weighted_mean,
)


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "b": torch.full((3,), value), "n": torch.tensor(7)}


def test_a_good_update_passes_and_bad_ones_say_why():
    ref = _weights(0.0)
    assert check_update(Update("a", _weights(1.0), 4), ref) is None
    nan = _weights(1.0)
    nan["w"][0, 1] = math.nan
    assert "not finite" in check_update(Update("a", nan, 4), ref)
    inf = _weights(1.0)
    inf["b"][0] = math.inf
    assert "not finite" in check_update(Update("a", inf, 4), ref)
    shape = _weights(1.0)
    shape["w"] = torch.zeros(3, 3)
    assert "shape" in check_update(Update("a", shape, 4), ref)
    dtype = _weights(1.0)
    dtype["b"] = dtype["b"].double()
    assert "dtype" in check_update(Update("a", dtype, 4), ref)
    names = _weights(1.0)
    names.pop("b")
    assert "names" in check_update(Update("a", names, 4), ref)
    assert "example count" in check_update(Update("a", _weights(1.0), 0), ref)
    assert "site error" in check_update(Update("a", None, 0, error="boom"), ref)


def test_fedavg_is_the_case_weighted_mean():
    updates = [Update("a", _weights(1.0), 1), Update("b", _weights(4.0), 3)]
    mean = weighted_mean(updates)
    assert torch.allclose(mean["w"], torch.full((2, 3), (1 * 1.0 + 3 * 4.0) / 4))
    assert mean["n"].item() == 7 and mean["n"].dtype == torch.int64
    assert torch.equal(FedAvg().aggregate(_weights(0.0), updates)["b"], mean["b"])


def test_fedadam_takes_an_adam_step_on_the_pseudo_gradient():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    current = _weights(0.0)
    out = strategy.aggregate(current, [Update("a", _weights(0.5), 2)])
    m, v = (1 - b1) * 0.5, (1 - b2) * 0.25
    expected = lr * m / (math.sqrt(v) + tau)
    assert torch.allclose(out["w"], torch.full((2, 3), expected), atol=1e-6)
    # the moments survive a save and load (a coordinator restart)
    again = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    again.load_state_dict(strategy.state_dict())
    a = strategy.aggregate(out, [Update("a", _weights(0.5), 2)])
    b = again.aggregate(out, [Update("a", _weights(0.5), 2)])
    assert torch.allclose(a["w"], b["w"])


def test_strategies_by_name():
    assert make_strategy("fedprox", proximal_mu=0.1).proximal_mu == 0.1
    assert make_strategy("fedavg").proximal_mu == 0.0
    with pytest.raises(ValueError):
        make_strategy("krum")
