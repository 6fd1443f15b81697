"""Shared imaging helpers with no medseg dependencies above the base: the one Dice,
connected components, morphology in millimetres, and atomic file writes."""

from medseg.imaging.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from medseg.imaging.components import (
    check_connectivity,
    component_sizes,
    components_by_size,
    full_connectivity,
    keep_largest_component,
    keep_largest_components,
    label_components,
    remove_small_components,
)
from medseg.imaging.morphology import (
    ball_structure,
    binary_closing,
    binary_opening,
    check_radius,
    class_values,
    dilate,
    dilate_classes,
    erode,
    erode_classes,
    fill_holes,
)
from medseg.imaging.overlap import dice, dice_from_counts, dice_per_class

__all__ = [
    "atomic_path",
    "ball_structure",
    "binary_closing",
    "binary_opening",
    "check_connectivity",
    "check_radius",
    "class_values",
    "component_sizes",
    "components_by_size",
    "dice",
    "dice_from_counts",
    "dice_per_class",
    "dilate",
    "dilate_classes",
    "erode",
    "erode_classes",
    "fill_holes",
    "full_connectivity",
    "keep_largest_component",
    "keep_largest_components",
    "label_components",
    "remove_small_components",
    "write_bytes_atomic",
    "write_text_atomic",
]
