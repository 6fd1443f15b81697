"""Attribution maps for one class of a segmentation, inside a region (captum).

A segmentation network has one output per voxel and class, so "why class C" needs a scalar
target. Here it is the mean logit of class C over a *region*: the predicted segmentation of
that class by default (Seg-Grad-CAM's choice), or a mask the user gives. Three methods:

* ``occlusion`` (:class:`captum.attr.Occlusion`): how much the target drops when a block of
  the input is set to the baseline (0 = the normalized mean intensity); block and stride
  default to a fifth of the patch on each axis;
* ``gradcam`` (:class:`captum.attr.LayerGradCam`): gradient-weighted activations of the last
  convolution with a kernel larger than 1 (the decoder's finest stage), ReLU, upsampled;
* ``integrated_gradients`` (:class:`captum.attr.IntegratedGradients`): gradients integrated
  from a zero baseline, 32 steps; the channels are summed.

The network sees one window of the plan's patch size centred on the region (the whole case
when it is smaller), as it does in training; attributions outside the window are 0. Maps are
returned in the geometry of the input image.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion
from torch import nn

from medseg.errors import MedsegError
from medseg.imaging.morphology import dilate
from medseg.inference.predictor import Predictor, resample_to, uncrop
from medseg.io.image import Image
from medseg.preprocessing.preprocess import CaseGeometry

METHODS = ("occlusion", "gradcam", "integrated_gradients")
GEOMETRY_TOLERANCE = 1e-3  # mm (spacing, origin) and direction cosines


@dataclass(frozen=True)
class Explanation:
    """An attribution map of one class in one region of one case.

    ``attribution`` and ``region`` are in the input image's geometry. ``mass_in_region`` and
    ``mass_in_dilated_region`` are the shares of the positive attribution inside the region
    and inside the region dilated by ``dilation_voxels`` voxels.
    """

    method: str
    class_value: int
    class_name: str
    attribution: Image
    region: Image
    image: Image
    seconds: float
    target: float
    mass_in_region: float
    mass_in_dilated_region: float
    dilation_voxels: int
    settings: dict


class RegionTarget(nn.Module):
    """A segmentation network as ``(N, C, *P) -> (N,)``: mean logit of a class over a region."""

    def __init__(self, network: nn.Module, region: torch.Tensor, class_index: int) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("region", region.float())
        self.class_index = class_index
        self.size = float(region.sum().clamp_min(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        if isinstance(y, (list, tuple)):
            y = y[0]
        logit = y[:, self.class_index].float()
        return (logit * self.region).flatten(1).sum(1) / self.size


def resolve_class(labels: dict[int, str], value: str | int) -> tuple[int, str]:
    """The label value and name of ``value`` (a name or a number); one-line error if absent."""
    key = str(value).strip()
    for v, name in labels.items():
        if key == str(v) or key.lower() == name.lower():
            if v == 0:
                raise MedsegError(
                    "class 0 (background) cannot be explained; name a foreground class"
                )
            return v, name
    known = ", ".join(f"{v} ({n})" for v, n in labels.items() if v != 0)
    raise MedsegError(f"class {key!r} is not in the model (its classes: {known})")


def check_region_geometry(region: Image, image: Image, *, source: str = "region mask") -> None:
    """One-line error when a region mask is not on the image's grid."""
    problems = []
    if region.shape != image.shape:
        problems.append(f"shape {region.shape} vs {image.shape}")
    elif not np.allclose(region.spacing, image.spacing, atol=GEOMETRY_TOLERANCE):
        problems.append(f"spacing {region.spacing} vs {image.spacing}")
    elif not np.allclose(region.origin, image.origin, atol=GEOMETRY_TOLERANCE):
        problems.append(f"origin {region.origin} vs {image.origin}")
    elif not np.allclose(region.direction, image.direction, atol=GEOMETRY_TOLERANCE):
        problems.append("direction differs")
    if problems:
        raise MedsegError(f"{source}: another geometry than the image ({problems[0]})")


