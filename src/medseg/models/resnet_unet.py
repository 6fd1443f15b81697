"""2D U-Nets on an ImageNet-style ResNet encoder that loads pretrained weights from a local
torchvision-format state dict (``resnet18/34/50``: ``conv1``, ``bn1``, ``layer1..4``).

Why pure PyTorch rather than torchvision/timm: PyPI's torchvision does not import beside
the CPU torch pinned here, and the matching torch+torchvision pair on disk is a 5.5 GB CUDA
build. The encoder below uses torchvision's module names and shapes, so a file saved by
``torch.save(torchvision.models.resnet34(weights=...).state_dict(), path)`` (or a timm
ResNet, which uses the same names) loads as is, with no extra dependency.

The encoder keeps BatchNorm (the pretrained statistics live there); the decoder uses the
U-Net's instance norm blocks. Input sizes are padded to a multiple of 32 and cropped back.
The plan's features/strides do not apply (the ResNet fixes them); 2D only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.registry import register_model
from medseg.models.unet import ConvNormAct

_MULTIPLE = 32


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride, 1, bias=False
        )  # stride here, as torchvision
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetEncoder(nn.Module):
    """torchvision's ResNet trunk (no pooling head); returns features at strides 2..32."""

    def __init__(self, depth: str, in_channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        block, layers = RESNETS[depth]
        b = base_width  # 64 in every pretrained ResNet; smaller only for tests
        self.conv1 = nn.Conv2d(in_channels, b, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, self.channels = b, [b]
        for i, (n, width) in enumerate(zip(layers, (b, 2 * b, 4 * b, 8 * b)), 1):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 1) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.channels.append(cin)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


def load_torchvision_weights(encoder: ResNetEncoder, path: str | os.PathLike) -> list[str]:
    """Load a torchvision/timm ResNet state dict into ``encoder``; returns the loaded keys.

    ``fc.*`` is ignored. With other than 3 input channels the first convolution gets the
    mean RGB filter repeated per channel (scaled to keep activations comparable).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MedsegError(f"{path}: encoder weights file not found") from None
    except Exception as exc:  # torch raises several types for unreadable files
        raise MedsegError(f"{path}: cannot read encoder weights ({str(exc)[:120]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MedsegError(f"{path}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = encoder.state_dict()
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] != own["conv1.weight"].shape[1]:
        n = own["conv1.weight"].shape[1]
        state["conv1.weight"] = conv1.mean(1, keepdim=True).repeat(1, n, 1, 1) * (3 / n)
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        bad = (missing + wrong)[:3]
        raise MedsegError(
            f"{path}: not a matching torchvision ResNet state dict "
            f"({len(missing)} missing, {len(wrong)} mis-shaped, e.g. {', '.join(bad)})"
        )
    encoder.load_state_dict({k: state[k] for k in own})
    return sorted(own)


class ResNetUNet(nn.Module):
    """ResNet encoder + U-Net decoder (upsample, concatenate, two conv-norm-act)."""

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] | None = None,  # noqa: ARG002 (fixed by the ResNet)
        strides: Sequence[Sequence[int]] | None = None,  # noqa: ARG002
        kernel_sizes: Sequence[Sequence[int]] | None = None,  # noqa: ARG002
        residual: bool = True,  # noqa: ARG002
        deep_supervision: bool = False,  # noqa: ARG002
        depth: str = "resnet34",
        encoder_weights: str | os.PathLike | None = None,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if ndim != 2:
            raise ValueError(f"{depth}_unet is 2D only (ImageNet encoders), got ndim={ndim}")
        self.ndim, self.deep_supervision = 2, False
        self.encoder = ResNetEncoder(depth, in_channels, base_width)
        if encoder_weights is not None:
            load_torchvision_weights(self.encoder, encoder_weights)
        skips = self.encoder.channels[::-1]  # stride 32, 16, 8, 4, 2
        self.blocks = nn.ModuleList()
        cin = skips[0]
        for i, cout in enumerate(decoder_channels):
            skip = skips[i + 1] if i + 1 < len(skips) else 0
            self.blocks.append(
                nn.Sequential(
                    ConvNormAct(2, cin + skip, cout, (3, 3), (1, 1)),
                    ConvNormAct(2, cout, cout, (3, 3), (1, 1)),
                )
            )
            cin = cout
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        target = [s + (-s) % _MULTIPLE for s in size]
        if all(t == _MULTIPLE for t in target):
            target[0] = 2 * _MULTIPLE  # BatchNorm needs two values at the bottleneck
        pad = [t - s for t, s in zip(target, size)]
        if any(pad):
            x = F.pad(x, [pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2])
        feats = self.encoder(x)[::-1]
        y = feats[0]
        for i, block in enumerate(self.blocks):
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            if i + 1 < len(feats):
                y = torch.cat((y, feats[i + 1]), dim=1)
            y = block(y)
        y = self.head(y)
        return y[:, :, pad[0] // 2 : pad[0] // 2 + size[0], pad[1] // 2 : pad[1] // 2 + size[1]]


def _factory(depth: str):
    def build(**kwargs) -> ResNetUNet:
        return ResNetUNet(depth=depth, **kwargs)

    return build


for _depth in RESNETS:
    register_model(
        f"{_depth}_unet",
        dims=(2,),
        tiny_options={"base_width": 8, "decoder_channels": (16, 16, 8, 8, 8)},
    )(_factory(_depth))
