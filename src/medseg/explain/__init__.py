"""Attribution maps that explain a segmentation (issue 20)."""
