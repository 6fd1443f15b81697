"""Ensembles of trained models and the choice of the best combination on cross-validation."""

from medseg.ensembling.core import (
    METHODS,
    Candidate,
    Member,
    Selection,
    combine,
    ensemble_predict_folder,
    load_member,
    majority_vote,
    mean_probabilities,
    select_best,
    tune_weights,
)

__all__ = [
    "METHODS",
    "Candidate",
    "Member",
    "Selection",
    "combine",
    "ensemble_predict_folder",
    "load_member",
    "majority_vote",
    "mean_probabilities",
    "select_best",
    "tune_weights",
]