def _to_network_grid(
    mask: np.ndarray, geometry: CaseGeometry, shape: tuple[int, ...]
) -> np.ndarray:
    """A mask of the original grid on the preprocessed (cropped, resampled) grid."""
    cropped = mask[tuple(slice(a, b) for a, b in geometry.bbox)]
    if cropped.shape == tuple(shape):
        return cropped.astype(bool)
    t = torch.from_numpy(cropped.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5


def _window(region: np.ndarray, patch: tuple[int, ...]) -> tuple[slice, ...]:
    """The patch-sized window centred on the region's bounding box (clipped to the volume)."""
    where = np.nonzero(region)
    slices = []
    for axis, (n, p) in enumerate(zip(region.shape, patch, strict=True)):
        if n <= p:
            slices.append(slice(0, n))
            continue
        centre = (int(where[axis].min()) + int(where[axis].max())) // 2 if where[0].size else n // 2
        start = min(max(0, centre - p // 2), n - p)
        slices.append(slice(start, start + p))
    return tuple(slices)


def _last_spatial_conv(network: nn.Module) -> nn.Module:
    layer = None
    for module in network.modules():
        convolution = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        if isinstance(module, convolution) and max(module.kernel_size) > 1:
            layer = module
    if layer is None:
        raise MedsegError("gradcam needs a convolution with a kernel larger than 1 in the network")
    return layer


def _per_axis(values: tuple[int, ...] | None, ndim: int) -> tuple[int, ...] | None:
    """One number for every axis, or one per axis; one-line error otherwise."""
    if values is None:
        return None
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        return values * ndim
    if len(values) != ndim or min(values) < 1:
        raise MedsegError(f"occlusion block/stride {values}: give 1 or {ndim} positive numbers")
    return values


def default_occlusion_window(patch: tuple[int, ...]) -> tuple[int, ...]:
    """Block size of occlusion when none is given: a fifth of the patch (at least 2)."""
    return tuple(max(2, math.ceil(p / 5)) for p in patch)


def attribute(
    target: RegionTarget,
    x: torch.Tensor,
    method: str,
    *,
    window: tuple[int, ...] | None = None,
    stride: tuple[int, ...] | None = None,
    steps: int = 32,
    batch: int = 8,
) -> torch.Tensor:
    """``(*P)`` attribution of ``target`` for one input window ``x`` of shape ``(1, C, *P)``."""
    spatial = tuple(x.shape[2:])
    channels = x.shape[1]
    if method == "occlusion":
        window = _per_axis(window, len(spatial)) or default_occlusion_window(spatial)
        stride = _per_axis(stride, len(spatial)) or window
        attr = Occlusion(target).attribute(
            x,
            sliding_window_shapes=(channels, *window),
            strides=(channels, *stride),
            baselines=0.0,
            perturbations_per_eval=batch,
        )
        return attr[0].sum(0)
    if method == "integrated_gradients":
        attr = IntegratedGradients(target).attribute(
            x, baselines=torch.zeros_like(x), n_steps=steps, internal_batch_size=batch
        )
        return attr[0].sum(0)
    if method == "gradcam":
        layer = _last_spatial_conv(target.network)
        cam = LayerGradCam(target, layer).attribute(x, relu_attributions=True)
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        return LayerAttribution.interpolate(cam, spatial, interpolate_mode=mode)[0].sum(0)
    raise MedsegError(f"unknown attribution method {method!r} (use one of {', '.join(METHODS)})")


def positive_mass_share(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive attribution mass inside ``mask`` (NaN when there is none)."""
    positive = np.clip(attribution, 0, None)
    total = float(positive.sum())
    return float(positive[mask].sum()) / total if total > 0 else float("nan")


def explain_case(
    predictor: Predictor,
    channels: list[Image],
    *,
    method: str,
    class_value: str | int,
    region: Image | None = None,
    region_source: str = "region mask",
    window: tuple[int, ...] | None = None,
    stride: tuple[int, ...] | None = None,
    steps: int = 32,
    dilation_voxels: int = 3,
) -> Explanation:
    """Attribution of one class of one case, inside ``region`` (default: its segmentation).

    Parameters
    ----------
    predictor
        A loaded PyTorch :class:`~medseg.inference.Predictor`; its first fold is explained.
    channels
        The case's channels.
    method
        One of :data:`METHODS`.
    class_value
        A class name or label value of the model.
    region
        A mask in the image's geometry (non-zero inside); default: the predicted class.
    region_source
        Named in the error when ``region`` has another geometry.
    window, stride
        Occlusion block and stride in network voxels (default: a fifth of the patch).
    steps
        Integrated-gradients steps.
    dilation_voxels
        Margin for :attr:`Explanation.mass_in_dilated_region`.
    """
    if method not in METHODS:
        raise MedsegError(
            f"unknown attribution method {method!r} (use one of {', '.join(METHODS)})"
        )
    if predictor.backend != "torch":
        raise MedsegError("explanations need the torch backend (gradients, forward passes)")
    labels = {int(v): str(n) for v, n in predictor.plan.labels}
    value, name = resolve_class(labels, class_value)
    reference = channels[0]
    if region is not None:
        check_region_geometry(region, reference, source=region_source)
    started = time.perf_counter()
    data, geometry = predictor.prepare(channels)
    spatial = tuple(data.shape[1:])
    if region is None:
        label, _ = predictor.infer(data, geometry, reference, postprocess=True)
        region_full = label.array == value
        if not region_full.any():
            raise MedsegError(
                f"the model predicts no {name!r} in this image: give a region (--region MASK)"
            )
    else:
        region_full = np.asarray(region.array) != 0
        if not region_full.any():
            raise MedsegError(f"{region_source}: the region mask is empty")
    region_net = _to_network_grid(region_full, geometry, spatial)
    if not region_net.any():
        raise MedsegError(f"{region_source}: the region lies outside the part the network sees")
    box = _window(region_net, tuple(predictor.plan.patch_size))
    x = torch.from_numpy(np.ascontiguousarray(data[(slice(None), *box)]))[None]
    region_window = torch.from_numpy(region_net[box].astype(np.float32))[None]
    # a case smaller than the patch is padded to it (as the sliding window does): the
    # network's strides need it; the padding is cut off the attribution again
    inner = tuple(x.shape[2:])
    before = [(p - n) // 2 for p, n in zip(predictor.plan.patch_size, inner, strict=True)]
    widths: list[int] = []
    for b, p, n in reversed(list(zip(before, predictor.plan.patch_size, inner, strict=True))):
        widths += [b, p - n - b]
    if any(widths):
        x = F.pad(x, widths)
        region_window = F.pad(region_window, widths)
    unpad = tuple(slice(b, b + n) for b, n in zip(before, inner, strict=True))
    block = _per_axis(window, len(spatial)) or default_occlusion_window(tuple(x.shape[2:]))
    step = _per_axis(stride, len(spatial)) or block
    network = predictor.models[0]
    target = RegionTarget(network, region_window, value).eval()
    with torch.no_grad():
        score = float(target(x)[0])
    if method == "occlusion":
        with torch.no_grad():
            attr = attribute(target, x, method, window=block, stride=step, steps=steps)
    else:
        attr = attribute(target, x.requires_grad_(True), method, steps=steps)
    full = torch.zeros(spatial, dtype=torch.float32)
    full[box] = attr.detach().float()[unpad]
    attribution = uncrop(resample_to(full, geometry), geometry).astype(np.float32)
    seconds = time.perf_counter() - started
    dilated = dilate(region_full, float(dilation_voxels), (1.0,) * region_full.ndim)
    return Explanation(
        method=method,
        class_value=value,
        class_name=name,
        attribution=reference.with_array(attribution),
        region=reference.with_array(region_full.astype(np.uint8)),
        image=reference,
        seconds=seconds,
        target=score,
        mass_in_region=positive_mass_share(attribution, region_full),
        mass_in_dilated_region=positive_mass_share(attribution, dilated),
        dilation_voxels=dilation_voxels,
        settings={
            "fold": predictor.folds[0],
            "window_start": [s.start for s in box],
            "window_shape": [s.stop - s.start for s in box],
            "occlusion_block": list(window or default_occlusion_window(tuple(x.shape[2:])))
            if method == "occlusion"
            else None,
            "occlusion_stride": list(
                stride or window or default_occlusion_window(tuple(x.shape[2:]))
            )
            if method == "occlusion"
            else None,
            "steps": steps if method == "integrated_gradients" else None,
            "region": "segmentation" if region is None else region_source,
        },
    )
