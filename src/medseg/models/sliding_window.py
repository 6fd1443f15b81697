"""Sliding-window inference with Gaussian blending and mirroring test-time augmentation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@lru_cache(maxsize=8)
def gaussian_weights(patch_size: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map that favours tile centres (nnU-Net's sigma = patch/8), min > 0."""
    grids = []
    for n in patch_size:
        x = np.arange(n) - (n - 1) / 2
        grids.append(np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2))
    w = grids[0]
    for g in grids[1:]:
        w = np.multiply.outer(w, g)
    w = w / w.max()
    w = np.maximum(w, w[w > 0].min() if (w > 0).any() else 1e-8)
    return torch.from_numpy(w.astype(np.float32))


def tile_starts(size: int, patch: int, step_fraction: float) -> list[int]:
    """Evenly spread tile starts that cover ``size`` with overlap of at least 1 - step_fraction."""
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step_fraction))) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def _memory_format(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


@torch.inference_mode()
def sliding_window_logits(
    model: nn.Module,
    data: torch.Tensor,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    step_fraction: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tile_batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Blended logits ``(K, *S)`` (float32, on CPU) for a preprocessed case ``data`` of shape ``(C, *S)``.

    Tiles overlap by half a patch by default and are weighted by a Gaussian;
    ``mirror_axes`` (spatial axes, 0-based) adds the average over all flips of those axes.
    """
    device = torch.device(device)
    model.eval()
    patch = tuple(int(p) for p in patch_size)
    spatial = tuple(data.shape[1:])
    ndim = len(spatial)
    pad = [max(0, p - s) for p, s in zip(patch, spatial)]
    pad_before = [p // 2 for p in pad]
    if any(pad):
        widths: list[int] = []
        for before, total in zip(reversed(pad_before), reversed(pad)):
            widths += [before, total - before]
        data = F.pad(data, widths)
    padded = tuple(data.shape[1:])
    starts = list(
        itertools.product(*(tile_starts(s, p, step_fraction) for s, p in zip(padded, patch)))
    )
    weights = gaussian_weights(patch).to(device)
    logits = torch.zeros((num_classes, *padded), dtype=torch.float32, device=device)
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=device)
    flips = [()]
    for r in range(1, len(mirror_axes) + 1):
        flips += list(itertools.combinations([a + 2 for a in mirror_axes if a < ndim], r))
    use_amp = device.type == "cuda"
    fmt = _memory_format(ndim)
    for i in range(0, len(starts), tile_batch_size):
        batch_starts = starts[i : i + tile_batch_size]
        tiles = torch.stack(
            [
                data[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(st, patch))]
                for st in batch_starts
            ]
        ).to(device, non_blocking=True)
        tiles = tiles.contiguous(memory_format=fmt)
        out = torch.zeros(
            (len(batch_starts), num_classes, *patch), dtype=torch.float32, device=device
        )
        for axes in flips:
            x = torch.flip(tiles, axes) if axes else tiles
            with torch.autocast(device.type, enabled=use_amp):
                y = model(x)
            if isinstance(y, (list, tuple)):
                y = y[0]
            y = y.float()
            out += torch.flip(y, axes) if axes else y
        out *= weights / len(flips)
        for tile, st in zip(out, batch_starts):
            region = tuple(slice(s, s + p) for s, p in zip(st, patch))
            logits[(slice(None),) + region] += tile
            weight_sum[region] += weights
    logits /= weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    return logits[(slice(None),) + crop].cpu()
