"""FCN-8s style network: a strided encoder whose class scores from the three deepest
stages are fused coarse to fine, then upsampled to the input (Long et al., 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.registry import register_model
from medseg.models.unet import PlainBlock, ResidualBlock, _conv


class FCN(nn.Module):
    """Encoder from the plan; 1x1 score heads on the last three stages, summed after
    linear upsampling (skip fusion), then upsampled to full resolution.

    No deep supervision: the single fused output is the prediction.
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
        deep_supervision: bool = False,  # accepted for the common contract; not used
        fused_stages: int = 3,
    ) -> None:
        super().__init__()
        del deep_supervision
        n = len(features)
        strides = (
            [tuple(s) for s in strides] if strides else [(1,) * ndim] + [(2,) * ndim] * (n - 1)
        )
        kernel_sizes = [tuple(k) for k in kernel_sizes] if kernel_sizes else [(3,) * ndim] * n
        block = ResidualBlock if residual else PlainBlock
        self.ndim, self.deep_supervision = ndim, False
        self.encoder = nn.ModuleList()
        cin = in_channels
        for f, s, k in zip(features, strides, kernel_sizes):
            self.encoder.append(block(ndim, cin, f, k, s))
            cin = f
        self.fused = min(fused_stages, n)
        conv = _conv(ndim)
        # Score heads for the deepest `fused` stages, deepest first.
        self.scores = nn.ModuleList(
            conv(features[n - 1 - i], num_classes, 1) for i in range(self.fused)
        )
        self.mode = "trilinear" if ndim == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        feats = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        score = self.scores[0](feats[-1])
        for i in range(1, self.fused):
            skip = self.scores[i](feats[-1 - i])
            score = skip + F.interpolate(
                score, size=skip.shape[2:], mode=self.mode, align_corners=False
            )
        if score.shape[2:] != size:
            score = F.interpolate(score, size=size, mode=self.mode, align_corners=False)
        return score


@register_model("fcn")
def fcn(**kwargs) -> FCN:
    return FCN(**kwargs)
