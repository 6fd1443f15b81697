"""Sliding-window inference with Gaussian blending, mirroring TTA and fold ensembles.

Tiles are run in batches through every network of an ensemble (and every mirrored
copy) inside one tile loop, so reading, padding and blending happen once per tile.
Logits are averaged over networks and flips (nnU-Net's ensembling), weighted by a
Gaussian computed once per patch size and device, and accumulated in place.

Two accumulators share the tile order (last axis outermost), so they give
bit-identical results:

* :func:`sliding_window_logits` keeps the whole ``(K, *S)`` logit volume
  (float32, or float16 / an on-disk memmap for large volumes);
* :func:`sliding_window_labels` streams: it keeps only one patch-deep slab of
  logits along the last axis and finalizes (argmax, optional entropy) every
  slab that no later tile touches, so peak memory does not grow with
  classes x voxels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.runtime import memory_format

Forward = Callable[[torch.Tensor], torch.Tensor]


@lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    grids = []
    for n in patch_size:
        x = np.arange(n) - (n - 1) / 2
        grids.append(np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2))
    w = grids[0]
    for g in grids[1:]:
        w = np.multiply.outer(w, g)
    w = w / w.max()
    w = np.maximum(w, w[w > 0].min() if (w > 0).any() else 1e-8)
    return w.astype(np.float32)


def gaussian_weights(patch_size: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map that favours tile centres (nnU-Net's sigma = patch/8), min > 0."""
    return torch.from_numpy(_gaussian_numpy(tuple(patch_size), sigma_scale).copy())


@lru_cache(maxsize=8)
def _gaussian_on(patch_size: tuple[int, ...], device: str) -> torch.Tensor:
    # Computed once per patch and device; callers never modify it.
    return gaussian_weights(patch_size).to(device)


def tile_starts(size: int, patch: int, step_fraction: float) -> list[int]:
    """Evenly spread tile starts that cover ``size`` with overlap of at least 1 - step_fraction."""
    if size <= patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step_fraction))) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def flip_sets(mirror_axes: Sequence[int], ndim: int) -> list[tuple[int, ...]]:
    """Every subset of the (spatial, 0-based) ``mirror_axes`` as tensor dims (+2), identity first."""
    axes = sorted({int(a) for a in mirror_axes if 0 <= int(a) < ndim})
    flips: list[tuple[int, ...]] = [()]
    for r in range(1, len(axes) + 1):
        flips += [tuple(a + 2 for a in c) for c in itertools.combinations(axes, r)]
    return flips


def _as_forwards(models: nn.Module | Forward | Sequence[nn.Module | Forward]) -> list[Forward]:
    if isinstance(models, nn.Module) or callable(models) and not isinstance(models, Sequence):
        models = [models]  # type: ignore[list-item]
    forwards = list(models)  # type: ignore[arg-type]
    for m in forwards:
        if isinstance(m, nn.Module):
            m.eval()
    return forwards  # type: ignore[return-value]


