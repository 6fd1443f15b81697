"""Contract tests: every registered model and loss, in 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.models import create_model


# The U-Nets with deep supervision; every registered model: tests/test_model_zoo.py.
@pytest.mark.parametrize("name", ["unet", "resunet"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_model_forward_backward(name: str, ndim: int):
    torch.manual_seed(0)
    shape = (16, 24) if ndim == 2 else (16, 16, 8)
    strides = [(1,) * ndim, (2,) * ndim, (2,) * ndim]
    model = create_model(
        name, ndim=ndim, in_channels=2, num_classes=3, features=(4, 8, 16), strides=strides
    )
    x = torch.randn(2, 2, *shape)
    model.train()
    outputs = model(x)
    assert isinstance(outputs, list) and len(outputs) == 2
    assert outputs[0].shape == (2, 3, *shape)
    assert outputs[1].shape == (2, 3, *(s // 2 for s in shape))
    sum(o.square().mean() for o in outputs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, *shape)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        create_model("nope")


def test_instance_norm_equivalence():
    """GroupNorm with one channel per group is instance norm (what the U-Net uses)."""
    x = torch.randn(2, 4, 6, 7, 5)
    gn = torch.nn.GroupNorm(4, 4, affine=False)
    assert torch.allclose(gn(x), F.instance_norm(x), atol=1e-5)
