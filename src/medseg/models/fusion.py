"""Fold inference-time BatchNorm into the convolution before it.

In eval mode BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` is one
convolution with rescaled weights and a shifted bias: the network does the same
arithmetic with one pass over the activations less per layer. PyTorch's
``fuse_conv_bn_eval`` does the arithmetic; this module finds the pairs.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm3d)


def fuse_conv_batchnorm(model: nn.Module) -> int:
    """Replace each ``Conv -> BatchNorm`` pair that sits next to each other in an
    ``nn.Sequential`` by one convolution (and an ``nn.Identity``), in place.

    Only for an eval-mode model: the fused network no longer updates running
    statistics. Returns the number of pairs fused (0 for instance-norm networks,
    which are left as they are).
    """
    if model.training:
        raise ValueError("fuse_conv_batchnorm needs an eval-mode model (call model.eval())")
    fused = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if (
                isinstance(conv, _CONVS)
                and isinstance(norm, _BATCHNORMS)
                and norm.track_running_stats
                and norm.num_features == conv.out_channels
            ):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
                fused += 1
    return fused