class _Tiling:
    """Padding and tile positions of one case; tiles ordered with the last axis outermost."""

    def __init__(self, spatial: tuple[int, ...], patch: tuple[int, ...], step: float) -> None:
        self.spatial, self.patch = spatial, patch
        pad = [max(0, p - s) for p, s in zip(patch, spatial)]
        self.pad_before = [p // 2 for p in pad]
        self.pad = pad
        self.padded = tuple(s + p for s, p in zip(spatial, pad))
        per_axis = [tile_starts(s, p, step) for s, p in zip(self.padded, patch)]
        # last axis outermost: the streaming accumulator can finish slabs early
        self.starts = [tuple(reversed(st)) for st in itertools.product(*reversed(per_axis))]

    def pad_data(self, data: torch.Tensor) -> torch.Tensor:
        if not any(self.pad):
            return data
        widths: list[int] = []
        for before, total in zip(reversed(self.pad_before), reversed(self.pad)):
            widths += [before, total - before]
        return F.pad(data, widths)


@torch.no_grad()
def _blended_tiles(
    forwards: list[Forward],
    data: torch.Tensor,
    tiling: _Tiling,
    *,
    num_classes: int,
    mirror_axes: Sequence[int],
    tile_batch_size: int,
    device: torch.device,
    cpu_bf16: bool = False,
) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
    """Yield ``(start, weighted mean logits)`` per tile, in ``tiling.starts`` order."""
    patch = tiling.patch
    ndim = len(patch)
    weights = _gaussian_on(patch, str(device))
    flips = flip_sets(mirror_axes, ndim)
    scale = 1.0 / (len(flips) * len(forwards))
    # CUDA: float16 autocast; CPU: bfloat16 only when asked (fast on CPUs with AMX/AVX512-BF16)
    use_amp = device.type == "cuda" or cpu_bf16
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    fmt = memory_format(ndim)
    starts = tiling.starts
    # Mirrored copies fill the forward batch too: one tile with 8 flips is 2 passes of 4,
    # not 8 passes of 1 (small batches leave oneDNN's kernels idle).
    per_group = max(1, tile_batch_size // len(flips))
    for i in range(0, len(starts), per_group):
        batch_starts = starts[i : i + per_group]
        tiles = torch.stack(
            [
                data[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(st, patch))]
                for st in batch_starts
            ]
        ).to(device, non_blocking=True)
        jobs = [(k, [a - 1 for a in axes]) for axes in flips for k in range(len(batch_starts))]
        out = torch.zeros((len(batch_starts), num_classes, *patch), device=device)
        for forward in forwards:
            for j in range(0, len(jobs), tile_batch_size):
                chunk = jobs[j : j + tile_batch_size]
                x = torch.stack(
                    [torch.flip(tiles[k], dims) if dims else tiles[k] for k, dims in chunk]
                ).contiguous(memory_format=fmt)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    y = forward(x)
                if isinstance(y, (list, tuple)):
                    y = y[0]
                y = y.float()
                for (k, dims), yk in zip(chunk, y):
                    out[k] += torch.flip(yk, dims) if dims else yk
        out.mul_(weights).mul_(scale)
        for k, st in enumerate(batch_starts):
            yield st, out[k]


def _inverse_weight_sum(tiling: _Tiling, device: torch.device) -> torch.Tensor:
    """1 / (sum of the Gaussian weights of the tiles covering each voxel); data-independent."""
    weights = _gaussian_on(tiling.patch, str(device))
    total = torch.zeros(tiling.padded, dtype=torch.float32, device=device)
    for st in tiling.starts:
        total[tuple(slice(s, s + p) for s, p in zip(st, tiling.patch))] += weights
    return total.reciprocal_()


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module | Forward | Sequence[nn.Module | Forward],
    data: torch.Tensor,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    step_fraction: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tile_batch_size: int = 4,
    device: torch.device | str = "cpu",
    buffer_dtype: torch.dtype = torch.float32,
    memmap_path: str | None = None,
    cpu_bf16: bool = False,
) -> torch.Tensor:
    """Blended logits ``(K, *S)`` (on CPU) for a preprocessed case ``data`` of shape ``(C, *S)``.

    Parameters
    ----------
    model
        A network, a callable ``(N, C, *P) -> (N, K, *P)`` (e.g. an onnxruntime
        session wrapper), or a list of them: an ensemble whose logits are averaged
        inside one tile loop.
    data
        Preprocessed case ``(C, *S)``.
    patch_size, num_classes
        Tile size and number of output channels.
    step_fraction
        Tile step as a fraction of the patch (0.5: half-patch overlap).
    mirror_axes
        Spatial axes (0-based) whose flips are averaged (test-time augmentation).
    tile_batch_size
        Tiles per forward pass.
    device
        Where the networks run; the accumulator stays there too.
    buffer_dtype
        ``torch.float16`` halves the accumulator's memory (for large volumes).
    memmap_path
        Accumulate into a float32 memory-mapped file at this path instead of RAM.
    cpu_bf16
        Run the networks under bfloat16 autocast on CPU (accumulation stays float32).

    Returns
    -------
    torch.Tensor
        ``(K, *S)`` float32 logits, or ``buffer_dtype`` / memmap-backed when asked.
    """
    device = torch.device(device)
    forwards = _as_forwards(model)
    patch = tuple(int(p) for p in patch_size)
    spatial = tuple(int(s) for s in data.shape[1:])
    tiling = _Tiling(spatial, patch, step_fraction)
    data = tiling.pad_data(data)
    shape = (num_classes, *tiling.padded)
    if memmap_path is not None:
        mm = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.float32, shape=shape)
        logits = torch.from_numpy(mm)
    else:
        logits = torch.zeros(shape, dtype=buffer_dtype, device=device)
    inv_weight_sum = _inverse_weight_sum(tiling, device)
    for st, tile in _blended_tiles(
        forwards,
        data,
        tiling,
        num_classes=num_classes,
        mirror_axes=mirror_axes,
        tile_batch_size=tile_batch_size,
        device=device,
        cpu_bf16=cpu_bf16,
    ):
        spatial_region = tuple(slice(s, s + p) for s, p in zip(st, patch))
        # normalized before accumulating: float16 never sees the tiny Gaussian tails
        tile.mul_(inv_weight_sum[spatial_region])
        logits[(slice(None),) + spatial_region] += tile.to(logits.device, logits.dtype)
    crop = tuple(slice(b, b + s) for b, s in zip(tiling.pad_before, spatial))
    out = logits[(slice(None),) + crop]
    return out if memmap_path is not None else out.cpu()


