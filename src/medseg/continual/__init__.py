"""Continual learning: extend a trained model with new classes or sites (issue 18).

``extend`` (see :mod:`medseg.continual.extend`) grows the head for new classes or keeps
it for a new site, and trains on the new data with one of :data:`METHODS` (naive
fine-tuning, LwF, MiB, PLOP, rehearsal of stored exemplars, EWC), every method a
segmentation task plus hooks on the one training engine.
"""

from medseg.continual.exemplars import load_exemplars, read_exemplar_list, select_exemplars
from medseg.continual.extend import (
    METHODS,
    NEEDS_EXEMPLARS,
    ExtendResult,
    dice_on_cases,
    extend,
    extend_spec,
    step_labels,
)
from medseg.continual.heads import grow_state_dict
from medseg.continual.report import write_step_report

__all__ = [
    "METHODS",
    "NEEDS_EXEMPLARS",
    "ExtendResult",
    "dice_on_cases",
    "extend",
    "extend_spec",
    "grow_state_dict",
    "load_exemplars",
    "read_exemplar_list",
    "select_exemplars",
    "step_labels",
    "write_step_report",
]
