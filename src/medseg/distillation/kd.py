"""Knowledge distillation: soft labels of a (fold-ensemble) teacher at temperature T.

Distillation is a training configuration, not another training loop: when
``TrainConfig.distill`` is set, the workflow attaches :class:`DistillationHook` (from
:func:`make_distillation_hook`) to the training engine, which then mixes the teacher's
soft labels (and decoder features) into every step's loss.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.model_folder import ModelFolder
from medseg.planning.plan import Plan, read_plan
from medseg.runtime import resolve_precision
from medseg.serialization import write_json_atomic
from medseg.training.config import DistillConfig, TrainConfig
from medseg.training.engine import Engine, Hook
from medseg.training.finetune import check_teacher


class DecoderTap:
    """Keeps the output of every ``model.decoder`` level of the last forward pass.

    Works for any model with a ``decoder`` module list (the U-Net family), coarse level
    first, as the decoder runs.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        decoder = getattr(model, "decoder", None)
        if not isinstance(decoder, nn.ModuleList) or not len(decoder):
            raise MedsegError(
                f"feature distillation needs a U-Net-style decoder; {name} "
                f"({type(model).__name__}) has none"
            )
        self.features: list[torch.Tensor | None] = [None] * len(decoder)
        for level, module in enumerate(decoder):
            module.register_forward_hook(self._keep(level))

    def _keep(self, level: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.features[level] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        """The features of the last pass (then forgotten, so they hold no memory)."""
        features, self.features = self.features, [None] * len(self.features)
        if any(f is None for f in features):
            raise RuntimeError("decoder features missing: the forward pass skipped a level")
        return features  # type: ignore[return-value]


class Teacher(nn.Module):
    """Mean of the tempered softmax of several networks (all folds of all teacher folders)."""

    def __init__(
        self, models: list[nn.Module], *, tap_decoders: bool = False, precision: str = "fp32"
    ) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.precision = precision  # "bf16": CPU bfloat16 autocast (see DistillConfig)
        for p in self.parameters():
            p.requires_grad_(False)
        self.taps = (
            [DecoderTap(m, f"teacher network {i}") for i, m in enumerate(models)]
            if tap_decoders
            else []
        )
        self.features: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Mean tempered softmax; with decoder taps, ``self.features`` then holds each
        network's decoder features of this pass."""
        self.eval()
        total = None
        self.features = []
        bf16 = self.precision == "bf16" and x.device.type == "cpu"
        for i, model in enumerate(self.models):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = model(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            p = torch.softmax(y.float() / temperature, dim=1)
            total = p if total is None else total + p
            if self.taps:
                self.features.append(self.taps[i].take())
        return total / len(self.models)


class FeatureAdapters(nn.Module):
    """One 1x1 convolution per (teacher network, decoder level): student channels to the
    teacher's (FitNets, Romero et al. 2015). Trained with the student, dropped after."""

    def __init__(
        self, student: list[torch.Tensor], teachers: list[list[torch.Tensor]], ndim: int
    ) -> None:
        super().__init__()
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.maps = nn.ModuleList()
        for t, levels in enumerate(teachers):
            if len(levels) != len(student):
                raise MedsegError(
                    f"feature distillation: teacher network {t} has {len(levels)} decoder "
                    f"levels, the student {len(student)}"
                )
            for level, (s, f) in enumerate(zip(student, levels)):
                if s.shape[2:] != f.shape[2:]:
                    raise MedsegError(
                        f"feature distillation: decoder level {level} is "
                        f"{tuple(s.shape[2:])} in the student but {tuple(f.shape[2:])} in "
                        f"teacher network {t}; use models built from the same plan"
                    )
            self.maps.append(
                nn.ModuleList(conv(s.shape[1], f.shape[1], 1) for s, f in zip(student, levels))
            )

    def loss(self, student: list[torch.Tensor], teachers: list[list[torch.Tensor]]) -> torch.Tensor:
        terms = [
            F.mse_loss(adapter(s.float()), f.float())
            for maps, levels in zip(self.maps, teachers)
            for adapter, s, f in zip(maps, student, levels)
        ]
        return torch.stack(terms).mean()


def distillation_kl(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher_T || student_T) per voxel, summed over classes, averaged, times T^2
    (Hinton et al., 2015: keeps gradient size independent of T)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_q, teacher_probs, reduction="none").sum(1)
    return kl.mean() * temperature**2


class Distiller:
    """Turns the supervised loss into (1 - w) supervised + w * KD (+ the feature term);
    remembers the KL (and feature loss) of each step for the training log.

    With ``config.feature_weight > 0`` pass the ``student`` and a ``probe`` input (one
    plan-sized patch): one forward pass of both sizes the adapters, whose parameters
    (``self.adapters``) the trainer optimizes with the student's.
    """

    def __init__(
        self,
        teacher: Teacher,
        config: DistillConfig,
        *,
        student: nn.Module | None = None,
        probe: torch.Tensor | None = None,
    ) -> None:
        self.teacher, self.temperature, self.weight = teacher, config.temperature, config.weight
        self.feature_weight = config.feature_weight
        self.kl_values: list[float] = []
        self.feature_values: list[float] = []
        self.student_tap: DecoderTap | None = None
        self.adapters: FeatureAdapters | None = None
        if self.feature_weight > 0:
            if student is None or probe is None:
                raise ValueError("feature distillation needs the student and a probe input")
            self.student_tap = DecoderTap(student, f"the student ({type(student).__name__})")
            was_training = student.training
            with torch.no_grad():
                student.eval()
                student(probe)
                teacher.soft_labels(probe, self.temperature)
            student.train(was_training)
            self.adapters = FeatureAdapters(
                self.student_tap.take(), teacher.features, probe.ndim - 2
            ).to(probe.device)

    def __call__(
        self, supervised: torch.Tensor, outputs: torch.Tensor | list[torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        student = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        soft = self.teacher.soft_labels(x, self.temperature)
        kl = distillation_kl(student, soft, self.temperature)
        self.kl_values.append(float(kl.detach()))
        loss = (1 - self.weight) * supervised + self.weight * kl
        if self.adapters is not None and self.student_tap is not None:
            features = self.adapters.loss(self.student_tap.take(), self.teacher.features)
            self.feature_values.append(float(features.detach()))
            loss = loss + self.feature_weight * features
        return loss

    def epoch_kl(self) -> float:
        """Mean KL since the last call (for the training log)."""
        values, self.kl_values = self.kl_values, []
        return float(sum(values) / max(len(values), 1))

    def epoch_feature_loss(self) -> float:
        """Mean feature loss since the last call (NaN without feature distillation)."""
        values, self.feature_values = self.feature_values, []
        return float(sum(values) / len(values)) if values else float("nan")


def make_distiller(
    config: DistillConfig,
    plan: Plan,
    device: torch.device,
    *,
    student: nn.Module | None = None,
) -> Distiller:
    """The teacher of ``config`` (every fold of every teacher folder) on ``device``, and the
    :class:`Distiller` around it; ``student`` sizes the feature adapters when
    ``config.feature_weight > 0``."""
    models: list[nn.Module] = []
    for source in config.teachers:
        check_teacher(source, plan)
        models.extend(ModelFolder.open(source).load_networks(device=device))
    features = config.feature_weight > 0
    precision = resolve_precision(config.teacher_precision, backend="torch", device=device)
    teacher = Teacher(models, tap_decoders=features, precision=precision).to(device)
    probe = torch.zeros(1, plan.num_channels, *plan.patch_size, device=device) if features else None
    return Distiller(teacher, config, student=student, probe=probe)


class DistillationHook(Hook):
    """The engine hook of ``TrainConfig.distill``: teacher soft labels in every step's loss.

    On start it loads the teacher on the engine's device and, with feature distillation,
    sizes the adapters on the student and adds their parameters to the optimizer (they
    train with the student and are saved in the resumable checkpoint, not with the
    student's weights). Log columns: ``train_distill_kl`` (and ``train_distill_features``).

    Parameters
    ----------
    config
        The distillation settings (teachers, temperature, weights).
    plan
        The student's plan (the teachers must share its inputs and labels).
    """

    name = "distill"

    def __init__(self, config: DistillConfig, plan: Plan) -> None:
        self.config, self.plan = config, plan
        self.distiller: Distiller | None = None

    def on_start(self, engine: Engine) -> None:
        self.distiller = make_distiller(self.config, self.plan, engine.device, student=engine.model)
        if self.distiller.adapters is not None:  # trained with the student, not saved with it
            engine.optimizer.add_param_group({"params": list(self.distiller.adapters.parameters())})

    def loss(self, outputs: Any, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        """``batch`` is ``(images, labels)``: the teacher sees the same images."""
        return self._distiller()(loss, outputs, batch[0])

    def row(self, engine: Engine) -> dict[str, float]:
        distiller = self._distiller()
        row = {"train_distill_kl": distiller.epoch_kl()}
        if distiller.adapters is not None:
            row["train_distill_features"] = distiller.epoch_feature_loss()
        return row

    def state_dict(self) -> dict[str, Any]:
        adapters = self._distiller().adapters
        return {"adapters": adapters.state_dict()} if adapters is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        adapters = self._distiller().adapters
        if adapters is not None and state.get("adapters"):
            adapters.load_state_dict(state["adapters"])

    def _distiller(self) -> Distiller:
        if self.distiller is None:
            raise RuntimeError("the distillation hook has not started (no engine yet)")
        return self.distiller


def make_distillation_hook(config: DistillConfig, plan: Plan) -> DistillationHook:
    """The hook that trains a student with ``config``'s teachers (see :class:`DistillationHook`).

    Pass it to :func:`medseg.training.train_fold` (``hooks=[...]``); use a new hook for
    every fold.
    """
    return DistillationHook(config, plan)


def distill_config_for(
    work_dir: str | os.PathLike,
    teachers: list[str | os.PathLike],
    *,
    student: str = "mobile_unet",
    temperature: float = 2.0,
    weight: float = 0.5,
    feature_weight: float = 0.0,
    config: TrainConfig | None = None,
    labels: tuple[tuple[int, str], ...] | None = None,
) -> tuple[TrainConfig, Plan]:
    """The training configuration and plan of a distillation run in ``work_dir``.

    The student shares the first teacher's plan (so teacher and student see the same
    preprocessed patches) and its cross-validation splits, unless ``work_dir`` already
    has its own; the teachers are checked (against ``labels``, the dataset's, too)
    before anything is written.
    """
    if not teachers:
        raise MedsegError("distillation needs at least one teacher model folder (--teacher)")
    folders = [ModelFolder.open(t).path for t in teachers]
    work = Path(work_dir)
    plan = read_plan(work) if (work / "plan.json").exists() else read_plan(folders[0])
    if labels is not None and tuple(map(tuple, labels)) != tuple(plan.labels):
        raise MedsegError(
            f"{folders[0]}: teacher was trained with labels {dict(plan.labels)}, "
            f"the dataset has {dict(labels)}"
        )
    for folder in folders:
        check_teacher(folder, plan)
    if not (work / "plan.json").exists():
        write_json_atomic(plan, work / "plan.json")
    splits = folders[0] / "splits.json"
    if splits.exists() and not (work / "model" / "splits.json").exists():
        (work / "model").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(splits, work / "model" / "splits.json")
    distill = DistillConfig(
        teachers=tuple(str(f.resolve()) for f in folders),
        temperature=temperature,
        weight=weight,
        feature_weight=feature_weight,
    )
    return replace(config or TrainConfig(), model=student, distill=distill), plan


def _patch_seconds(models: list[nn.Module], plan: Plan, repeats: int = 3) -> float:
    """Median seconds of one forward pass of every network on one plan-sized patch."""
    x = torch.randn(1, plan.num_channels, *plan.patch_size)
    times = []
    with torch.inference_mode():
        for m in models:  # warm-up
            m.eval()(x)
        for _ in range(repeats):
            t = time.perf_counter()
            for m in models:
                m(x)
            times.append(time.perf_counter() - t)
    return float(sorted(times)[len(times) // 2])


def distillation_report(
    teachers: list[str | os.PathLike], student_dir: str | os.PathLike
) -> dict[str, Any]:
    """Student vs teacher: best validation Dice of each fold (from ``train_result.json``),
    parameters, and seconds per patch forward (the teacher as the fold ensemble it is)."""

    def dice(folder: Path) -> float | None:
        values = [
            json.loads(p.read_text())["best_val_dice"]
            for p in sorted(folder.glob("fold_*/train_result.json"))
        ]
        return float(sum(values) / len(values)) if values else None

    teacher_models: list[nn.Module] = []
    teacher_dice = []
    plan = None
    for t in teachers:
        folder = ModelFolder.open(t)
        plan = folder.plan
        teacher_models.extend(folder.load_networks(device="cpu"))
        teacher_dice.append(dice(folder.path))
    student = ModelFolder.open(student_dir)
    student_models = student.load_networks(device="cpu")
    known = [d for d in teacher_dice if d is not None]
    t_sec = _patch_seconds(teacher_models, plan)
    s_sec = _patch_seconds(student_models[:1], student.plan)
    return {
        "teacher_val_dice": float(sum(known) / len(known)) if known else None,
        "student_val_dice": dice(student.path),
        "teacher_networks": len(teacher_models),
        "teacher_parameters": sum(p.numel() for m in teacher_models for p in m.parameters()),
        "student_parameters": sum(p.numel() for p in student_models[0].parameters()),
        "teacher_seconds_per_patch": t_sec,
        "student_seconds_per_patch": s_sec,
        "speedup": t_sec / max(s_sec, 1e-9),
        "note": "validation Dice at preprocessed resolution, as logged during training; "
        "seconds on this machine's CPU, one patch, teacher = all its fold networks",
    }
