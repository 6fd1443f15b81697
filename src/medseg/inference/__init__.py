"""Sliding-window prediction in the original geometry, fold ensembles and postprocessing."""

from medseg.inference.batch import predict_batch, predict_to_folder
from medseg.inference.predictor import Prediction, Predictor, restore_geometry

__all__ = [
    "Prediction",
    "Predictor",
    "predict_batch",
    "predict_to_folder",
    "restore_geometry",
]
