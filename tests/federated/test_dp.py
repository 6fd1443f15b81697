"""DP-SGD: clipped per-sample gradients against per-sample backward passes done one by one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medseg.federated.dp import DPSGDHook, PrivacyLedger, sample_rate

pytest.importorskip("opacus")


def _setup(clip: float, noise: float, seed: int = 0):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(8, 2)
    )
    criterion = nn.CrossEntropyLoss()
    hook = DPSGDHook(clip_norm=clip, noise_multiplier=noise, seed=seed)
    engine = SimpleNamespace(model=model, use_amp=False, task=SimpleNamespace(criterion=criterion))
    hook.on_start(engine)
    wrapped = hook.wrap_model(model)
    x = torch.randn(5, 1, 4)
    y = torch.tensor([0, 1, 1, 0, 1])
    return model, criterion, hook, engine, wrapped, x, y


def _per_sample_clipped_mean(model, criterion, x, y, clip):
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(x.shape[0]):
        model.zero_grad()
        criterion(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + scale * g for t, g in zip(total, grads)]
    return [t / x.shape[0] for t in total]


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_gradients_are_the_mean_of_clipped_per_sample_gradients(clip):
    model, criterion, hook, engine, wrapped, x, y = _setup(clip, 0.0)
    loss = hook.loss(wrapped(x), (x, y), torch.tensor(0.0))
    loss.backward()
    hook.on_gradients(engine)
    got = [p.grad.clone() for p in model.parameters()]
    hook.gsm.disable_hooks()
    for p in model.parameters():
        p.grad_sample = None
    expected = _per_sample_clipped_mean(model, criterion, x, y, clip)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    if clip < 1:
        assert hook.clipped_share == 1.0


def test_noise_has_the_calibrated_spread():
    clip, noise = 0.5, 2.0
    draws = []
    for seed in range(40):
        model, criterion, hook, engine, wrapped, x, y = _setup(clip, noise, seed=seed)
        hook.loss(wrapped(x), (x, y), torch.tensor(0.0)).backward()
        hook.on_gradients(engine)
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    spread = torch.stack(draws).std(dim=0).mean().item()
    assert spread == pytest.approx(noise * clip / 5, rel=0.2)  # sigma C / batch


def test_the_ledger_spends_the_target_epsilon(tmp_path):
    rate = sample_rate(4, 40)
    assert rate == 0.1
    ledger = PrivacyLedger.open(tmp_path, delta=1e-5)
    sigma = ledger.noise_for(epsilon=8.0, rate=rate, steps=60)
    for r in range(1, 4):
        ledger.record(round_index=r, noise_multiplier=sigma, rate=rate, steps=20)
    assert ledger.epsilon() == pytest.approx(8.0, rel=0.02)
    assert 0 < ledger.round_epsilon(1) < ledger.epsilon()
    reopened = PrivacyLedger.open(tmp_path, delta=1e-5)
    assert reopened.epsilon() == pytest.approx(ledger.epsilon())
    assert reopened.noise_for(epsilon=8.0, rate=rate, steps=60) == sigma  # cached
