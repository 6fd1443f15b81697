"""The frozen old network runs once per batch; EWC's Fisher leaves the network unchanged."""

from __future__ import annotations

import numpy as np
import torch

from medseg.continual.hooks import EWCHook, OldModel, fisher_information
from medseg.models import create_model
from medseg.preprocessing.preprocess import LoadedCase

KW = dict(
    ndim=3,
    in_channels=1,
    features=(4, 8),
    strides=((1, 1, 1), (2, 2, 2)),
    kernel_sizes=None,
    residual=False,
)


def test_old_model_runs_once_per_batch_and_taps_features():
    net = create_model("unet", num_classes=2, deep_supervision=False, **KW)
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    old = OldModel(net, tap_features=True)
    x = torch.randn(1, 1, 8, 8, 8)
    a, b = old(x), old(x)
    assert a is b and len(calls) == 1
    assert len(old.features(x)) == 3 and len(calls) == 1  # two encoder + one decoder stage
    old(torch.randn(1, 1, 8, 8, 8))
    assert len(calls) == 2
    assert not any(p.requires_grad for p in net.parameters())


def test_fisher_is_nonnegative_and_does_not_train():
    torch.manual_seed(0)
    net = create_model("unet", num_classes=2, deep_supervision=True, **KW)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    label = (rng.random((12, 12, 12)) > 0.7).astype(np.int16)
    case = LoadedCase(
        "c",
        rng.normal(size=(1, 12, 12, 12)).astype(np.float32),
        label,
        None,
        {1: np.argwhere(label == 1)},
    )
    fisher = fisher_information(net, [case], patch_size=(8, 8, 8), batches=2)
    assert set(fisher) == {n for n, _ in net.named_parameters()}
    assert all((f >= 0).all() for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    hook = EWCHook(net.state_dict(), fisher, weight=1.0)
    mean = sum(float(f.sum()) for f in hook.fisher.values()) / sum(
        f.numel() for f in hook.fisher.values()
    )
    assert abs(mean - 1.0) < 1e-5  # scaled to mean 1
