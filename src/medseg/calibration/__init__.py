"""Calibrated probabilities and per-case uncertainty scores (issue 20).

* :func:`fit_temperature`: temperature scaling (global or per class) by NLL;
* :func:`calibrate_model`: fit it, and the QC review threshold, on a model folder's
  cross-validation predictions only, and store them in ``calibration.json``;
* :mod:`medseg.calibration.qc`: score choice, failure recall and thresholds.

Prediction applies the stored temperature (:class:`medseg.inference.Predictor`).
"""

from medseg.calibration.fit import calibrate_model, mean_foreground_dice
from medseg.calibration.qc import choose_review, recall_at_fraction, review_threshold, spearman
from medseg.calibration.temperature import MODES, fit_temperature, negative_log_likelihood

__all__ = [
    "MODES",
    "calibrate_model",
    "choose_review",
    "fit_temperature",
    "mean_foreground_dice",
    "negative_log_likelihood",
    "recall_at_fraction",
    "review_threshold",
    "spearman",
]
