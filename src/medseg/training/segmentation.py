"""Segmentation as a training task: patches of preprocessed cases, deep-supervision loss,
validation Dice of whole cases (see :class:`medseg.training.engine.Engine`)."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.imaging import dice_per_class
from medseg.losses import DeepSupervisionLoss, create_loss
from medseg.losses.zoo import class_frequencies, class_weights_from_frequencies
from medseg.model_folder import build_network
from medseg.models.sliding_window import sliding_window_logits
from medseg.planning.plan import Plan
from medseg.preprocessing.preprocess import LoadedCase, load_preprocessed
from medseg.runtime import memory_format
from medseg.serialization import to_jsonable, write_json_atomic
from medseg.training.config import TrainConfig
from medseg.training.distributed import rank_seed
from medseg.training.engine import LoopConfig, TrainingTask, Validation
from medseg.training.finetune import frozen_names, load_matching_weights, set_frozen
from medseg.training.sampling import PatchSampler, region_size
from medseg.transforms.augment import BatchAugmenter
from medseg.transforms.modality_dropout import ModalityDropout


def fold_seed(config: TrainConfig) -> int:
    """The seed of a fold's run: ``seed + 1000 * fold``."""
    return config.seed + 1000 * config.fold


def loop_config(config: TrainConfig) -> LoopConfig:
    """The engine settings of a segmentation :class:`TrainConfig` (optimizer "auto" resolved)."""
    return LoopConfig(
        iterations_per_epoch=config.iterations_per_epoch,
        max_epochs=config.max_epochs,
        time_budget_minutes=config.time_budget_minutes,
        early_stopping_patience=config.early_stopping_patience,
        optimizer=config.resolved_optimizer(),
        learning_rate=config.resolved_learning_rate(),
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        warmup_fraction=config.warmup_fraction,
        grad_clip=12.0,
        amp=config.amp,
        precision=config.precision,
        compile=config.compile,
        device=config.device,
        num_threads=config.num_threads,
        seed=fold_seed(config),
        tensorboard=True,
    )


def validate(
    model: nn.Module,
    cases: list[LoadedCase],
    plan: Plan,
    device: torch.device,
    *,
    mirror: bool,
) -> np.ndarray:
    """Per-class Dice averaged over validation cases, predicted whole at preprocessed resolution."""
    scores = []
    for case in cases:
        logits = sliding_window_logits(
            model,
            torch.from_numpy(np.asarray(case.data)),
            patch_size=plan.patch_size,
            num_classes=plan.num_classes,
            mirror_axes=tuple(range(plan.ndim)) if mirror else (),
            device=device,
        )
        scores.append(
            dice_per_class(logits.argmax(0).numpy(), np.asarray(case.label), plan.num_classes)
        )
    with np.errstate(all="ignore"):
        return (
            np.nanmean(np.array(scores), axis=0)
            if scores
            else np.full(plan.num_classes - 1, np.nan)
        )


