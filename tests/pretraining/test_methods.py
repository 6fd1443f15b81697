"""The pretraining objectives: masks, the masked encoder, InfoNCE and Genesis corruptions."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.models.unet import UNet
from medseg.pretraining.methods import (
    PretrainNetwork,
    ProjectionHead,
    ReconstructionHead,
    genesis_corrupt,
    info_nce,
    mask_grid,
    masked_mse,
    random_mask,
)


def _unet(ndim: int = 3, cin: int = 1, classes: int = 2) -> UNet:
    torch.manual_seed(0)
    strides = ((1,) * ndim, (2,) * ndim, (2,) * ndim)
    return UNet(
        ndim=ndim,
        in_channels=cin,
        num_classes=classes,
        features=(4, 8, 16),
        strides=strides,
        deep_supervision=False,
    )


def test_mask_grid_and_ratio():
    assert mask_grid((40, 56, 40), ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))) == (5, 7, 5)
    g = torch.Generator().manual_seed(0)
    mask = random_mask(3, (5, 7, 5), 0.6, g)
    assert mask.shape == (3, 1, 5, 7, 5)
    assert mask.sum(dim=(1, 2, 3, 4)).tolist() == [175 - 105] * 3  # round(0.6 * 175) hidden
    assert not torch.equal(mask[0], mask[1])


def test_hidden_cells_do_not_leak_into_the_encoder():
    """SparK's property, by construction: what lies in a hidden cell changes no encoder
    output anywhere (the mask is re-applied after every stage)."""
    net = PretrainNetwork(
        _unet(), ReconstructionHead(_unet(classes=1), (4, 8, 16), 3, mask_tokens=True), "mae"
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, 16, generator=g)
    mask = random_mask(2, (4, 4, 4), 0.5, g)
    hidden = 1 - torch.nn.functional.interpolate(mask, size=(16, 16, 16), mode="nearest")
    y = x + 5 * hidden * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        a, _ = net.encode(x, mask)
        b, _ = net.encode(y, mask)
        out = net(x, mask)
    for fa, fb in zip(a, b):
        assert torch.allclose(fa, fb, atol=1e-5)
    assert out.shape == x.shape
    # and the reconstruction loss counts hidden voxels only
    assert masked_mse(x + hidden * 2.0, x, mask).item() == pytest.approx(4.0, rel=1e-5)
    assert masked_mse(x + (1 - hidden) * 2.0, x, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_info_nce_matches_its_definition():
    # Two patches, unit embeddings: each view's positive has cosine 1, the negatives 0.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = z1.clone()
    t = 0.5
    # per row: -log(e^{1/t} / (e^{1/t} + 2 e^{0}))  (self excluded, 3 candidates)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2.0))
    assert info_nce(z1, z2, t).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(z1, z2.flip(0), t).item() > expected  # swapped positives: worse


def test_projection_head_pools_the_deepest_stage():
    net = PretrainNetwork(_unet(ndim=2), ProjectionHead(16, 32), "contrastive")
    assert net(torch.randn(3, 1, 32, 32)).shape == (3, 32)
    assert all(k.startswith(("encoder.", "pretrain_head.")) for k in net.state_dict())


def test_genesis_corruptions_keep_shape_and_range():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 16, 20, 12, generator=g)
    y = genesis_corrupt(x, g)
    assert y.shape == x.shape and torch.isfinite(y).all()
    for i in range(3):  # rescaled to [0, 1] and back: the image's range is kept
        assert y[i].min() >= x[i].min() - 1e-4 and y[i].max() <= x[i].max() + 1e-4
    assert not torch.allclose(x, y)
