"""Sliding-window prediction in the original geometry, fold ensembles and postprocessing."""

from medseg.inference.postprocess import keep_largest_component
from medseg.inference.predictor import Prediction, Predictor, predict_to_folder, restore_geometry

__all__ = [
    "Prediction",
    "Predictor",
    "keep_largest_component",
    "predict_to_folder",
    "restore_geometry",
]
