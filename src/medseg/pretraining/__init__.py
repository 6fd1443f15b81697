"""Self-supervised pretraining of encoders on unlabelled images (issue 17)."""
