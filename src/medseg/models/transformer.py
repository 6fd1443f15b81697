"""SwinUNETR (Hatamizadeh et al., 2022) from MONAI, wrapped to the plan contract.

MONAI's network needs every spatial size divisible by 32; the wrapper pads the input
(replicate) and crops the logits back, so any plan patch size works. The Swin feature
size follows the plan's first stage width, rounded to a multiple of 12 (MONAI requires
a multiple of 12). No deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.registry import register_model

_MULTIPLE = 32


class SwinUNETRSeg(nn.Module):
    def __init__(
        self,
        *,
        ndim: int,
        in_channels: int,
        num_classes: int,
        features: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[Sequence[int]] | None = None,  # noqa: ARG002 (fixed by the Swin design)
        kernel_sizes: Sequence[Sequence[int]] | None = None,  # noqa: ARG002
        residual: bool = False,  # noqa: ARG002
        deep_supervision: bool = False,  # noqa: ARG002 (not available in MONAI's model)
        feature_size: int | None = None,
        depths: Sequence[int] = (2, 2, 2, 2),
        window_size: int = 7,
    ) -> None:
        super().__init__()
        from monai.networks.nets import SwinUNETR

        if feature_size is None:
            feature_size = max(12, 12 * round(features[0] / 12))
        if feature_size % 12:
            raise ValueError(f"SwinUNETR feature_size must be a multiple of 12, got {feature_size}")
        self.ndim, self.deep_supervision = ndim, False
        self.net = SwinUNETR(
            in_channels=in_channels,
            out_channels=num_classes,
            feature_size=feature_size,
            depths=tuple(depths),
            window_size=window_size,
            spatial_dims=ndim,
            use_v2=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        target = [s + (-s) % _MULTIPLE for s in size]
        if all(t == _MULTIPLE for t in target):
            # A 1-voxel bottleneck has no instance-norm statistics: give it two.
            target[0] = 2 * _MULTIPLE
        pad = [t - s for t, s in zip(target, size)]
        if any(pad):
            widths: list[int] = []
            for p in reversed(pad):
                widths += [p // 2, p - p // 2]
            x = F.pad(x, widths, mode="replicate")
        y = self.net(x)
        if any(pad):
            y = y[
                (slice(None), slice(None))
                + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, size))
            ]
        return y


@register_model("swinunetr", tiny_options={"depths": (1, 1, 1, 1), "window_size": 4})
def swinunetr(**kwargs) -> SwinUNETRSeg:
    return SwinUNETRSeg(**kwargs)