class SegmentationTask(TrainingTask):
    """One fold of a segmentation dataset: what :func:`medseg.training.train_fold` trains.

    Parameters
    ----------
    plan
        The plan (network topology, patch and batch size, labels).
    preprocessed_dir
        The plan's preprocessed cases.
    fold_dir
        The fold folder (``init_from.json`` is written there when fine-tuning).
    config
        The training configuration (optimizer and rate already resolved).
    train_ids, val_ids
        The fold's cases; at most ``config.max_validation_cases`` validate.

    Notes
    -----
    Set-up order (it fixes the random streams): cases, network (torch's generator),
    fine-tuning weights, class frequencies, loss, the patch sampler (its own NumPy
    generator) and the augmenter (its own torch generator), both seeded with
    :func:`fold_seed`.
    """

    def __init__(
        self,
        plan: Plan,
        preprocessed_dir: str | os.PathLike,
        fold_dir: str | os.PathLike,
        config: TrainConfig,
        *,
        train_ids: list[str],
        val_ids: list[str],
    ) -> None:
        self.plan, self.preprocessed_dir, self.fold_dir = plan, preprocessed_dir, fold_dir
        self.config, self.train_ids, self.val_ids = config, list(train_ids), list(val_ids)
        self.batch_size = config.batch_size or plan.batch_size
        self.seed = fold_seed(config)
        self.fmt = memory_format(plan.ndim)
        names = dict(plan.labels)
        self.class_names = {c: names.get(c, str(c)) for c in range(1, plan.num_classes)}
        self.freeze: set[str] = set()
        self.modality_dropout: ModalityDropout | None = None
        self.share = slice(None)  # the slice of each batch this process makes (data parallel)
        self.gather: Any = None  # combines per-case validation scores across ranks

    @property
    def network_name(self) -> str:
        """The registered name of the network this task trains."""
        return self.config.model or self.plan.network.name

    def setup(self, device: torch.device) -> nn.Module:
        plan, config = self.plan, self.config
        self.device = device
        train_cases = load_preprocessed(self.preprocessed_dir, self.train_ids)
        self.val_cases = (
            load_preprocessed(self.preprocessed_dir, self.val_ids[: config.max_validation_cases])
            if self.val_ids
            else []
        )
        self.has_validation = bool(self.val_cases)
        options = {"encoder_weights": config.encoder_weights} if config.encoder_weights else {}
        model = build_network(
            plan, name=config.model, deep_supervision=config.deep_supervision, **options
        ).to(device)
        if config.init_from:  # a resumed run overwrites these weights from its checkpoint
            transfer = load_matching_weights(model, config.init_from)
            write_json_atomic(transfer, os.path.join(self.fold_dir, "init_from.json"))
            print(f"medseg: init-from {transfer['source']}: {transfer['summary']}", file=sys.stderr)
            if config.freeze_epochs:
                self.freeze = frozen_names(transfer["loaded"], model)
        model = model.to(memory_format=self.fmt)
        weights = list(config.class_weights) if config.class_weights else None
        frequencies = None
        if config.class_weighting or config.class_sampling == "inverse_frequency":
            frequencies = class_frequencies([c.label for c in train_cases], plan.num_classes)
            if config.class_weighting and weights is None:
                weights = list(
                    class_weights_from_frequencies(frequencies, scheme=config.class_weighting)
                )
        loss_fn = create_loss(config.loss, class_weights=weights).to(device)
        num_outputs = len(model.output_scales) if getattr(model, "deep_supervision", False) else 1
        self.criterion = DeepSupervisionLoss(loss_fn, num_outputs)
        aug = config.augmentation
        spatial = aug.enabled and (
            aug.rotation_probability > 0 or aug.scale_probability > 0 or aug.elastic_probability > 0
        )
        self.sampler = PatchSampler(
            train_cases,
            patch_size=plan.patch_size,
            region=region_size(plan.patch_size, spatial),
            batch_size=self.batch_size,
            foreground_fraction=plan.foreground_oversampling,
            seed=self.seed,
            class_sampling=config.class_sampling,
            class_frequencies=frequencies,
        )
        self.augmenter = BatchAugmenter(aug, patch_size=plan.patch_size, seed=self.seed)
        # Its own generator (seed + 1): runs without modality dropout keep their streams.
        self.modality_dropout = (
            ModalityDropout(config.modality_dropout, plan.num_channels, seed=self.seed + 1)
            if config.modality_dropout > 0
            else None
        )
        return model

    def make_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.sampler.sample()
        images, labels = images[self.share], labels[self.share]  # all of it in one process
        x, y = self.augmenter(torch.from_numpy(images), torch.from_numpy(labels))
        if self.modality_dropout is not None:
            x = self.modality_dropout(x)
        return x.contiguous(memory_format=self.fmt), y

    def forward_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[Any, torch.Tensor]:
        x, y = batch
        outputs = model(x)
        return outputs, self.criterion(outputs, y)

    def start_epoch(self, epoch: int, model: nn.Module) -> None:
        if self.freeze:  # fine-tuning: transferred layers wait for the new head
            set_frozen(model, self.freeze, frozen=epoch < self.config.freeze_epochs)

    def shard(self, *, rank: int, world: int, batch: slice, gather: Any) -> bool:
        # the sampler still draws the global batch (one stream), make_batch keeps `batch`
        self.share, self.gather = batch, gather
        self.augmenter.generator.manual_seed(rank_seed(self.seed, rank))
        self.val_cases = self.val_cases[rank::world]
        return True

    def validate(self, model: nn.Module) -> Validation:
        mirror = self.config.mirror_validation
        if self.gather is not None:  # data parallel: this rank's cases, then everyone's
            mine = [
                validate(model, [c], self.plan, self.device, mirror=mirror) for c in self.val_cases
            ]
            scores = self.gather([s.tolist() for s in mine])
            with np.errstate(all="ignore"):
                per_class = (
                    np.nanmean(np.array(scores, dtype=float), axis=0) if scores else np.array([])
                )
        else:
            per_class = (
                validate(model, self.val_cases, self.plan, self.device, mirror=mirror)
                if self.val_cases
                else np.array([])
            )
        with np.errstate(all="ignore"):
            mean = float(np.nanmean(per_class)) if per_class.size else float("nan")
        by_name = {self.class_names[c]: float(v) for c, v in enumerate(per_class, 1)}
        return Validation(
            score=mean,
            columns={"val_dice_mean": mean, **{f"val_dice_{k}": v for k, v in by_name.items()}},
            details=by_name,
        )

    def weights_metadata(self, epoch: int, score: float) -> dict[str, Any]:
        return {"network": self.network_name, "epoch": epoch, "val_dice": score}

    def state_dict(self) -> dict[str, Any]:
        state = {
            "sampler_rng": self.sampler.rng.bit_generator.state,
            "augment_rng": self.augmenter.generator.get_state(),
            "plan": to_jsonable(self.plan),
        }
        if self.modality_dropout is not None:
            state["modality_dropout_rng"] = self.modality_dropout.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        self.augmenter.generator.set_state(state["augment_rng"])
        if self.modality_dropout is not None and "modality_dropout_rng" in state:
            self.modality_dropout.generator.set_state(state["modality_dropout_rng"])
