"""Hyper-parameter search with Optuna (grid, random, TPE; median/Hyperband pruning)."""

from medseg.tuning.search import apply_params, load_space, run_study

__all__ = ["apply_params", "load_space", "run_study"]
