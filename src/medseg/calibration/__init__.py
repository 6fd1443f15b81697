"""Calibrated probabilities and per-case uncertainty scores (issue 20)."""