def _finalize_slab(
    slab: torch.Tensor, *, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    labels = slab.argmax(0)
    ent = None
    if entropy:
        p = torch.softmax(slab, dim=0)
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
    return labels, ent


@torch.no_grad()
def sliding_window_labels(
    model: nn.Module | Forward | Sequence[nn.Module | Forward],
    data: torch.Tensor,
    *,
    patch_size: Sequence[int],
    num_classes: int,
    step_fraction: float = 0.5,
    mirror_axes: Sequence[int] = (),
    tile_batch_size: int = 4,
    device: torch.device | str = "cpu",
    entropy: bool = False,
    cpu_bf16: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Argmax labels ``(*S)`` (uint8/int16) of the blended logits, streamed slab by slab.

    Same arguments as :func:`sliding_window_logits`. Only a patch-deep slab of
    logits along the last axis is held, so memory is ``K x X x Y x patch_z``
    floats plus the labels. With ``entropy`` the softmax entropy (nats, float32)
    of the blended logits is returned as well. The labels equal
    ``sliding_window_logits(...).argmax(0)`` exactly (same tile order and arithmetic).
    """
    device = torch.device(device)
    forwards = _as_forwards(model)
    patch = tuple(int(p) for p in patch_size)
    spatial = tuple(int(s) for s in data.shape[1:])
    tiling = _Tiling(spatial, patch, step_fraction)
    data = tiling.pad_data(data)
    pz = patch[-1]
    inv_weight_sum = _inverse_weight_sum(tiling, device)
    buf = torch.zeros((num_classes, *tiling.padded[:-1], pz), dtype=torch.float32, device=device)
    base = 0  # padded z index of buf[..., 0]
    label_dtype = np.uint8 if num_classes < 256 else np.int16
    labels = np.zeros(spatial, dtype=label_dtype)
    ent_out = np.zeros(spatial, dtype=np.float32) if entropy else None
    inner = tuple(slice(b, b + s) for b, s in zip(tiling.pad_before[:-1], spatial[:-1]))
    zb, zn = tiling.pad_before[-1], spatial[-1]

    def finalize(z0: int, z1: int) -> None:
        """Write padded z in [z0, z1) (held in buf from index z0 - base) to the outputs."""
        lo, hi = max(z0, zb), min(z1, zb + zn)
        if hi <= lo:
            return
        sl = (slice(None), *inner, slice(lo - base, hi - base))
        lab, ent = _finalize_slab(buf[sl], entropy=entropy)
        labels[..., lo - zb : hi - zb] = lab.cpu().numpy()
        if ent_out is not None and ent is not None:
            ent_out[..., lo - zb : hi - zb] = ent.cpu().numpy()

    for st, tile in _blended_tiles(
        forwards,
        data,
        tiling,
        num_classes=num_classes,
        mirror_axes=mirror_axes,
        tile_batch_size=tile_batch_size,
        device=device,
        cpu_bf16=cpu_bf16,
    ):
        z = st[-1]
        if z != base:  # a new slab of tiles: everything below z is final
            finalize(base, z)
            shift = z - base
            buf[..., : pz - shift] = buf[..., shift:].clone()
            buf[..., pz - shift :] = 0
            base = z
        tile.mul_(inv_weight_sum[tuple(slice(s, s + p) for s, p in zip(st, patch))])
        region = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(st[:-1], patch[:-1]))
        buf[region] += tile
    finalize(base, base + pz)
    return labels, ent_out
