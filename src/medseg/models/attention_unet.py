"""Attention U-Net: additive attention gates on the skip connections (Oktay et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.registry import register_model
from medseg.models.unet import UNet, _conv, _norm


class AttentionGate(nn.Module):
    """alpha = sigmoid(psi(relu(W_x x + W_g g))) at the gating resolution, upsampled onto x.

    ``x`` is the skip (fine), ``g`` the decoder feature one level coarser; ``W_x``
    strides by the level's stride so both meet on g's grid.
    """

    def __init__(
        self, ndim: int, skip_channels: int, gate_channels: int, stride: Sequence[int]
    ) -> None:
        super().__init__()
        conv = _conv(ndim)
        inter = max(skip_channels // 2, 1)
        self.theta = conv(skip_channels, inter, tuple(stride), tuple(stride), bias=False)
        self.phi = conv(gate_channels, inter, 1, bias=True)
        self.psi = nn.Sequential(conv(inter, 1, 1, bias=True), nn.Sigmoid())
        self.out = nn.Sequential(conv(skip_channels, skip_channels, 1), _norm(ndim, skip_channels))
        self.mode = "trilinear" if ndim == 3 else "bilinear"

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        theta = self.theta(x)
        phi = self.phi(g)
        if phi.shape[2:] != theta.shape[2:]:
            phi = F.interpolate(phi, size=theta.shape[2:], mode=self.mode, align_corners=False)
        alpha = self.psi(F.relu(theta + phi))
        alpha = F.interpolate(alpha, size=x.shape[2:], mode=self.mode, align_corners=False)
        return self.out(x * alpha)


class AttentionUNet(UNet):
    """The plan's U-Net (plain or residual blocks, deep supervision) with gated skips."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        features = [stage_out_channels(stage) for stage in self.encoder]
        self.gates = nn.ModuleList(
            AttentionGate(self.ndim, features[level - 1], features[level], self.strides[level])
            for level in range(len(features) - 1, 0, -1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for up, gate, dec, head in zip(self.upsample, self.gates, self.decoder, self.heads):
            skip = gate(skips.pop(), x)
            x = dec(torch.cat((up(x), skip), dim=1))
            outputs.append(head(x))
        if self.deep_supervision and self.training:
            return outputs[::-1]
        return outputs[-1]


def stage_out_channels(stage: nn.Module) -> int:
    """Output channels of an encoder block (the last normalization's width)."""
    norms = [m for m in stage.modules() if isinstance(m, nn.GroupNorm)]
    return norms[-1].num_channels


@register_model("attention_unet")
def attention_unet(**kwargs) -> AttentionUNet:
    return AttentionUNet(**kwargs)
