"""The pretraining network (the plan's U-Net encoder plus a head) and the three methods.

- ``mae``: masked image modelling for CNNs, after SparK (Tian et al., ICLR 2023). Cells of a
  grid as coarse as the encoder's deepest stage are masked; the masked input goes through
  the encoder with the mask re-applied after every stage (dense emulation of SparK's sparse
  convolutions, so no information crosses into a masked cell), the decoder fills masked
  positions with a learned token per level and reconstructs the image; the loss is the mean
  squared error on the masked voxels only.
- ``contrastive``: SimCLR-style InfoNCE (NT-Xent) between two views of every patch made by
  :class:`medseg.transforms.BatchAugmenter`, on a projection of the globally pooled deepest
  encoder features.
- ``genesis``: Models Genesis restoration (Zhou et al., MICCAI 2019): local voxel shuffling,
  a non-linear (Bezier) intensity map and in- or out-painting corrupt the patch; the
  network restores it (mean squared error over the whole patch).

The encoder's parameters keep the segmentation network's names (``encoder.*``); the head
is ``pretrain_head.*``, which fine-tuning reports as unused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError

METHODS = ("mae", "contrastive", "genesis")


def expand_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A ``(B, 1, *grid)`` visibility mask (1 = visible) brought to ``shape`` (nearest)."""
    if tuple(mask.shape[2:]) == tuple(shape):
        return mask
    return F.interpolate(mask, size=tuple(shape), mode="nearest")


