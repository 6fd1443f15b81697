"""Training-time transforms: batched augmentation (array cropping helpers live in ``cropping``)."""

from medseg.transforms.augment import (
    AugmentConfig,
    BatchAugmenter,
    centre_crop,
    spatial_matrix,
    spatial_transform,
)

__all__ = [
    "AugmentConfig",
    "BatchAugmenter",
    "centre_crop",
    "spatial_matrix",
    "spatial_transform",
]
