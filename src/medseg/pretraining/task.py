"""Self-supervised pretraining as a :class:`~medseg.training.engine.TrainingTask` on the engine.

:func:`pretrain` plans (or takes the fine-tuning plan), preprocesses the unlabelled images
(cached), trains with :class:`medseg.training.engine.Engine` (progress bar, time budget,
resume, SIGTERM) and leaves an ordinary model folder::

    WORK/plan.json                       the plan pretrained with
    WORK/pretraining/preprocessed/<hash> the preprocessed images (cache)
    WORK/model/plan.json, pretraining.json
    WORK/model/fold_0/weights_best.safetensors   encoder.* (the U-Net's names) + pretrain_head.*
    WORK/model/fold_0/checkpoint_last.pt, log.csv, curves.png, pretrain_result.json
    WORK/model/pretraining_examples.png  inputs, what the network saw, its output

``medseg train --init-from WORK`` then loads the encoder bit-exactly; the decoder and the
heads are new and ``pretrain_head.*`` is reported as unused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure  # not pyplot: no global backend
from torch import nn

from medseg.errors import MedsegError
from medseg.model_folder import build_network
from medseg.models import create_model
from medseg.planning.plan import Plan
from medseg.pretraining.data import (
    find_images,
    load_images,
    plan_for_images,
    preprocess_images,
    select_cases,
)
from medseg.pretraining.methods import (
    METHODS,
    PretrainNetwork,
    ProjectionHead,
    ReconstructionHead,
    genesis_corrupt,
    info_nce,
    mask_grid,
    masked_mse,
    random_mask,
)
from medseg.runtime import memory_format
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training.engine import CHECKPOINT_LAST, Engine, LoopConfig, TrainingTask, Validation
from medseg.training.sampling import PatchSampler, region_size
from medseg.transforms.augment import AugmentConfig, BatchAugmenter

# MAE and Genesis: flips only (the corruption is the task); contrastive: the full default
# augmentation makes the two views.
FLIPS_ONLY = AugmentConfig(
    rotation_probability=0.0,
    scale_probability=0.0,
    noise_probability=0.0,
    blur_probability=0.0,
    brightness_probability=0.0,
    contrast_probability=0.0,
    low_resolution_probability=0.0,
    gamma_probability=0.0,
)


@dataclass(frozen=True)
class PretrainConfig:
    """How to pretrain (JSON round trip, like :class:`medseg.training.TrainConfig`).

    Parameters
    ----------
    method
        ``"mae"`` (default), ``"contrastive"`` or ``"genesis"``.
    mask_ratio
        Share of mask cells hidden (``mae``; SparK uses 0.6).
    temperature, projection_dim
        InfoNCE temperature and projection width (``contrastive``).
    iterations_per_epoch, max_epochs, max_steps, time_budget_minutes
        Engine stopping rules (``max_steps``: in all, across resumes).
    optimizer, learning_rate, weight_decay
        AdamW with warm-up and cosine decay by default.
    batch_size
        Patches per step (None: the plan's; at least 4 for ``contrastive``).
    validation_patches
        Fixed patches whose loss is logged each epoch and picks the best weights.
    """

    method: str = "mae"
    mask_ratio: float = 0.6
    temperature: float = 0.2
    projection_dim: int = 128
    iterations_per_epoch: int = 50
    max_epochs: int = 1000
    max_steps: int | None = None
    time_budget_minutes: float | None = None
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 3e-5
    batch_size: int | None = None
    validation_patches: int = 8
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    num_threads: int | None = None


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` did (also ``fold_0/pretrain_result.json``)."""

    model_dir: str
    method: str
    num_images: int
    epochs: int
    iterations: int
    elapsed_seconds: float
    first_loss: float | None  # validation loss of the first epoch
    best_loss: float | None
    iterations_per_second: float
    stopped_because: str
    examples_png: str | None


def check_pretrain_config(config: PretrainConfig) -> None:
    """Raise :class:`MedsegError` for options that cannot pretrain, before any work."""
    if config.method not in METHODS:
        raise MedsegError(
            f"unknown pretraining method {config.method!r} (use {', '.join(METHODS)})"
        )
    if not 0 < config.mask_ratio < 1:
        raise MedsegError(f"mask ratio must lie in (0, 1) (got {config.mask_ratio})")
    if config.temperature <= 0:
        raise MedsegError(f"temperature must be > 0 (got {config.temperature})")
    if config.batch_size is not None and config.batch_size < 1:
        raise MedsegError(f"batch size must be >= 1 (got {config.batch_size})")


def build_pretrain_network(plan: Plan, config: PretrainConfig) -> PretrainNetwork:
    """The plan's network's encoder and the head of ``config.method``."""
    segmentation = build_network(plan, deep_supervision=False)
    net = plan.network
    if config.method == "contrastive":
        head: nn.Module = ProjectionHead(net.features[-1], config.projection_dim)
    else:
        template = create_model(
            net.name,
            ndim=plan.ndim,
            in_channels=plan.num_channels,
            num_classes=plan.num_channels,
            features=net.features,
            strides=net.strides,
            kernel_sizes=net.kernel_sizes,
            residual=net.residual,
            deep_supervision=False,
        )
        if not all(hasattr(template, n) for n in ("upsample", "decoder", "heads")):
            raise MedsegError(
                f"{net.name}: pretraining needs a U-Net-style network (unet, resunet)"
            )
        head = ReconstructionHead(
            template, net.features, plan.ndim, mask_tokens=config.method == "mae"
        )
    return PretrainNetwork(segmentation, head, config.method)


class PretrainTask(TrainingTask):
    """Self-supervised training of the plan's encoder on preprocessed unlabelled images.

    Parameters
    ----------
    plan
        The plan (patch size, network topology).
    images_dir
        Preprocessed images (:func:`medseg.pretraining.data.preprocess_images`).
    case_ids
        The images to use.
    config
        Method and its options.

    Notes
    -----
    Random streams: the patch sampler (NumPy), the augmenter (torch) and the method's
    own generator (masks, corruptions), all seeded from ``config.seed`` and carried
    across a resume; the validation patches come from separate seeds.
    """

    has_validation = True

    def __init__(
        self, plan: Plan, images_dir: str | os.PathLike, case_ids: list[str], config: PretrainConfig
    ) -> None:
        check_pretrain_config(config)
        self.plan, self.images_dir, self.case_ids, self.config = plan, images_dir, case_ids, config
        size = config.batch_size or plan.batch_size
        self.batch_size = max(size, 4) if config.method == "contrastive" else size
        self.fmt = memory_format(plan.ndim)
        self.grid = mask_grid(plan.patch_size, plan.network.strides)

    def _streams(
        self, cases: list, seed: int
    ) -> tuple[PatchSampler, BatchAugmenter, torch.Generator]:
        contrastive = self.config.method == "contrastive"
        aug = AugmentConfig() if contrastive else FLIPS_ONLY
        sampler = PatchSampler(
            cases,
            patch_size=self.plan.patch_size,
            region=region_size(self.plan.patch_size, contrastive),
            batch_size=self.batch_size,
            foreground_fraction=0.0,
            seed=seed,
        )
        generator = torch.Generator().manual_seed(seed + 17)
        return sampler, BatchAugmenter(aug, patch_size=self.plan.patch_size, seed=seed), generator

    def setup(self, device: torch.device) -> nn.Module:
        self.device = device
        cases = load_images(self.images_dir, self.case_ids)
        model = build_pretrain_network(self.plan, self.config).to(device)
        self.sampler, self.augmenter, self.generator = self._streams(cases, self.config.seed)
        # Fixed validation patches (own streams): the logged loss is comparable across epochs.
        sampler, augmenter, generator = self._streams(cases, self.config.seed + 7919)
        batches = []
        for _ in range(max(1, -(-self.config.validation_patches // self.batch_size))):
            batches.append(self._batch(sampler, augmenter, generator))
        self.validation_batches = batches
        return model.to(memory_format=self.fmt)

    def _batch(
        self, sampler: PatchSampler, augmenter: BatchAugmenter, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = sampler.sample()
        images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        x, _ = augmenter(images, labels)
        x = x.contiguous(memory_format=self.fmt)
        method = self.config.method
        if method == "mae":
            return x, random_mask(x.shape[0], self.grid, self.config.mask_ratio, generator)
        if method == "genesis":
            return genesis_corrupt(x, generator).contiguous(memory_format=self.fmt), x
        second, _ = augmenter(images, labels)  # contrastive: a second view of each patch
        return x, second.contiguous(memory_format=self.fmt)

    def make_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.sampler, self.augmenter, self.generator)

    def forward_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[Any, torch.Tensor]:
        a, b = batch
        method = self.config.method
        if method == "mae":
            out = model(a, b)
            return out, masked_mse(out, a, b)
        if method == "genesis":
            out = model(a)
            return out, ((out.float() - b.float()) ** 2).mean()
        z = model(torch.cat((a, b)))
        n = a.shape[0]
        return z, info_nce(z[:n], z[n:], self.config.temperature)

    def validate(self, model: nn.Module) -> Validation:
        with torch.no_grad():
            losses = [
                float(self.forward_loss(model, self.to_device(b, self.device))[1])
                for b in self.validation_batches
            ]
        loss = float(np.mean(losses))
        return Validation(score=-loss, columns={"val_loss": loss}, details={"val_loss": loss})

    def weights_metadata(self, epoch: int, score: float) -> dict[str, Any]:
        return {
            "network": self.plan.network.name,
            "epoch": epoch,
            "pretraining": self.config.method,
            "val_loss": -score,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler_rng": self.sampler.rng.bit_generator.state,
            "augment_rng": self.augmenter.generator.get_state(),
            "method_rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        self.augmenter.generator.set_state(state["augment_rng"])
        self.generator.set_state(state["method_rng"])


def loop_config(config: PretrainConfig) -> LoopConfig:
    """The engine settings of a :class:`PretrainConfig`."""
    return LoopConfig(
        iterations_per_epoch=config.iterations_per_epoch,
        max_epochs=config.max_epochs,
        max_steps=config.max_steps,
        time_budget_minutes=config.time_budget_minutes,
        optimizer=config.optimizer,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        grad_clip=12.0,
        amp=config.amp,
        device=config.device,
        num_threads=config.num_threads,
        seed=config.seed,
        tensorboard=False,
    )


def _slice(volume: np.ndarray) -> np.ndarray:
    """The middle slice along the last axis of a 3D ``(C, *S)`` array, channel 0."""
    image = volume[0]
    return image[..., image.shape[-1] // 2] if image.ndim == 3 else image


def examples_figure(
    model: nn.Module, task: PretrainTask, path: str | os.PathLike, *, count: int = 4
) -> Path | None:
    """A PNG of validation patches: the image, what the network saw, its reconstruction
    (``mae`` and ``genesis``; None for ``contrastive``, which does not reconstruct)."""
    if task.config.method == "contrastive":
        return None
    model.eval()
    rows = []
    with torch.no_grad():
        for a, b in task.validation_batches:
            out = model(
                *task.to_device((a, b) if task.config.method == "mae" else (a,), task.device)
            )
            out = out.float().cpu().numpy()
            if task.config.method == "mae":
                visible = torch.nn.functional.interpolate(b, size=a.shape[2:], mode="nearest")
                seen = (a * visible).numpy()
                target = a.numpy()
                # what a user would use: the visible input, the prediction in the holes
                filled = seen + out * (1 - visible.numpy())
            else:
                seen, target, filled = a.numpy(), b.numpy(), out
            rows += [(target[i], seen[i], filled[i]) for i in range(len(target))]
            if len(rows) >= count:
                break
    rows = rows[:count]
    titles = (
        ("image", "masked input", "reconstruction")
        if task.config.method == "mae"
        else ("image", "corrupted input", "restoration")
    )
    fig = Figure(figsize=(7.5, 2.5 * len(rows)))
    for r, images in enumerate(rows):
        lo, hi = np.percentile(_slice(images[0]), [1, 99])
        for c, image in enumerate(images):
            ax = fig.add_subplot(len(rows), 3, 3 * r + c + 1)
            ax.imshow(_slice(image).T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
    fig.suptitle(
        f"medseg pretraining ({task.config.method}), fixed validation patches", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def pretrain(
    images: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    config: PretrainConfig | None = None,
    plan: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    fold: int = 0,
    resume: bool = True,
    num_workers: int = 2,
    show_progress: bool = True,
) -> PretrainResult:
    """Pretrain the plan's encoder on unlabelled images into ``work_dir/model``.

    Parameters
    ----------
    images
        A dataset folder (labels ignored) or a folder of image files, 2D or 3D.
    work_dir
        The pretraining work folder (see the module for its layout).
    config
        Method and budget (default: ``mae``, 50 iterations per epoch, no time limit).
    plan
        The fine-tuning plan (a plan JSON, or a work or model folder): the pretrained
        encoder then fits it exactly. Default: the work folder's plan, else a new one from
        the images.
    split_file, fold
        Use only the training cases of ``fold`` of this splits JSON.
    resume
        Continue from ``model/fold_0/checkpoint_last.pt`` when it exists.

    Raises
    ------
    MedsegError
        One line for a missing or empty folder, an unreadable image, an image of another
        dimensionality than the plan's, or bad options.
    """
    config = config or PretrainConfig()
    check_pretrain_config(config)
    work = Path(work_dir)
    spec = find_images(images)
    if split_file is not None:
        spec = select_cases(spec, split_file, fold)
    work.mkdir(parents=True, exist_ok=True)
    the_plan = plan_for_images(
        spec, work, plan=plan, num_workers=num_workers, show_progress=show_progress
    )
    folder = preprocess_images(
        spec, the_plan, work, num_workers=num_workers, show_progress=show_progress
    )
    model_dir = work / "model"
    fold_dir = model_dir / "fold_0"
    record = {
        "images": str(images),
        "num_images": len(spec.cases),
        "plan_from": str(plan) if plan is not None else None,
        "split_file": str(split_file) if split_file is not None else None,
        "config": config,
    }
    if resume and (fold_dir / CHECKPOINT_LAST).is_file():
        check_resumable(model_dir, the_plan, config)
    write_json_atomic(the_plan, model_dir / "plan.json")
    write_json_atomic(record, model_dir / "pretraining.json")
    write_json_atomic({**record, "model": the_plan.network.name}, fold_dir / "train_config.json")
    task = PretrainTask(the_plan, folder, [c.case_id for c in spec.cases], config)
    engine = Engine(task, fold_dir, loop_config(config), resume=resume, show_progress=show_progress)
    loop = engine.fit()
    first = engine_first_loss(fold_dir)
    png = examples_figure(loop.model, task, model_dir / "pretraining_examples.png")
    result = PretrainResult(
        model_dir=str(model_dir),
        method=config.method,
        num_images=len(spec.cases),
        epochs=loop.epochs,
        iterations=loop.iterations,
        elapsed_seconds=round(loop.elapsed_seconds, 2),
        first_loss=first,
        best_loss=None if loop.best_score is None else -loop.best_score,
        iterations_per_second=round(loop.iterations_per_second, 4),
        stopped_because=loop.stopped_because,
        examples_png=str(png) if png else None,
    )
    write_json_atomic(result, fold_dir / "pretrain_result.json")
    return result


def check_resumable(model_dir: Path, plan: Plan, config: PretrainConfig) -> None:
    """A checkpoint is continued only with the method and plan it was made with."""
    try:
        before = json.loads((model_dir / "pretraining.json").read_text())
        old_plan = json.loads((model_dir / "plan.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    method = before.get("config", {}).get("method")
    if method != config.method:
        raise MedsegError(
            f"{model_dir}: pretrained with --method {method}; continue with it, or use "
            "--no-resume or another work folder"
        )
    if old_plan.get("network") != to_jsonable(plan.network) or list(
        old_plan.get("patch_size", [])
    ) != list(plan.patch_size):
        raise MedsegError(
            f"{model_dir}: its checkpoint was made with another plan (use --no-resume or "
            "another work folder)"
        )


def engine_first_loss(fold_dir: Path) -> float | None:
    """The validation loss of the first logged epoch (``log.csv``), or None."""
    log = fold_dir / "log.csv"
    if not log.is_file():
        return None
    lines = log.read_text().splitlines()
    if len(lines) < 2:
        return None
    header = lines[0].split(",")
    if "val_loss" not in header:
        return None
    return float(lines[1].split(",")[header.index("val_loss")])


__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "PretrainTask",
    "build_pretrain_network",
    "check_pretrain_config",
    "examples_figure",
    "pretrain",
]
