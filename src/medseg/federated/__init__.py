"""Federated training across sites with Flower, with differential privacy (issue 19)."""
