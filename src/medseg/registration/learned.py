"""Learned unsupervised registration, VoxelMorph-style.

A small U-Net reads the fixed and moving images (two channels) and outputs a
stationary velocity field; scaling and squaring integrates it into a
diffeomorphic displacement. Losses: local normalized cross-correlation or MSE,
a gradient smoothness penalty on the velocity, and an optional soft Dice term on
warped one-hot labels (semi-supervised). Pairs are placed on a fixed canvas
centred on each image (the same centring the classical methods start from), so
a trained model registers a new pair with one forward pass.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.imaging import dice_per_class
from medseg.io.dataset import DatasetSpec, load_dataset, read_case_image, read_case_label
from medseg.io.image import Image
from medseg.losses import GradientSmoothness, LocalNCC
from medseg.model_folder import has_weights, read_weights
from medseg.models import create_model, register_model
from medseg.progress import progress
from medseg.registration.fields import (
    canvas_geometry,
    centring_transform,
    check_pair,
    compose,
    field_to_transform,
    resample_on,
    voxel_to_world_displacement,
)
from medseg.runtime import choose_device, memory_format
from medseg.serialization import from_jsonable, to_jsonable, write_json_atomic
from medseg.training.engine import Engine, LoopConfig, TrainingTask, Validation

MODEL_NAME = "voxelmorph"


# ----------------------------------------------------------------------------- warping


def identity_grid(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Voxel coordinates ``(D, *shape)`` along the tensor's spatial axes."""
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def warp(
    image: torch.Tensor, disp: torch.Tensor, *, mode: str = "bilinear", padding: str = "border"
) -> torch.Tensor:
    """Sample ``image (N, C, *S)`` at ``x + disp(x)``; ``disp (N, D, *S)`` in voxels along the axes."""
    shape = disp.shape[2:]
    loc = identity_grid(tuple(shape), disp.device)[None] + disp
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=disp.device)
    loc = loc * scale.view(1, -1, *([1] * len(shape))) - 1.0
    # grid_sample wants the last axis first in the coordinate vector
    grid = loc.movedim(1, -1).flip(-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def integrate_velocity(velocity: torch.Tensor, *, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: ``exp(v)`` as a displacement, ``phi_{2t} = phi_t o phi_t``."""
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp)
    return disp


# ----------------------------------------------------------------------------- losses


def soft_dice_loss(warped_onehot: torch.Tensor, fixed_onehot: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over foreground channels (channel 0 is background)."""
    dims = tuple(range(2, warped_onehot.ndim))
    a, b = warped_onehot[:, 1:], fixed_onehot[:, 1:]
    inter = (a * b).sum(dims)
    denom = a.sum(dims) + b.sum(dims)
    return 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


# ----------------------------------------------------------------------------- network


class _Block(nn.Sequential):
    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1) -> None:
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        super().__init__(conv(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True))


class VelocityUNet(nn.Module):
    """VoxelMorph-style U-Net: (fixed, moving) -> stationary velocity -> displacement.

    The velocity is predicted at ``1 / int_downsize`` resolution, integrated there by
    scaling and squaring and upsampled, as VoxelMorph does to save time; the decoder
    therefore stops at that resolution (full-resolution decoding would be averaged away).
    ``forward`` returns ``(displacement, velocity)`` in voxels of the input grid
    (the velocity in voxels of its coarse grid).
    """

    def __init__(
        self,
        *,
        ndim: int = 3,
        features: tuple[int, ...] = (16, 32, 32, 32),
        decoder: tuple[int, ...] = (32, 32, 32),
        int_steps: int = 7,
        int_downsize: int = 2,
    ) -> None:
        super().__init__()
        if int_downsize not in (1, 2, 4) or 2 ** (len(features) - 1) < int_downsize:
            raise ValueError(
                f"int_downsize must be 1, 2 or 4 and below the depth, got {int_downsize}"
            )
        self.ndim, self.int_steps, self.int_downsize = ndim, int_steps, int_downsize
        self.enc = nn.ModuleList()
        cin = 2
        for i, f in enumerate(features):
            self.enc.append(_Block(ndim, cin, f, stride=1 if i == 0 else 2))
            cin = f
        # up-blocks from the bottom to the velocity resolution, then plain blocks there
        n_up = len(features) - 1 - int(math.log2(int_downsize))
        skips = list(features[:-1])[::-1][:n_up]
        if len(decoder) < n_up:
            raise ValueError(f"decoder needs at least {n_up} widths, got {decoder}")
        self.dec = nn.ModuleList()
        for f, s in zip(decoder, skips):
            self.dec.append(_Block(ndim, cin + s, f))
            cin = f
        self.extra = nn.Sequential(
            *[_Block(ndim, c0, c1) for c0, c1 in zip((cin, *decoder[n_up:]), decoder[n_up:])]
        )
        cin = decoder[-1] if len(decoder) > n_up else cin
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.flow = conv(cin, ndim, 3, 1, 1)
        # a near-zero start: the first fields are close to the identity
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)
        self.n_up = n_up
        self.divisor = 2 ** (len(features) - 1)

    def velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fixed, moving], dim=1)
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
        skips = skips[:-1][::-1][: self.n_up]
        for block, skip in zip(self.dec, skips):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        # standard layout: grid_sample in the integration is faster on it
        return self.flow(self.extra(x)).contiguous()

    def forward(
        self, fixed: torch.Tensor, moving: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for t in (fixed, moving):
            if any(s % self.divisor for s in t.shape[2:]):
                raise ValueError(
                    f"input sizes must be multiples of {self.divisor}, got {tuple(t.shape[2:])}"
                )
        v = self.velocity(fixed, moving)
        return self.displacement(v, tuple(fixed.shape[2:])), v

    def displacement(self, v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Integrate a (coarse) velocity and bring it to ``shape`` in fine voxels."""
        disp = integrate_velocity(v.float(), steps=self.int_steps)
        if self.int_downsize > 1:
            mode = "trilinear" if self.ndim == 3 else "bilinear"
            disp = F.interpolate(disp, size=shape, mode=mode, align_corners=True)
            # coarse voxels -> fine voxels (align_corners keeps the end points fixed)
            ratio = [(s - 1) / max(c - 1, 1) for s, c in zip(shape, v.shape[2:])]
            disp = disp * torch.tensor(ratio, device=disp.device).view(1, -1, *([1] * self.ndim))
        return disp


@register_model(MODEL_NAME, task="registration", dims=(2, 3))
def _voxelmorph(**kwargs) -> nn.Module:
    return VelocityUNet(**kwargs)


# ----------------------------------------------------------------------------- data


def normalize_intensity(array: np.ndarray) -> np.ndarray:
    """Scale to about [0, 1] by the 0.5 and 99.5 percentiles (NCC and MSE need comparable ranges)."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def to_canvas(
    image: Image, shape: tuple[int, ...], *, reference: Image | None = None, labels: bool = False
) -> np.ndarray:
    """``image`` resampled on a canvas of ``shape`` centred like ``reference`` (default: itself).

    The canvas has the reference's spacing and direction; a moving image is centred
    on the reference by a translation (the same geometry centring as the classical
    methods' initialization).
    """
    ref = reference or image
    grid = canvas_geometry(ref, shape)
    t = centring_transform(ref, image)
    if labels:
        lab = image.with_array(np.asarray(image.array, np.int32))
        out = resample_on(
            lab, grid, t, interpolator=sitk.sitkNearestNeighbor, pixel_type=sitk.sitkInt32
        )
        return out.astype(np.int64)
    return resample_on(image.with_array(normalize_intensity(image.array)), grid, t)


def canvas_shape_for(shapes: list[tuple[int, ...]], divisor: int = 8) -> tuple[int, ...]:
    """The smallest shape holding every shape, rounded up to a multiple of ``divisor``."""
    m = np.max(np.asarray(shapes), axis=0)
    return tuple(int(math.ceil(s / divisor) * divisor) for s in m)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RegistrationTrainConfig:
    """How to train a learned registration model (frozen, round-trips to JSON)."""

    similarity: str = "ncc"  # "ncc" (local NCC) | "mse"
    ncc_window: int = 9
    smoothness_weight: float = 1.0
    dice_weight: float = 1.0  # 0: unsupervised; > 0: semi-supervised with the labels
    features: tuple[int, ...] = (16, 32, 32, 32)
    decoder: tuple[int, ...] = (32, 32, 32)
    int_steps: int = 7
    int_downsize: int = 2
    canvas_shape: tuple[int, ...] | None = None  # None: from the dataset's largest image
    learning_rate: float = 1e-3
    batch_size: int = 1
    iterations_per_epoch: int = 100
    max_epochs: int = 200
    time_budget_minutes: float | None = None
    validation_pairs: int = 8
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None


SIMILARITIES = ("ncc", "mse")


@dataclass(frozen=True)
class RegistrationTrainResult:
    model_dir: str
    epochs: int
    iterations: int
    elapsed_seconds: float
    best_epoch: int
    best_val_dice: float
    iterations_per_second: float
    stopped_because: str


@dataclass
class _Case:
    case_id: str
    image: np.ndarray
    label: np.ndarray | None


def _load_cases(
    dataset: DatasetSpec, ids: list[str], shape: tuple[int, ...], show_progress: bool
) -> list[_Case]:
    cases = []
    for cid in progress(ids, total=len(ids), desc="load pairs", enabled=show_progress):
        case = dataset.case(cid)
        image = read_case_image(dataset, case)[0]
        label = (
            to_canvas(read_case_label(dataset, case), shape, labels=True) if case.label else None
        )
        cases.append(_Case(cid, to_canvas(image, shape), label))
    return cases


def _onehot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()


def _mean_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    """Mean Dice of the foreground classes present in either map (NaN: none is)."""
    scores = [v for v in dice_per_class(a, b, num_classes) if not math.isnan(v)]
    return float(np.mean(scores)) if scores else float("nan")


def build_registration_network(config: RegistrationTrainConfig, ndim: int) -> nn.Module:
    """The untrained VoxelMorph-style network of ``config`` for ``ndim``-D images."""
    return create_model(
        MODEL_NAME,
        ndim=ndim,
        features=tuple(config.features),
        decoder=tuple(config.decoder),
        int_steps=config.int_steps,
        int_downsize=config.int_downsize,
    )


def registration_loop_config(config: RegistrationTrainConfig) -> LoopConfig:
    """The engine settings of a registration training: Adam, warm-up + cosine, fp32, no
    gradient clipping."""
    return LoopConfig(
        iterations_per_epoch=config.iterations_per_epoch,
        max_epochs=config.max_epochs,
        time_budget_minutes=config.time_budget_minutes,
        optimizer="adam",
        learning_rate=config.learning_rate,
        weight_decay=0.0,
        warmup_fraction=0.02,
        grad_clip=None,
        amp=False,
        device=config.device,
        num_threads=config.num_threads,
        seed=config.seed,
        tensorboard=False,
    )


class RegistrationTask(TrainingTask):
    """Random pairs of a dataset's cases on a fixed canvas: similarity of the warped moving
    image, smoothness of the velocity and (with labels) soft Dice of the warped labels.

    Validation: mean Dice of nearest-neighbour warped labels over fixed random pairs of
    the validation cases. Set-up order (it fixes the random streams): cases, validation
    pairs (generator ``seed + 1``), network (torch's generator), training pairs
    (generator ``seed``).
    """

    def __init__(
        self,
        dataset: DatasetSpec,
        config: RegistrationTrainConfig,
        *,
        train_ids: list[str],
        val_ids: list[str],
        num_classes: int,
        show_progress: bool,
    ) -> None:
        self.dataset, self.config = dataset, config
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        self.shape = tuple(config.canvas_shape or ())
        self.ndim, self.num_classes = len(self.shape), num_classes
        self.batch_size = config.batch_size
        self.use_labels = config.dice_weight > 0
        self.show_progress = show_progress
        self.fmt = memory_format(self.ndim)

    def setup(self, device: torch.device) -> nn.Module:
        config = self.config
        self.device = device
        self.train = _load_cases(self.dataset, self.train_ids, self.shape, self.show_progress)
        self.val = _load_cases(self.dataset, self.val_ids, self.shape, self.show_progress)
        vrng = np.random.default_rng(config.seed + 1)
        self.val_pairs = []
        if len(self.val) >= 2:
            for _ in range(config.validation_pairs):
                i, j = vrng.choice(len(self.val), 2, replace=False)
                self.val_pairs.append((int(i), int(j)))
        self.has_validation = bool(self.val_pairs)
        model = build_registration_network(config, self.ndim).to(device)
        model = model.to(memory_format=self.fmt)
        self.similarity = (
            LocalNCC(window=config.ncc_window) if config.similarity == "ncc" else nn.MSELoss()
        )
        self.smooth = GradientSmoothness()
        self.rng = np.random.default_rng(config.seed)
        return model

    def make_batch(self) -> tuple[torch.Tensor, ...]:
        train = self.train
        idx = self.rng.integers(0, len(train), size=(self.batch_size, 2))
        idx[:, 1] = np.where(idx[:, 1] == idx[:, 0], (idx[:, 1] + 1) % len(train), idx[:, 1])
        f = torch.from_numpy(np.stack([train[i].image for i in idx[:, 0]])[:, None])
        m = torch.from_numpy(np.stack([train[i].image for i in idx[:, 1]])[:, None])
        if not self.use_labels:
            return f, m
        fl = torch.from_numpy(np.stack([train[i].label for i in idx[:, 0]])[:, None])
        ml = torch.from_numpy(np.stack([train[i].label for i in idx[:, 1]])[:, None])
        return f, m, fl, ml

    def to_device(self, batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple:
        f, m, *labels = batch
        f = f.to(device).contiguous(memory_format=self.fmt)
        m = m.to(device).contiguous(memory_format=self.fmt)
        return (f, m, *(t.to(device) for t in labels))

    def forward_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, ...]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        f, m, *labels = batch
        disp, v = model(f, m)
        loss = self.similarity(warp(m, disp), f) + self.config.smoothness_weight * self.smooth(v)
        if labels:
            fl, ml = labels
            warped = warp(_onehot(ml, self.num_classes), disp)
            loss = loss + self.config.dice_weight * soft_dice_loss(
                warped, _onehot(fl, self.num_classes)
            )
        return (disp, v), loss

    @torch.no_grad()
    def validate(self, model: nn.Module) -> Validation:
        score = float("nan")
        if self.val_pairs and self.val[0].label is not None:
            scores = []
            for i, j in self.val_pairs:
                f = torch.from_numpy(self.val[i].image)[None, None].to(self.device)
                m = torch.from_numpy(self.val[j].image)[None, None].to(self.device)
                disp, _ = model(f, m)
                ml = torch.from_numpy(self.val[j].label)[None, None].float().to(self.device)
                warped = warp(ml, disp, mode="nearest").round().long()[0, 0].cpu().numpy()
                scores.append(_mean_dice(warped, self.val[i].label, self.num_classes))
            score = float(np.nanmean(scores))
        return Validation(score=score, columns={"val_dice_mean": score})

    def weights_metadata(self, epoch: int, score: float) -> dict[str, Any]:
        return {
            "network": MODEL_NAME,
            "config": to_jsonable(self.config),
            "ndim": self.ndim,
            "num_classes": self.num_classes,
            "epoch": epoch,
            "val_dice": score,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def train_registration(
    dataset: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    config: RegistrationTrainConfig | None = None,
    train_ids: list[str] | None = None,
    val_ids: list[str] | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> RegistrationTrainResult:
    """Train a learned registration model on random pairs of a dataset folder's cases.

    Runs :class:`RegistrationTask` on the training engine (:mod:`medseg.training.engine`):
    device and threads, the warm-up + cosine schedule, a resumable ``checkpoint_last.pt``,
    ``weights_best.safetensors`` by validation Dice of warped labels (and
    ``weights_last.safetensors``), ``log.csv`` and ``curves.png``, a time budget and a
    clean stop on SIGTERM/SIGINT. ``registration_config.json`` and
    ``registration_model.json`` describe the model beside its weights.
    """
    config = config or RegistrationTrainConfig()
    if config.similarity not in SIMILARITIES:
        raise MedsegError(
            f"unknown similarity {config.similarity!r} (use {' or '.join(map(repr, SIMILARITIES))})"
        )
    spec = load_dataset(dataset)
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_ids = [c.case_id for c in spec.cases]
    train_ids = list(train_ids) if train_ids is not None else all_ids
    if val_ids is None:
        rng0 = random.Random(config.seed)
        shuffled = all_ids[:]
        rng0.shuffle(shuffled)
        n_val = min(max(2, len(all_ids) // 10), 20) if len(all_ids) >= 6 else 0
        val_ids, train_ids = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
    unknown = sorted(set(train_ids + list(val_ids)) - set(all_ids))
    if unknown:
        raise MedsegError(f"{dataset}: unknown case(s) {', '.join(unknown[:5])}")
    if len(train_ids) < 2:
        raise MedsegError(f"{dataset}: registration training needs at least 2 training cases")
    if spec.num_channels != 1:
        raise MedsegError(f"{dataset}: learned registration supports single-channel images")
    if config.dice_weight > 0 and any(spec.case(c).label is None for c in train_ids):
        raise MedsegError(f"{dataset}: dice_weight > 0 needs a label for every training case")

    if config.canvas_shape is None:
        shapes = []
        for cid in all_ids:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(spec.case(cid).images[0]))
            reader.ReadImageInformation()
            shapes.append(tuple(reader.GetSize()))
        divisor = 2 ** (len(config.features) - 1) * config.int_downsize
        config = replace(config, canvas_shape=canvas_shape_for(shapes, divisor))
    ndim = len(config.canvas_shape)
    write_json_atomic(config, out / "registration_config.json")
    write_json_atomic(
        {
            "model": MODEL_NAME,
            "ndim": ndim,
            "num_classes": spec.num_classes,
            "labels": dict(spec.labels),
            "train_ids": train_ids,
            "val_ids": list(val_ids),
            "dataset": str(dataset),
        },
        out / "registration_model.json",
    )
    task = RegistrationTask(
        spec,
        config,
        train_ids=train_ids,
        val_ids=list(val_ids),
        num_classes=spec.num_classes,
        show_progress=show_progress,
    )
    engine = Engine(
        task,
        out,
        registration_loop_config(config),
        resume=resume,
        show_progress=show_progress,
    )
    loop = engine.fit()
    result = RegistrationTrainResult(
        model_dir=str(out),
        epochs=loop.epochs,
        iterations=loop.iterations,
        elapsed_seconds=round(loop.elapsed_seconds, 2),
        best_epoch=loop.best_epoch,
        best_val_dice=-1.0 if loop.best_score is None else loop.best_score,
        iterations_per_second=round(loop.iterations_per_second, 3),
        stopped_because=loop.stopped_because,
    )
    write_json_atomic(result, out / "train_result.json")
    return result


# ----------------------------------------------------------------------------- inference


@dataclass
class LearnedModel:
    """A trained registration network and the canvas it expects."""

    network: nn.Module
    config: RegistrationTrainConfig
    ndim: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # "bf16": the U-Net under bfloat16 autocast, integration in fp32


def load_registration_model(
    model_dir: str | os.PathLike,
    *,
    device: str = "auto",
    checkpoint: str = "best",
    precision: str = "fp32",
) -> LearnedModel:
    """Load the ``checkpoint`` ("best" or "last") weights of a trained model folder.

    The weights are ``weights_<checkpoint>.safetensors`` (a ``checkpoint_<checkpoint>.pt``
    of an earlier version is converted once, read with ``weights_only=True``);
    ``registration_config.json`` and ``registration_model.json`` beside them describe the
    network. ``model_dir`` may also name a weights file in such a folder.
    ``precision="bf16"`` runs the U-Net under bfloat16 autocast (the velocity is
    integrated in fp32): on CPUs with AMX/AVX-512 BF16 about 6x faster per pass.
    """
    if precision not in ("fp32", "bf16"):
        raise MedsegError(f"unknown precision {precision!r} (use 'fp32' or 'bf16')")
    path = Path(model_dir)
    kind = checkpoint
    if path.is_file():  # a weights file: its folder, and the kind its name says
        path, kind = path.parent, "last" if "last" in path.name else "best"
    if not has_weights(path, kind):
        raise MedsegError(
            f"{path}: no trained registration model (run `medseg train-registration`)"
        )
    state, metadata = read_weights(path, kind)
    config_json = metadata.get("config")
    if config_json is None:
        config_json = json.loads((path / "registration_config.json").read_text())
    ndim = metadata.get("ndim")
    if ndim is None:
        ndim = json.loads((path / "registration_model.json").read_text())["ndim"]
    config = from_jsonable(RegistrationTrainConfig, config_json)
    dev = choose_device(device)
    net = build_registration_network(config, ndim)
    net.load_state_dict(state)
    net.eval().to(dev).to(memory_format=memory_format(ndim))
    return LearnedModel(net, config, ndim, dev, precision)


@torch.no_grad()
def register_learned(
    fixed: Image,
    moving: Image,
    model: LearnedModel | str | os.PathLike,
    *,
    return_inverse: bool = False,
) -> sitk.Transform | tuple[sitk.Transform, sitk.Transform]:
    """Register a pair with one forward pass; returns the fixed -> moving ITK transform.

    Both images go on a canvas centred on the fixed image (the moving one centred on
    it by a translation), at least the training canvas and large enough for both
    images. The result composes that centring with the network's displacement field,
    which is stored on the canvas grid (world mm), so it warps like any ITK transform.
    With ``return_inverse`` it also returns the inverse, integrated from ``-v``.
    """
    if not isinstance(model, LearnedModel):
        model = load_registration_model(model)
    check_pair(fixed, moving)
    if fixed.ndim != model.ndim:
        raise MedsegError(f"fixed: the model registers {model.ndim}D images, got {fixed.ndim}D")
    divisor = model.network.divisor * model.config.int_downsize
    extent = [fixed.shape] + [
        tuple(
            np.ceil(
                np.asarray(moving.shape) * np.asarray(moving.spacing) / np.asarray(fixed.spacing)
            ).astype(int)
        )
    ]
    if model.config.canvas_shape:
        extent.append(tuple(model.config.canvas_shape))
    shape = canvas_shape_for(extent, divisor)
    f = to_canvas(fixed, shape)
    m = to_canvas(moving, shape, reference=fixed)
    # the same layout as the weights (channels-last): a mixed layout costs ~25% per pass
    fmt = memory_format(model.ndim)
    ft = torch.from_numpy(f)[None, None].to(model.device).contiguous(memory_format=fmt)
    mt = torch.from_numpy(m)[None, None].to(model.device).contiguous(memory_format=fmt)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.precision == "bf16"):
        v = model.network.velocity(ft, mt)
    v = v.float()
    disp = model.network.displacement(v, tuple(shape))
    grid = canvas_geometry(fixed, shape)

    def as_transform(d: torch.Tensor) -> sitk.Transform:
        vox = d[0].movedim(0, -1).cpu().numpy().astype(np.float64)
        return field_to_transform(voxel_to_world_displacement(vox, grid), grid)

    forward = compose(centring_transform(fixed, moving), as_transform(disp))
    if not return_inverse:
        return forward
    inv = model.network.displacement(-v, tuple(shape))
    inverse = compose(as_transform(inv), centring_transform(fixed, moving).GetInverse())
    return forward, inverse
