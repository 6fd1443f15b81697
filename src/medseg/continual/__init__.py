"""Continual learning: extend a trained model with new classes or sites (issue 18)."""
