"""Knowledge distillation from a teacher model (or fold ensemble) into a student."""

from medseg.distillation.kd import (
    Distiller,
    Teacher,
    distill_config_for,
    distillation_kl,
    distillation_report,
    make_distiller,
)

__all__ = [
    "Distiller",
    "Teacher",
    "distill_config_for",
    "distillation_report",
    "distillation_kl",
    "make_distiller",
]
