"""A lightweight U-Net for CPU inference: depthwise-separable convolutions, inverted
residuals (MobileNetV2 style) and a width multiplier. Meant as a distillation student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.models.registry import register_model
from medseg.models.unet import _conv, _norm, _padding, deep_supervision_scales, encode_decode


class SeparableBlock(nn.Module):
    """1x1 expand, depthwise k x k (may stride), 1x1 project; residual when shapes match."""

    def __init__(
        self,
        ndim: int,
        cin: int,
        cout: int,
        kernel: Sequence[int],
        stride: Sequence[int],
        expansion: int = 2,
    ) -> None:
        super().__init__()
        conv = _conv(ndim)
        hidden = cin * expansion
        self.body = nn.Sequential(
            conv(cin, hidden, 1, bias=False),
            _norm(ndim, hidden),
            nn.LeakyReLU(0.01, inplace=True),
            conv(
                hidden,
                hidden,
                tuple(kernel),
                tuple(stride),
                _padding(kernel),
                groups=hidden,
                bias=False,
            ),
            _norm(ndim, hidden),
            nn.LeakyReLU(0.01, inplace=True),
            conv(hidden, cout, 1, bias=False),
            _norm(ndim, cout),
        )
        self.residual = cin == cout and all(s == 1 for s in stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y + x if self.residual else y


class MobileUNet(nn.Module):
    """U-Net topology from the plan (strides, kernels), channels scaled by ``width``.

    Each stage is two separable blocks; upsampling is a transposed convolution with
    kernel = stride (cheap). Deep supervision as in :class:`medseg.models.unet.UNet`.
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
        residual: bool = True,  # accepted for the common contract; blocks are always residual
        deep_supervision: bool = True,
        width: float = 0.5,
    ) -> None:
        super().__init__()
        del residual
        n = len(features)
        strides = (
            [tuple(s) for s in strides] if strides else [(1,) * ndim] + [(2,) * ndim] * (n - 1)
        )
        kernel_sizes = [tuple(k) for k in kernel_sizes] if kernel_sizes else [(3,) * ndim] * n
        if not (len(strides) == len(kernel_sizes) == n):
            raise ValueError(f"features, strides and kernel_sizes need one entry per stage ({n})")
        widths = [max(4, int(round(f * width))) for f in features]
        self.ndim, self.deep_supervision, self.strides = ndim, deep_supervision, strides
        conv = _conv(ndim)
        # A plain conv stem: depthwise on 1-2 input channels would be too weak.
        self.stem = nn.Sequential(
            conv(in_channels, widths[0], tuple(kernel_sizes[0]), 1, _padding(kernel_sizes[0])),
            _norm(ndim, widths[0]),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.encoder = nn.ModuleList()
        cin = widths[0]
        for w, s, k in zip(widths, strides, kernel_sizes):
            self.encoder.append(
                nn.Sequential(
                    SeparableBlock(ndim, cin, w, k, s), SeparableBlock(ndim, w, w, k, (1,) * ndim)
                )
            )
            cin = w
        transpose = nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d
        self.upsample, self.decoder, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in range(n - 1, 0, -1):
            s = strides[level]
            self.upsample.append(transpose(widths[level], widths[level - 1], s, s, bias=False))
            self.decoder.append(
                SeparableBlock(
                    ndim,
                    2 * widths[level - 1],
                    widths[level - 1],
                    kernel_sizes[level - 1],
                    (1,) * ndim,
                )
            )
            self.heads.append(conv(widths[level - 1], num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return encode_decode(self, self.stem(x))

    @property
    def output_scales(self) -> list[tuple[int, ...]]:
        return deep_supervision_scales(self.strides, self.ndim)


@register_model("mobile_unet")
def mobile_unet(**kwargs) -> MobileUNet:
    return MobileUNet(**kwargs)
