"""Batched on-the-fly data augmentation for 2D and 3D segmentation training.

Everything works on whole batches of torch tensors, so it is cheap next to a network step on
the CPU and runs unchanged on the GPU. Random numbers come from a CPU ``torch.Generator``
(seeded once) and are moved to the tensors' device, so the same seed gives the same
augmentation on any device.

Pipeline (the nnU-Net default set, in its order):

1. spatial: rotation, isotropic scaling, optional elastic displacement and mirroring, done in
   one resampling pass with one coordinate grid for the samples that need it (bilinear for the
   image, nearest for the label; mirroring is folded into the matrix); the other samples are
   only centre-cropped and flipped, and a batch where no sample needs resampling skips it. The
   output is the central ``patch_size`` region of the transformed input. 3D on the CPU samples
   through torch's vectorised 2D kernel (see ``_sample_slabs``), 4-5x faster than its 3D one.
2. intensity (image only): gaussian noise, gaussian blur, brightness, contrast, simulated low
   resolution, inverted gamma, gamma.

Conventions for the spatial matrix (see :func:`spatial_matrix`): offsets are in voxels, in
array index order ``(d, h, w)`` (``(h, w)`` in 2D), relative to the patch centre. A positive
angle about an axis rotates the content in the plane of the two other axes ``(i, j)``, ``i < j``,
from axis ``i`` towards axis ``j`` (the direction of ``torch.rot90(x, 1, dims=(i, j))``); in 2D
the single angle rotates in the ``(h, w)`` plane. A scale ``s`` is a zoom: content appears ``s``
times larger (an object's volume is multiplied by ``s**ndim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "BatchAugmenter",
    "centre_crop",
    "spatial_matrix",
    "spatial_transform",
]

#: Range of the gaussian noise standard deviation.
NOISE_STD_RANGE = (0.0, 0.1)  # drawn as a standard deviation, as batchgenerators does
#: Range of the gaussian blur sigma, in voxels (drawn per sample, channel and axis).
BLUR_SIGMA_RANGE = (0.5, 1.0)
#: Range of the multiplicative brightness factor.
BRIGHTNESS_RANGE = (0.75, 1.25)
#: Range of the contrast factor.
CONTRAST_RANGE = (0.75, 1.25)
#: Range of the low-resolution downsampling factor.
LOW_RESOLUTION_RANGE = (1.0, 2.0)
#: Range of the gamma exponent (half of the draws below 1, half above, as in nnU-Net).
GAMMA_RANGE = (0.7, 1.5)
#: Probability of the inverted gamma transform relative to ``gamma_probability`` (0.3 -> 0.1).
INVERTED_GAMMA_FRACTION = 1.0 / 3.0

_BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA_RANGE[1])


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentation (JSON round-trip with ``asdict``).

    Parameters
    ----------
    rotation_degrees
        Angles are uniform in ``[-r, r]``, about each of the three axes in 3D, in-plane in 2D.
    rotation_probability
        Per-sample probability of a rotation.
    scale_range
        Isotropic zoom factor range (``s > 1`` enlarges the content).
    scale_probability
        Per-sample probability of a scaling.
    elastic_probability
        Per-sample probability of a smooth random displacement.
    elastic_magnitude
        Largest displacement per axis as a fraction of the patch extent along that axis.
    elastic_grid
        Control points per axis of the coarse noise that is upsampled to the displacement.
    mirror_axes
        Spatial axes (0 = first spatial axis) that flip with probability 0.5 each; axes beyond
        the data's dimensionality are ignored.
    noise_probability
        Gaussian noise with standard deviation uniform in ``[0, 0.1]``.
    blur_probability
        Gaussian blur, sigma uniform in ``[0.5, 1.0]`` voxels per channel and axis.
    brightness_probability
        Multiplication by a factor uniform in ``[0.75, 1.25]`` per channel.
    contrast_probability
        Contrast factor uniform in ``[0.75, 1.25]`` per channel, preserving mean and range.
    low_resolution_probability
        Nearest downsampling by a factor uniform in ``[1, 2]`` per channel, linear upsampling back.
    gamma_probability
        Gamma uniform in ``[0.7, 1.5]`` on intensities rescaled to ``[0, 1]`` and back (mean and
        std of the channel retained, as nnU-Net). An inverted-intensity gamma is also drawn, with
        probability ``gamma_probability / 3`` (0.1 at the default).
    enabled
        ``False`` turns everything off (the augmenter then only centre-crops).
    """

    rotation_degrees: float = 30.0
    rotation_probability: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    scale_probability: float = 0.2
    elastic_probability: float = 0.0
    elastic_magnitude: float = 0.05
    elastic_grid: int = 4
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    noise_probability: float = 0.1
    blur_probability: float = 0.2
    brightness_probability: float = 0.15
    contrast_probability: float = 0.15
    low_resolution_probability: float = 0.25
    gamma_probability: float = 0.3
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        object.__setattr__(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))
        for name in (
            "rotation_probability",
            "scale_probability",
            "elastic_probability",
            "noise_probability",
            "blur_probability",
            "brightness_probability",
            "contrast_probability",
            "low_resolution_probability",
            "gamma_probability",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must lie in [0, 1], got {value}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(
                f"AugmentConfig.scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}"
            )
        if self.elastic_grid < 2:
            raise ValueError(
                f"AugmentConfig.elastic_grid must be at least 2, got {self.elastic_grid}"
            )
        if self.elastic_magnitude < 0 or self.rotation_degrees < 0:
            raise ValueError("AugmentConfig.elastic_magnitude and rotation_degrees must be >= 0")
        if any(a < 0 for a in self.mirror_axes):
            raise ValueError(f"AugmentConfig.mirror_axes must be >= 0, got {self.mirror_axes}")


def _rotation_planes(ndim: int) -> list[tuple[int, int]]:
    """Planes ``(i, j)`` rotated by each angle: about axes 0, 1, 2 in 3D, the one plane in 2D."""
    if ndim == 2:
        return [(0, 1)]
    if ndim == 3:
        return [(1, 2), (0, 2), (0, 1)]
    raise ValueError(f"only 2D and 3D are supported, got {ndim} spatial dimensions")


def spatial_matrix(angles: torch.Tensor, scales: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Sampling matrices of rotations and zooms, mapping output offsets to input offsets.

    Parameters
    ----------
    angles
        ``(B, 1)`` in 2D or ``(B, 3)`` in 3D, in degrees (3D: about axes 0, 1, 2, applied in that
        order). A positive angle rotates the content from the first towards the second axis of
        its plane, like ``torch.rot90(x, 1, dims=(i, j))`` (see the module docstring).
    scales
        Zoom factor(s): a number, ``(B,)`` (isotropic) or ``(B, ndim)``; ``s > 1`` enlarges.

    Returns
    -------
    torch.Tensor
        ``(B, ndim, ndim)`` float64 on the device of ``angles``: input offset (voxels, index
        order, from the sampling centre) = matrix @ output offset (from the patch centre).
    """
    angles = torch.as_tensor(angles, dtype=torch.float64)
    if angles.ndim != 2 or angles.shape[1] not in (1, 3):
        raise ValueError(
            f"angles must be (B, 1) for 2D or (B, 3) for 3D, got {tuple(angles.shape)}"
        )
    ndim = 2 if angles.shape[1] == 1 else 3
    batch = angles.shape[0]
    radians = torch.deg2rad(angles)
    cos, sin = torch.cos(radians), torch.sin(radians)
    forward = torch.eye(ndim, dtype=torch.float64, device=angles.device).expand(batch, ndim, ndim)
    for k, (i, j) in enumerate(_rotation_planes(ndim)):
        rot = torch.eye(ndim, dtype=torch.float64, device=angles.device).repeat(batch, 1, 1)
        rot[:, i, i] = cos[:, k]
        rot[:, i, j] = -sin[:, k]
        rot[:, j, i] = sin[:, k]
        rot[:, j, j] = cos[:, k]
        forward = forward @ rot
    scales = torch.as_tensor(scales, dtype=torch.float64, device=angles.device)
    if scales.ndim == 0:
        scales = scales.expand(batch)
    if scales.ndim == 1:
        scales = scales[:, None].expand(batch, ndim)
    if scales.shape != (batch, ndim):
        raise ValueError(f"scales must be a number, (B,) or (B, {ndim}), got {tuple(scales.shape)}")
    # forward = diag(s) @ R; the sampling matrix is its inverse R^T @ diag(1 / s).
    return forward.transpose(1, 2) / scales[:, None, :]


def centre_crop(tensor: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """View of the central ``size`` region of the trailing axes (start ``(n - p) // 2``)."""
    spatial = tensor.shape[tensor.ndim - len(size) :]
    lead = (slice(None),) * (tensor.ndim - len(size))
    return tensor[
        lead + tuple(slice((n - p) // 2, (n - p) // 2 + p) for n, p in zip(spatial, size))
    ]


class BatchAugmenter:
    """Random spatial and intensity augmentation of a batch, cropping to ``patch_size``.

    Parameters
    ----------
    config
        Probabilities and ranges.
    patch_size
        Spatial output size (2 or 3 values).
    seed
        Seed of the CPU generator; ``None`` seeds from the operating system. Give each data
        loader worker its own seed.
    """

    def __init__(
        self, config: AugmentConfig, *, patch_size: tuple[int, ...], seed: int | None = None
    ):
        self.config = config
        self.patch_size = tuple(int(p) for p in patch_size)
        self.ndim = len(self.patch_size)
        _rotation_planes(self.ndim)  # validates the dimensionality
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    # ------------------------------------------------------------------ random draws (CPU)
    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def _uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * self._rand(*shape)

    def _draw(self, probability: float, batch: int) -> torch.Tensor:
        """Per-sample boolean mask (always consumes ``batch`` numbers, for a stable stream)."""
        return self._rand(batch) < probability

    # ------------------------------------------------------------------ entry point
    def __call__(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch and crop it to ``patch_size``.

        Parameters
        ----------
        image
            Float ``(B, C, *in_size)``.
        label
            Integer ``(B, 1, *in_size)``, ``in_size >= patch_size`` on every axis.

        Returns
        -------
        tuple of torch.Tensor
            Image ``(B, C, *patch_size)`` float32 and label ``(B, 1, *patch_size)`` int64, the
            centre region of the transformed input. Voxels sampled from outside the input get
            image 0 and label 0.
        """
        self._check(image, label)
        image = image.float()
        cfg = self.config
        if not cfg.enabled:
            return self._crop_and_flip(
                image, label, torch.zeros(image.shape[0], self.ndim, dtype=torch.bool)
            )
        image, label = self._spatial(image, label)
        image = self._intensity(image)
        return image, label

    def _check(self, image: torch.Tensor, label: torch.Tensor) -> None:
        nd = self.ndim
        if image.ndim != nd + 2:
            raise ValueError(
                f"image must be (B, C, {nd} spatial axes), got shape {tuple(image.shape)}"
            )
        if not image.is_floating_point():
            raise ValueError(f"image must be floating point, got {image.dtype}")
        if (
            label.shape[0] != image.shape[0]
            or label.shape[1] != 1
            or label.shape[2:] != image.shape[2:]
        ):
            raise ValueError(
                f"label must be (B, 1, *in_size) matching image {tuple(image.shape)}, got {tuple(label.shape)}"
            )
        if label.is_floating_point() or label.is_complex():
            raise ValueError(f"label must have an integer dtype, got {label.dtype}")
        if any(n < p for n, p in zip(image.shape[2:], self.patch_size)):
            raise ValueError(
                f"input size {tuple(image.shape[2:])} is smaller than patch_size {self.patch_size}"
            )

    # ------------------------------------------------------------------ spatial part
    def _spatial(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, nd, batch = self.config, self.ndim, image.shape[0]
        device = image.device
        rotate = self._draw(cfg.rotation_probability, batch)
        angles = self._uniform(
            -cfg.rotation_degrees, cfg.rotation_degrees, batch, 1 if nd == 2 else 3
        )
        angles = torch.where(rotate[:, None], angles, torch.zeros_like(angles))
        zoom = self._draw(cfg.scale_probability, batch)
        scales = self._uniform(*cfg.scale_range, batch)
        scales = torch.where(zoom, scales, torch.ones_like(scales))
        elastic = self._draw(cfg.elastic_probability, batch) & (cfg.elastic_magnitude > 0)
        allowed = torch.tensor([a in cfg.mirror_axes for a in range(nd)])
        flips = (self._rand(batch, nd) < 0.5) & allowed

        warp = rotate | zoom | elastic
        if not warp.any():
            return self._crop_and_flip(image, label, flips)
        idx = warp.nonzero().flatten()
        coarse = self._uniform(-1.0, 1.0, len(idx), nd, *([cfg.elastic_grid] * nd))
        coarse *= elastic[idx].double().reshape(-1, *([1] * (nd + 1)))
        matrix = spatial_matrix(angles[idx], scales[idx])
        matrix = matrix * (1.0 - 2.0 * flips[idx].double())[:, None, :]  # mirror: negate offsets
        displacement = None
        if elastic.any():
            amplitude = cfg.elastic_magnitude * torch.tensor(self.patch_size, dtype=torch.float64)
            displacement = coarse * amplitude.reshape(1, nd, *([1] * nd))
        dev_idx = idx.to(device)
        if warp.all():
            src_img, src_lab = image, label
        else:
            src_img, src_lab = image[dev_idx], label[dev_idx]
        warped_img, warped_lab = spatial_transform(
            src_img, src_lab, matrix, self.patch_size, displacement=displacement
        )
        if warp.all():
            return warped_img, warped_lab
        keep = (~warp).nonzero().flatten()
        kept_img, kept_lab = self._crop_and_flip(image, label, flips[keep], keep.to(device))
        out_image = image.new_empty((batch, image.shape[1], *self.patch_size))
        out_label = torch.empty((batch, 1, *self.patch_size), dtype=torch.int64, device=device)
        out_image[dev_idx] = warped_img
        out_label[dev_idx] = warped_lab
        out_image[keep.to(device)] = kept_img
        out_label[keep.to(device)] = kept_lab
        return out_image, out_label

    def _crop_and_flip(
        self,
        image: torch.Tensor,
        label: torch.Tensor,
        flips: torch.Tensor,
        select: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre crop (a copy) of the samples ``select`` (all if None), flipped per ``flips``."""
        img = centre_crop(image, self.patch_size)
        lab = centre_crop(label, self.patch_size)
        if select is None:
            img = img.clone(memory_format=torch.contiguous_format)
        else:
            img, lab = img[select], lab[select]
        lab = lab.to(torch.int64, memory_format=torch.contiguous_format, copy=select is None)
        for axis in range(self.ndim):
            which = flips[:, axis]
            if which.all():
                img, lab = img.flip(axis + 2), lab.flip(axis + 2)
            elif which.any():
                w = which.nonzero().flatten().to(img.device)
                img[w] = img[w].flip(axis + 2)
                lab[w] = lab[w].flip(axis + 2)
        return img, lab

    # ------------------------------------------------------------------ intensity part
    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        batch, channels = image.shape[:2]
        steps = (
            (cfg.noise_probability, self._noise),
            (cfg.blur_probability, self._blur),
            (cfg.brightness_probability, self._brightness),
            (cfg.contrast_probability, self._contrast),
            (cfg.low_resolution_probability, self._low_resolution),
            (cfg.gamma_probability * INVERTED_GAMMA_FRACTION, self._inverted_gamma),
            (cfg.gamma_probability, self._gamma),
        )
        for probability, step in steps:
            chosen = self._draw(probability, batch)
            if not chosen.any():
                continue
            if chosen.all():
                image = step(image, channels)
            else:
                idx = chosen.nonzero().flatten().to(image.device)
                image[idx] = step(image[idx], channels)
        return image

    def _per_channel(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``(b, C)`` draws -> float32 ``(b, C, 1, ..., 1)`` on ``device``."""
        return values.float().reshape(*values.shape, *([1] * self.ndim)).to(device)

    def _noise(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        std = self._uniform(*NOISE_STD_RANGE, x.shape[0])
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32)
        noise *= self._per_channel(std[:, None], noise.device)
        return x + noise.to(x.device)

    def _blur(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        sigma = self._uniform(*BLUR_SIGMA_RANGE, x.shape[0] * channels, self.ndim)
        mats = [_blur_matrix(sigma[:, k], p) for k, p in enumerate(x.shape[2:])]
        return _apply_separable(x, mats)

    def _brightness(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        factor = self._uniform(*BRIGHTNESS_RANGE, x.shape[0], channels)
        return x * self._per_channel(factor, x.device)

    def _contrast(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        factor = self._per_channel(self._uniform(*CONTRAST_RANGE, x.shape[0], channels), x.device)
        dims = tuple(range(2, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        return torch.minimum(torch.maximum((x - mean) * factor + mean, low), high)

    def _low_resolution(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        factor = self._uniform(*LOW_RESOLUTION_RANGE, x.shape[0] * channels)
        mats = [_low_resolution_matrix(factor, p) for p in x.shape[2:]]
        return _apply_separable(x, mats)

    def _gamma_values(self, b: int, channels: int) -> torch.Tensor:
        low, high = GAMMA_RANGE
        below = self._rand(b, channels) < 0.5
        small = self._uniform(low, min(1.0, high), b, channels)
        large = self._uniform(max(1.0, low), high, b, channels)
        return torch.where(below & (low < 1.0), small, large)

    def _apply_gamma(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.ndim))
        mean, std = _mean_std(x)
        low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        span = high - low
        scaled = ((x - low) / (span + 1e-7)).clamp_(0.0, 1.0)
        y = scaled.pow_(self._per_channel(gamma, x.device))  # span and low cancel in the rescaling
        new_mean, new_std = _mean_std(y)
        return (y - new_mean).mul_(std / (new_std + 1e-7)).add_(mean)

    def _gamma(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return self._apply_gamma(x, self._gamma_values(x.shape[0], channels))

    def _inverted_gamma(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return -self._apply_gamma(-x, self._gamma_values(x.shape[0], channels))


def spatial_transform(
    image: torch.Tensor,
    label: torch.Tensor,
    matrix: torch.Tensor,
    patch_size: tuple[int, ...],
    *,
    displacement: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample the central ``patch_size`` region of a batch under given sampling matrices.

    Parameters
    ----------
    image
        Float ``(b, C, *in_size)``; sampled bilinearly (trilinear in 3D), zero outside.
    label
        Integer ``(b, 1, *in_size)``; sampled by nearest neighbour, 0 outside.
    matrix
        ``(b, ndim, ndim)`` from :func:`spatial_matrix` (possibly with columns negated to mirror
        the output): input offset from the centre of the input's central ``patch_size`` region
        = matrix @ output offset from the patch centre, in voxels, index order.
    patch_size
        Output spatial size.
    displacement
        Optional ``(b, ndim, g, ..., g)`` coarse displacement in input voxels (index order),
        linearly upsampled (aligned corners) to ``patch_size`` and added to the coordinates.

    Returns
    -------
    tuple of torch.Tensor
        Image ``(b, C, *patch_size)`` float32 and label ``(b, 1, *patch_size)`` int64.
    """
    nd = len(patch_size)
    device = image.device
    in_size = tuple(image.shape[2:])
    image = image.float()
    slabs = nd == 3 and device.type == "cpu"  # see _sample_slabs
    # coordinates as grid_sample wants them (align_corners=True); z, y stay in voxels for slabs
    scale = [2.0 / max(n - 1, 1) for n in in_size]
    shift = [-1.0] * nd
    if slabs:
        scale[:2], shift[:2] = [1.0, 1.0], [0.0, 0.0]
    coords = _coordinates(matrix, in_size, tuple(patch_size), device, scale, shift)
    if displacement is not None:
        coords = _add_displacement(coords, displacement, tuple(patch_size), scale)
    if slabs:
        warped_img, warped_lab = _sample_slabs(image, label.float(), *coords)
    else:
        grid = torch.stack(coords[::-1], dim=-1)  # grid's last axis is (x, y[, z])
        warped_img = F.grid_sample(
            image, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        warped_lab = F.grid_sample(
            label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True
        )
    return warped_img, warped_lab.round_().long()


def _coordinates(
    matrix: torch.Tensor,
    in_size: tuple[int, ...],
    patch: tuple[int, ...],
    device: torch.device,
    scale: list[float],
    shift: list[float],
) -> list[torch.Tensor]:
    """Sampling coordinates, one ``(b, *patch)`` float32 tensor per spatial axis.

    Axis ``k`` holds ``scale[k] * input_voxel_index + shift[k]`` (the affine post-map is
    folded into the matrix, so it costs nothing).
    """
    nd = len(patch)
    offsets = []
    for axis, p in enumerate(patch):
        shape = [1] * (nd + 1)
        shape[axis + 1] = p
        offsets.append(
            (torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2).view(shape)
        )
    post = torch.tensor(scale, dtype=torch.float64)[None, :, None]
    matrix = torch.as_tensor(matrix, dtype=torch.float64).cpu() * post
    m = matrix.to(device=device, dtype=torch.float32).reshape(-1, nd, nd, *([1] * nd))
    coords = []
    for k, (n, p) in enumerate(zip(in_size, patch)):
        centre = (n - p) // 2 + (p - 1) / 2  # input index of the patch centre
        acc = m[:, k, 0] * offsets[0] + (centre * scale[k] + shift[k])
        for axis in range(1, nd):  # small partial sums first: one full-size pass
            acc = acc + m[:, k, axis] * offsets[axis]
        coords.append(acc)
    return coords


def _add_displacement(
    coords: list[torch.Tensor], coarse: torch.Tensor, patch: tuple[int, ...], scale: list[float]
) -> list[torch.Tensor]:
    """Add a coarse displacement ``(b, nd, g, ...)`` in voxels, upsampled linearly to ``patch``."""
    nd, device = len(patch), coords[0].device
    post = torch.tensor(scale, dtype=torch.float64).reshape(1, nd, *([1] * nd))
    field = (torch.as_tensor(coarse, dtype=torch.float64).cpu() * post).float().to(device)
    b, grid_shape = field.shape[0], field.shape[2:]
    field = field.reshape(b * nd, *grid_shape)
    ups = [_linear_upsampling_matrix(g, p).to(device) for g, p in zip(grid_shape, patch)]
    # separable upsampling, last axes first: only the final product is full-size
    for axis in range(nd - 1, 0, -1):
        field = torch.movedim(torch.movedim(field, axis + 1, -1) @ ups[axis].T, -1, axis + 1)
    dense = (ups[0] @ field.reshape(b * nd, grid_shape[0], -1)).reshape(b, nd, *patch)
    return [c + dense[:, k] for k, c in enumerate(coords)]


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std over the spatial axes, keepdim (faster than ``torch.std_mean``)."""
    flat = x.reshape(*x.shape[:2], -1)
    mean = flat.mean(dim=2, keepdim=True)
    std = torch.linalg.vector_norm(flat - mean, dim=2, keepdim=True) / math.sqrt(flat.shape[2])
    shape = (*x.shape[:2], *([1] * (x.ndim - 2)))
    return mean.view(shape), std.view(shape)


# ---------------------------------------------------------------------- sampling helpers
def _sample_slabs(
    image: torch.Tensor, label: torch.Tensor, z: torch.Tensor, y: torch.Tensor, gx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear (image) and nearest (float label) 3D sampling with zero padding, on the CPU.

    torch's 3D ``grid_sample`` is not vectorised on the CPU; its 2D kernel is, and is several
    times faster. The slices are stacked into one tall 2D image, with a zero row after each
    slice and zero slices around the volume: bilinear sampling at row
    ``(slice + 1) * (H + 1) + y``, with ``y`` clamped to ``[-1, H]``, equals bilinear sampling
    of that slice with zero padding. Trilinear is a blend of two such samples (slices
    ``floor(z)`` and ``floor(z) + 1``, read as two channels of one strided view); nearest reads
    the slice ``round(z)``. Equal to the 3D kernel up to float32 rounding of the row coordinate.

    Parameters
    ----------
    image, label
        ``(b, C, D, H, W)`` and ``(b, 1, D, H, W)`` float.
    z, y
        Input voxel coordinates along D and H, ``(b, *patch)`` (clamped in place).
    gx
        Normalised coordinate along W (``align_corners=True``), ``(b, *patch)``.
    """
    b, c, d, h, w = image.shape
    patch = z.shape[1:]
    rows = (d + 2) * (h + 1)
    row_scale = 2.0 / (rows - 1)
    z = z.clamp_(-1.0, float(d))
    y = y.clamp_(-1.0, float(h))
    grid = torch.empty((*z.shape, 2), dtype=torch.float32, device=z.device)
    grid[..., 0].copy_(gx)
    flat_grid = grid.view(b, -1, patch[-1], 2)

    z0 = z.floor()
    fraction = (z - z0).view(b, 1, -1, patch[-1])
    torch.add(y, z0, alpha=h + 1, out=grid[..., 1])
    grid[..., 1].mul_(row_scale).add_((h + 1) * row_scale - 1.0)
    padded = F.pad(image, (0, 0, 0, 1, 1, 2))  # slices -1 .. d + 1, a zero row after each
    st = padded.stride()
    channels = []
    for ch in range(c):
        # channel 0: slices -1 .. d; channel 1: the same shifted by one slice (a view, no copy)
        pair = padded.as_strided((b, 2, rows, w), (st[0], (h + 1) * w, w, 1), ch * st[1])
        out = F.grid_sample(
            pair, flat_grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        channels.append(torch.lerp(out[:, :1], out[:, 1:], fraction))
    warped_image = (channels[0] if c == 1 else torch.cat(channels, dim=1)).view(b, c, *patch)

    torch.add(y, z.round_(), alpha=h + 1, out=grid[..., 1])
    grid[..., 1].mul_(row_scale).add_((h + 1) * row_scale - 1.0)
    slab = F.pad(label, (0, 0, 0, 1, 1, 1)).view(b, 1, rows, w)
    warped_label = F.grid_sample(
        slab, flat_grid, mode="nearest", padding_mode="zeros", align_corners=True
    )
    return warped_image, warped_label.view(b, 1, *patch)


def _linear_upsampling_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``(size_out, size_in)`` float32 matrix of linear interpolation with aligned corners."""
    pos = torch.arange(size_out, dtype=torch.float64) * ((size_in - 1) / max(size_out - 1, 1))
    i0 = pos.floor().long().clamp(max=size_in - 1)
    i1 = (i0 + 1).clamp(max=size_in - 1)
    frac = pos - i0
    mat = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    mat.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, i1), frac, accumulate=True)
    return mat.float()


def _blur_matrix(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, size, size)`` gaussian blur matrices (one sigma each), replicate at the borders."""
    taps = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1)
    weights = torch.exp(-0.5 * (taps.double() / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (n, taps)
    cols = (torch.arange(size)[:, None] + taps[None, :]).clamp(0, size - 1)  # (size, taps)
    n = sigma.shape[0]
    mat = torch.zeros(n, size, size, dtype=torch.float64)
    mat.scatter_add_(
        2, cols.expand(n, size, len(taps)), weights[:, None, :].expand(n, size, len(taps))
    )
    return mat.float()


def _low_resolution_matrix(factor: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, size, size)``: ``interpolate(nearest-exact)`` to ``round(size / f)`` then linear back.

    The index arithmetic follows torch's float32 kernels, so the result equals the two
    ``F.interpolate`` calls (align_corners=False).
    """
    n = factor.shape[0]
    small = torch.clamp(torch.round(size / factor), min=1).long()  # (n,)
    small_f = small.float()
    # linear upsampling small -> size: source position of each output voxel (float32 like torch)
    up_scale = small_f / float(size)  # float32 division of the two sizes
    j = torch.arange(size, dtype=torch.float32)
    src = (up_scale[:, None] * (j[None, :] + 0.5) - 0.5).clamp(min=0.0)
    i0 = torch.minimum(src.floor().long(), small[:, None] - 1)
    i1 = torch.minimum(i0 + 1, small[:, None] - 1)
    lam = src - i0.float()
    # nearest-exact downsampling size -> small: which input voxel each low-res voxel holds
    down_scale = float(size) / small_f
    i0_down = torch.floor(((i0.double() + 0.5) * down_scale.double()[:, None]).float()).long()
    i1_down = torch.floor(((i1.double() + 0.5) * down_scale.double()[:, None]).float()).long()
    i0_down = i0_down.clamp(max=size - 1)
    i1_down = i1_down.clamp(max=size - 1)
    mat = torch.zeros(n, size, size, dtype=torch.float32)
    mat.scatter_add_(2, i0_down[:, :, None], (1.0 - lam)[:, :, None])
    mat.scatter_add_(2, i1_down[:, :, None], lam[:, :, None])
    return mat


def _apply_separable(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """Apply one ``(b * C, P_k, P_k)`` matrix per sample and channel along each spatial axis."""
    shape = x.shape
    n = shape[0] * shape[1]
    mats = [m.to(device=x.device, dtype=x.dtype) for m in mats]
    y = torch.bmm(mats[0], x.reshape(n, shape[2], -1))  # first axis
    if len(mats) == 3:
        y = torch.matmul(mats[1][:, None], y.reshape(n, shape[2], shape[3], shape[4]))
    y = torch.bmm(y.reshape(n, -1, shape[-1]), mats[-1].transpose(1, 2))  # last axis
    return y.reshape(shape)
