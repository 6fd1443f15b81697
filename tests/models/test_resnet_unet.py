"""ResNet U-Nets load torchvision-format state dicts from a local file (made here)."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import MedsegError
from medseg.models import create_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchvision_resnet_state(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's key names and shapes, written from its documented
    layout (conv1/bn1, layer1..4 of BasicBlock or Bottleneck, downsample.0/1, fc)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.05

    def bn(name, c):
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
        state[f"{name}.num_batches_tracked"] = torch.tensor(100)

    layers = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
        for j in range(n):
            p = f"layer{i}.{j}"
            cout = width * expansion
            if bottleneck:
                conv(f"{p}.conv1", width, cin, 1), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", cout, width, 1), bn(f"{p}.bn3", cout)
            else:
                conv(f"{p}.conv1", width, cin, 3), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
            if j == 0 and (i > 1 or cin != cout):
                conv(f"{p}.downsample.0", cout, cin, 1), bn(f"{p}.downsample.1", cout)
            cin = cout
    state["fc.weight"] = torch.randn(1000, cin, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.mark.parametrize("depth", [18, 50])
def test_loads_a_torchvision_state_dict_from_a_local_file(depth, tmp_path):
    state = torchvision_resnet_state(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(state, path)
    model = create_model(
        f"resnet{depth}_unet", ndim=2, in_channels=3, num_classes=2, encoder_weights=str(path)
    )
    own = model.encoder.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(own[key], state[key])
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 70, 45))
    assert y.shape == (1, 2, 70, 45) and torch.isfinite(y).all()


def test_one_channel_input_uses_the_mean_rgb_filter(tmp_path):
    state = torchvision_resnet_state(18, seed=1)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model(
        "resnet18_unet", ndim=2, in_channels=1, num_classes=2, encoder_weights=str(path)
    )
    expected = state["conv1.weight"].mean(1, keepdim=True) * 3
    assert torch.allclose(model.encoder.conv1.weight, expected)


def test_a_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision_resnet_state(18), path)
    with pytest.raises(MedsegError, match="not a matching torchvision ResNet"):
        create_model(
            "resnet34_unet", ndim=2, in_channels=3, num_classes=2, encoder_weights=str(path)
        )
    with pytest.raises(MedsegError, match="not found"):
        create_model(
            "resnet18_unet",
            ndim=2,
            in_channels=3,
            num_classes=2,
            encoder_weights=str(tmp_path / "missing.pth"),
        )
    with pytest.raises(ValueError, match="2D only"):
        create_model("resnet18_unet", ndim=3, in_channels=1, num_classes=2)
