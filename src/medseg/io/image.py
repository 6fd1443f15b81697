"""The image type: a NumPy array plus its physical geometry.

Axes are in ITK index order, ``(x, y)`` or ``(x, y, z)``, the same order as
``spacing`` and ``origin``; ``direction`` holds the direction cosines as a
row-major D x D matrix whose column ``i`` is the world direction of axis ``i``
(LPS world coordinates, as in ITK and DICOM).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True, eq=False)
class Image:
    """An image: ``array`` with spatial axes ``(x, y[, z])`` and its geometry."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = field(default=())
    direction: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        ndim = self.array.ndim
        if ndim not in (2, 3):
            raise ValueError(
                f"an image has 2 or 3 spatial axes, got array of shape {self.array.shape}"
            )
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        origin = self.origin or (0.0,) * ndim
        direction = self.direction or tuple(np.eye(ndim).ravel().tolist())
        object.__setattr__(self, "origin", tuple(float(o) for o in origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in direction))
        if (
            len(self.spacing) != ndim
            or len(self.origin) != ndim
            or len(self.direction) != ndim * ndim
        ):
            raise ValueError(
                f"geometry does not match a {ndim}D array: spacing {self.spacing}, origin {self.origin}, "
                f"direction of length {len(self.direction)}"
            )
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(self.ndim, self.ndim)

    def with_array(self, array: np.ndarray) -> Image:
        """The same geometry around another array of the same spatial shape."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} differs from the image's {self.shape}")
        return replace(self, array=array)

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """World (LPS, mm) coordinates of continuous voxel indices ``(..., D)``."""
        index = np.asarray(index, dtype=float)
        return (
            np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.direction_matrix.T
        )

    def same_geometry(self, other: Image, *, atol: float = 1e-4) -> bool:
        """True when shape, spacing, origin and direction agree within ``atol``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol, rtol=0)
            and np.allclose(self.origin, other.origin, atol=atol, rtol=0)
            and np.allclose(self.direction, other.direction, atol=atol, rtol=0)
        )

    def geometry(self) -> dict:
        """Geometry as plain JSON-ready values."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }
