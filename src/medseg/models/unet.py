"""A configurable 2D/3D U-Net (plain or residual blocks, instance norm, LeakyReLU, deep supervision)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.models.registry import register_model


def _conv(ndim: int) -> type[nn.Module]:
    return nn.Conv3d if ndim == 3 else nn.Conv2d


NORMS = ("instance", "batch")


def _norm(ndim: int, channels: int, kind: str = "instance") -> nn.Module:
    if kind == "batch":
        # Inference-time BatchNorm is a per-channel affine map: about 1/5 of the cost of
        # instance norm on a CPU (no statistics pass), which is why the CPU student uses it.
        return (nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d)(channels)
    if kind != "instance":
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
    # Instance norm written as GroupNorm with one channel per group: the same function,
    # but PyTorch's CPU kernel keeps channels-last tensors as they are (about 2x faster
    # per block than InstanceNorm3d, which copies to contiguous and back).
    return nn.GroupNorm(channels, channels, eps=1e-5, affine=True)


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class ConvNormAct(nn.Sequential):
    def __init__(
        self,
        ndim: int,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        norm: str = "instance",
    ) -> None:
        super().__init__(
            _conv(ndim)(cin, cout, tuple(kernel), tuple(stride), _padding(kernel), bias=True),
            _norm(ndim, cout, norm),
            nn.LeakyReLU(0.01, inplace=True),
        )


class PlainBlock(nn.Sequential):
    """Two conv-norm-act layers; the first may stride (replaces pooling)."""

    def __init__(
        self,
        ndim: int,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        norm: str = "instance",
    ) -> None:
        super().__init__(
            ConvNormAct(ndim, cin, cout, kernel, stride, norm),
            ConvNormAct(ndim, cout, cout, kernel, (1,) * ndim, norm),
        )


class ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, plus a (projected) skip, then act."""

    def __init__(
        self,
        ndim: int,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        norm: str = "instance",
    ) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.conv1 = ConvNormAct(ndim, cin, cout, kernel, stride, norm)
        self.conv2 = nn.Sequential(
            conv(cout, cout, tuple(kernel), 1, _padding(kernel), bias=True),
            _norm(ndim, cout, norm),
        )
        self.skip: nn.Module = nn.Identity()
        if cin != cout or any(s != 1 for s in stride):
            self.skip = nn.Sequential(
                conv(cin, cout, 1, tuple(stride), bias=False), _norm(ndim, cout, norm)
            )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class UNet(nn.Module):
    """U-Net whose depth, widths, strides and kernels come from the plan.

    In training mode with ``deep_supervision`` the forward pass returns a list of
    logits, full resolution first; otherwise one tensor of logits.
    """

    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[Sequence[int]] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        residual: bool = False,
        deep_supervision: bool = True,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        n = len(features)
        strides = (
            [tuple(s) for s in strides] if strides else [(1,) * ndim] + [(2,) * ndim] * (n - 1)
        )
        kernel_sizes = [tuple(k) for k in kernel_sizes] if kernel_sizes else [(3,) * ndim] * n
        if not (len(strides) == len(kernel_sizes) == n):
            raise ValueError(f"features, strides and kernel_sizes need one entry per stage ({n})")
        block = ResidualBlock if residual else PlainBlock
        self.ndim = ndim
        self.deep_supervision = deep_supervision
        self.strides = strides
        self.encoder = nn.ModuleList()
        cin = in_channels
        for f, s, k in zip(features, strides, kernel_sizes):
            self.encoder.append(block(ndim, cin, f, k, s, norm))
            cin = f
        transpose = nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d
        conv = _conv(ndim)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for level in range(n - 1, 0, -1):
            s = strides[level]
            self.upsample.append(transpose(features[level], features[level - 1], s, s, bias=False))
            self.decoder.append(
                block(
                    ndim,
                    2 * features[level - 1],
                    features[level - 1],
                    kernel_sizes[level - 1],
                    (1,) * ndim,
                    norm,
                )
            )
            self.heads.append(conv(features[level - 1], num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return encode_decode(self, x)

    @property
    def output_scales(self) -> list[tuple[int, ...]]:
        """Downsampling factor of each deep-supervision output, full resolution first."""
        return deep_supervision_scales(self.strides, self.ndim)


def encode_decode(model: nn.Module, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The U-shaped pass shared by U-Net variants: ``model.encoder`` stages, then
    ``upsample``/``decoder``/``heads`` per level with skip concatenation. Training with deep
    supervision returns every head's output, full resolution first."""
    skips = []
    for stage in model.encoder:
        x = stage(x)
        skips.append(x)
    x = skips.pop()
    outputs = []
    for up, dec, head in zip(model.upsample, model.decoder, model.heads):
        x = dec(torch.cat((up(x), skips.pop()), dim=1))
        outputs.append(head(x))
    if model.deep_supervision and model.training:
        return outputs[::-1]
    return outputs[-1]


def deep_supervision_scales(strides: Sequence[Sequence[int]], ndim: int) -> list[tuple[int, ...]]:
    """Cumulative downsampling factor of each decoder level, full resolution first."""
    scales, current = [], [1] * ndim
    for s in strides[:-1]:
        current = [c * x for c, x in zip(current, s)]
        scales.append(tuple(current))
    return scales


@register_model("unet")
def unet(**kwargs) -> UNet:
    return UNet(**kwargs)


@register_model("resunet")
def resunet(**kwargs) -> UNet:
    # build_network() passes the plan's `residual` too: the name decides.
    return UNet(**{**kwargs, "residual": True})