def mask_grid(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Mask cells per axis: one cell per voxel of the encoder's deepest stage."""
    total = [1] * len(patch_size)
    for s in strides:
        total = [t * int(v) for t, v in zip(total, s)]
    return tuple(max(1, int(p) // t) for p, t in zip(patch_size, total))


def random_mask(
    batch: int, grid: Sequence[int], ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """``(B, 1, *grid)`` float mask with ``round(ratio * cells)`` cells hidden (0) per sample."""
    cells = int(torch.tensor(grid).prod())
    hidden = min(cells - 1, max(1, round(ratio * cells)))
    order = torch.rand(batch, cells, generator=generator).argsort(dim=1)
    mask = torch.ones(batch, cells)
    mask.scatter_(1, order[:, :hidden], 0.0)
    return mask.view(batch, 1, *grid)


class ReconstructionHead(nn.Module):
    """A U-Net decoder that maps the encoder's stages back to image channels.

    Parameters
    ----------
    template
        A U-Net-style network built for the plan with ``num_classes = in_channels``; its
        ``upsample``, ``decoder`` and last head become this head.
    features
        Widths of the encoder stages (for the mask tokens).
    ndim
        2 or 3.
    mask_tokens
        Learned fillers for masked positions at every level (``mae``).
    """

    def __init__(
        self, template: nn.Module, features: Sequence[int], ndim: int, *, mask_tokens: bool
    ) -> None:
        super().__init__()
        self.upsample = template.upsample
        self.decoder = template.decoder
        self.out = template.heads[-1]
        self.tokens = (
            nn.ParameterList(nn.Parameter(torch.zeros(1, f, *(1,) * ndim)) for f in features)
            if mask_tokens
            else None
        )

    def forward(
        self, skips: list[torch.Tensor], masks: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        if masks is not None and self.tokens is not None:  # densify (SparK)
            skips = [s * m + t * (1 - m) for s, m, t in zip(skips, masks, self.tokens)]
        x = skips[-1]
        for level, (up, dec) in enumerate(zip(self.upsample, self.decoder)):
            x = dec(torch.cat((up(x), skips[-2 - level]), dim=1))
        return self.out(x)


class ProjectionHead(nn.Module):
    """Global average pooling of the deepest stage, then a two-layer MLP (SimCLR)."""

    def __init__(self, width: int, dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim)
        )

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.mlp(deepest.mean(dim=tuple(range(2, deepest.ndim))))


class PretrainNetwork(nn.Module):
    """The segmentation network's encoder (same parameter names) and a pretraining head.

    Parameters
    ----------
    segmentation
        The plan's U-Net-style network (``encoder`` stages; only those are kept).
    head
        :class:`ReconstructionHead` or :class:`ProjectionHead`.
    method
        One of :data:`METHODS`.
    """

    def __init__(self, segmentation: nn.Module, head: nn.Module, method: str) -> None:
        super().__init__()
        encoder = getattr(segmentation, "encoder", None)
        if not isinstance(encoder, nn.ModuleList):
            raise MedsegError(
                f"{type(segmentation).__name__}: pretraining needs a U-Net-style network "
                "with encoder stages (unet, resunet)"
            )
        if method not in METHODS:
            raise MedsegError(f"unknown pretraining method {method!r} (use {', '.join(METHODS)})")
        self.encoder = encoder
        self.pretrain_head = head
        self.method = method

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Every encoder stage's output; with ``mask`` the hidden cells stay zero throughout."""
        skips, masks = [], [] if mask is not None else None
        if mask is not None:
            x = x * expand_mask(mask, x.shape[2:])
        for stage in self.encoder:
            x = stage(x)
            if mask is not None:
                m = expand_mask(mask, x.shape[2:])
                x = x * m
                masks.append(m)
            skips.append(x)
        return skips, masks

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        skips, masks = self.encode(x, mask)
        if self.method == "contrastive":
            return self.pretrain_head(skips[-1])
        return self.pretrain_head(skips, masks)


def masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden (mask 0) voxels only."""
    hidden = 1.0 - expand_mask(mask, target.shape[2:])
    squared = (output.float() - target.float()) ** 2 * hidden
    return squared.sum() / (hidden.sum() * target.shape[1]).clamp_min(1.0)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: each view's positive is the other view of its patch; the 2B - 2 others are
    negatives (cross-entropy over cosine similarities / ``temperature``)."""
    z = F.normalize(torch.cat((z1, z2)).float(), dim=1)
    n = z1.shape[0]
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e9)
    targets = torch.cat((torch.arange(n, 2 * n), torch.arange(0, n))).to(z.device)
    return F.cross_entropy(logits, targets)


# ---------------------------------------------------------------------- Models Genesis


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def bezier_intensity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random monotone-ish cubic Bezier map of intensities in ``[0, 1]`` (half the time
    inverted), as Models Genesis' non-linear transformation."""
    p1 = torch.rand(2, generator=generator)
    p2 = torch.rand(2, generator=generator)
    t = torch.linspace(0, 1, 256)
    b, c, d = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
    xs = b * p1[0] + c * p2[0] + d
    ys = b * p1[1] + c * p2[1] + d
    if _uniform(generator) < 0.5:
        ys = 1 - ys
    xs, order = xs.sort()
    ys = ys[order]
    idx = torch.searchsorted(xs, x.clamp(0, 1).flatten().contiguous()).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    w = ((x.flatten() - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0, 1)
    return (y0 + w * (y1 - y0)).view_as(x)


def _box(shape: Sequence[int], lo: float, hi: float, generator: torch.Generator) -> tuple:
    sizes = [max(1, _randint(generator, int(n * lo), max(int(n * lo), int(n * hi)))) for n in shape]
    starts = [_randint(generator, 0, max(0, n - s)) for n, s in zip(shape, sizes)]
    return tuple(slice(a, a + s) for a, s in zip(starts, sizes))


def local_shuffle(x: torch.Tensor, generator: torch.Generator, blocks: int) -> torch.Tensor:
    """Shuffle the voxels inside ``blocks`` small random windows (up to 1/10 of each axis)."""
    out = x.clone()
    shape = x.shape[1:]
    for _ in range(blocks):
        window = _box(shape, 0.0, 0.1, generator)
        patch = out[(slice(None), *window)]
        flat = patch.reshape(patch.shape[0], -1)
        perm = torch.randperm(flat.shape[1], generator=generator)
        out[(slice(None), *window)] = flat[:, perm].view_as(patch)
    return out


def in_painting(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Up to five random boxes (1/6 to 1/3 of each axis) replaced by uniform noise."""
    out = x.clone()
    count = 0
    while count == 0 or (count < 5 and _uniform(generator) < 0.95):
        window = (slice(None), *_box(x.shape[1:], 1 / 6, 1 / 3, generator))
        out[window] = torch.rand(out[window].shape, generator=generator)
        count += 1
    return out


def out_painting(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise everywhere except one to five random boxes (3/7 to 4/7 of each axis)."""
    out = torch.rand(x.shape, generator=generator)
    count = 0
    while count == 0 or (count < 5 and _uniform(generator) < 0.95):
        window = (slice(None), *_box(x.shape[1:], 3 / 7, 4 / 7, generator))
        out[window] = x[window]
        count += 1
    return out


def genesis_corrupt(
    batch: torch.Tensor,
    generator: torch.Generator,
    *,
    shuffle_probability: float = 0.5,
    nonlinear_probability: float = 0.9,
    paint_probability: float = 0.9,
    inpaint_rate: float = 0.2,
) -> torch.Tensor:
    """Models Genesis' corruptions of a ``(B, C, *S)`` batch, each image rescaled to
    ``[0, 1]`` and back (local shuffling, then the intensity map, then in/out-painting)."""
    out = torch.empty_like(batch)
    blocks = 200 if batch.ndim == 5 else 100
    for i, image in enumerate(batch):
        lo, hi = image.min(), image.max()
        u = (image - lo) / (hi - lo).clamp_min(1e-6)
        if _uniform(generator) < shuffle_probability:
            u = local_shuffle(u, generator, blocks)
        if _uniform(generator) < nonlinear_probability:
            u = bezier_intensity(u, generator)
        if _uniform(generator) < paint_probability:
            u = (
                in_painting(u, generator)
                if _uniform(generator) < inpaint_rate
                else out_painting(u, generator)
            )
        out[i] = u * (hi - lo) + lo
    return out
