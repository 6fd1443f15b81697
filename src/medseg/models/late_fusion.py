"""Late fusion for multi-modal segmentation: one encoder per modality, HeMIS-style fusion.

Each input channel (modality) has its own U-Net encoder. At every encoder level the
features of the modalities that are present are fused by their mean and variance over
modalities (HeMIS, Havaei et al. 2016), which is defined for any non-empty subset of
modalities; a 1x1 convolution maps ``[mean, variance]`` back to the level's width and one
shared U-Net decoder (skips from the fused levels, deep supervision heads) segments.

A modality is absent for a sample when its input channel is all zero, the convention of
modality dropout (:mod:`medseg.transforms.modality_dropout`) and of prediction with
missing channels; ``available`` can also be given explicitly. A modality absent from the
whole batch is not encoded at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.models.registry import register_model
from medseg.models.unet import PlainBlock, ResidualBlock, deep_supervision_scales


def channel_availability(x: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` boolean: True where channel ``c`` of sample ``b`` is not all zero."""
    return x.detach().flatten(2).abs().amax(dim=2) > 0


class LateFusionUNet(nn.Module):
    """U-Net with one encoder per input channel, fused by mean and variance per level.

    Parameters are those of :class:`medseg.models.unet.UNet`: ``in_channels`` is the
    number of modalities (one encoder each), the other options come from the plan.
    In training mode with ``deep_supervision`` the forward pass returns a list of logits,
    full resolution first; otherwise one tensor of logits.
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
        if in_channels < 1:
            raise ValueError(f"late fusion needs at least one input channel, got {in_channels}")
        block = ResidualBlock if residual else PlainBlock
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.ndim = ndim
        self.in_channels = in_channels
        self.deep_supervision = deep_supervision
        self.strides = strides
        self.encoders = nn.ModuleList()
        for _ in range(in_channels):
            stages = nn.ModuleList()
            cin = 1
            for f, s, k in zip(features, strides, kernel_sizes):
                stages.append(block(ndim, cin, f, k, s, norm))
                cin = f
            self.encoders.append(stages)
        # [mean, variance] -> the level's width
        self.fusion = nn.ModuleList(conv(2 * f, f, 1) for f in features)
        transpose = nn.ConvTranspose3d if ndim == 3 else nn.ConvTranspose2d
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

    @property
    def output_scales(self) -> list[tuple[int, ...]]:
        """Downsampling factor of each deep-supervision output, full resolution first."""
        return deep_supervision_scales(self.strides, self.ndim)

    def fused_features(
        self, x: torch.Tensor, available: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The fused feature map of every encoder level, full resolution first."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        if available is None:
            available = channel_availability(x)
        available = available.to(device=x.device, dtype=torch.bool)
        # A sample with no channel at all (an all-zero input): fuse every modality.
        available = available | ~available.any(dim=1, keepdim=True)
        weights = available.to(x.dtype)
        counts = weights.sum(dim=1)
        used = [c for c in range(self.in_channels) if bool(available[:, c].any())]
        sums: list[torch.Tensor | None] = [None] * len(self.fusion)
        squares: list[torch.Tensor | None] = [None] * len(self.fusion)
        for c in used:
            h = x[:, c : c + 1]
            w = weights[:, c]
            for level, stage in enumerate(self.encoders[c]):
                h = stage(h)
                wh = w.view(-1, *([1] * (h.ndim - 1))) * h
                sums[level] = wh if sums[level] is None else sums[level] + wh
                sq = wh * h
                squares[level] = sq if squares[level] is None else squares[level] + sq
        fused = []
        for level, fuse in enumerate(self.fusion):
            shape = (-1, *([1] * (sums[level].ndim - 1)))
            mean = sums[level] / counts.view(shape)
            variance = (squares[level] / counts.view(shape) - mean * mean).clamp_min(0)
            fused.append(fuse(torch.cat((mean, variance), dim=1)))
        return fused

    def forward(
        self, x: torch.Tensor, available: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        skips = self.fused_features(x, available)
        h = skips.pop()
        outputs = []
        for up, dec, head in zip(self.upsample, self.decoder, self.heads):
            h = dec(torch.cat((up(h), skips.pop()), dim=1))
            outputs.append(head(h))
        if self.deep_supervision and self.training:
            return outputs[::-1]
        return outputs[-1]


@register_model("late_fusion")
def late_fusion(**kwargs) -> LateFusionUNet:
    return LateFusionUNet(**kwargs)
