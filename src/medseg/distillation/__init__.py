"""Knowledge distillation from a teacher model (or fold ensemble) into a student."""

from medseg.distillation.kd import (
    DistillationHook,
    Distiller,
    Teacher,
    distill_config_for,
    distillation_kl,
    distillation_report,
    make_distillation_hook,
    make_distiller,
)

__all__ = [
    "DistillationHook",
    "Distiller",
    "Teacher",
    "distill_config_for",
    "distillation_kl",
    "distillation_report",
    "make_distillation_hook",
    "make_distiller",
]
