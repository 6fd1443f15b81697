"""Knowledge distillation: soft labels of a (fold-ensemble) teacher at temperature T.

Used by the trainer when ``TrainConfig.distill`` is set: distillation is a training
configuration, not another training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.planning.plan import Plan
from medseg.training.config import DistillConfig


class Teacher(nn.Module):
    """Mean of the tempered softmax of several networks (all folds of all teacher folders)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        self.eval()
        total = None
        for model in self.models:
            y = model(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            p = torch.softmax(y.float() / temperature, dim=1)
            total = p if total is None else total + p
        return total / len(self.models)


def distillation_kl(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher_T || student_T) per voxel, summed over classes, averaged, times T^2
    (Hinton et al., 2015: keeps gradient size independent of T)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_q, teacher_probs, reduction="none").sum(1)
    return kl.mean() * temperature**2


class Distiller:
    """Turns the supervised loss into (1 - w) supervised + w * KD; remembers the last KL."""

    def __init__(self, teacher: Teacher, config: DistillConfig) -> None:
        self.teacher, self.temperature, self.weight = teacher, config.temperature, config.weight
        self.kl_values: list[float] = []

    def __call__(
        self, supervised: torch.Tensor, outputs: torch.Tensor | list[torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        student = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        soft = self.teacher.soft_labels(x, self.temperature)
        kl = distillation_kl(student, soft, self.temperature)
        self.kl_values.append(float(kl.detach()))
        return (1 - self.weight) * supervised + self.weight * kl

    def epoch_kl(self) -> float:
        """Mean KL since the last call (for the training log)."""
        values, self.kl_values = self.kl_values, []
        return float(sum(values) / max(len(values), 1))


def make_distiller(config: DistillConfig, plan: Plan, device: torch.device) -> Distiller:
    from medseg.ensembling.members import load_fold_models
    from medseg.training.finetune import check_teacher

    models: list[nn.Module] = []
    for source in config.teachers:
        check_teacher(source, plan)
        _, fold_models = load_fold_models(source, device=device)
        models.extend(fold_models)
    return Distiller(Teacher(models).to(device), config)


def distill_config_for(
    work_dir,
    teachers,
    *,
    student: str = "mobile_unet",
    temperature: float = 2.0,
    weight: float = 0.5,
    config=None,
    labels=None,
):
    """The training configuration and plan of a distillation run in ``work_dir``.

    The student shares the first teacher's plan (so teacher and student see the same
    preprocessed patches) and its cross-validation splits, unless ``work_dir`` already
    has its own; the teachers are checked (against ``labels``, the dataset's, too)
    before anything is written.
    """
    import shutil
    from dataclasses import replace
    from pathlib import Path

    from medseg.ensembling.members import model_folder
    from medseg.errors import MedsegError
    from medseg.planning.plan import read_plan
    from medseg.serialization import write_json_atomic
    from medseg.training.config import TrainConfig
    from medseg.training.finetune import check_teacher

    if not teachers:
        raise MedsegError("distillation needs at least one teacher model folder (--teacher)")
    folders = [model_folder(t) for t in teachers]
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
        teachers=tuple(str(f.resolve()) for f in folders), temperature=temperature, weight=weight
    )
    return replace(config or TrainConfig(), model=student, distill=distill), plan


def _patch_seconds(models: list[nn.Module], plan: Plan, repeats: int = 3) -> float:
    """Median seconds of one forward pass of every network on one plan-sized patch."""
    import time

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


def distillation_report(teachers, student_dir) -> dict:
    """Student vs teacher: best validation Dice of each fold (from ``train_result.json``),
    parameters, and seconds per patch forward (the teacher as the fold ensemble it is)."""
    import json
    from pathlib import Path

    from medseg.ensembling.members import load_fold_models, model_folder

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
        plan, models = load_fold_models(t, device="cpu")
        teacher_models.extend(models)
        teacher_dice.append(dice(model_folder(t)))
    student_plan, student_models = load_fold_models(student_dir, device="cpu")
    known = [d for d in teacher_dice if d is not None]
    t_sec = _patch_seconds(teacher_models, plan)
    s_sec = _patch_seconds(student_models[:1], student_plan)
    return {
        "teacher_val_dice": float(sum(known) / len(known)) if known else None,
        "student_val_dice": dice(model_folder(student_dir)),
        "teacher_networks": len(teacher_models),
        "teacher_parameters": sum(p.numel() for m in teacher_models for p in m.parameters()),
        "student_parameters": sum(p.numel() for p in student_models[0].parameters()),
        "teacher_seconds_per_patch": t_sec,
        "student_seconds_per_patch": s_sec,
        "speedup": t_sec / max(s_sec, 1e-9),
        "note": "validation Dice at preprocessed resolution, as logged during training; "
        "seconds on this machine's CPU, one patch, teacher = all its fold networks",
    }
