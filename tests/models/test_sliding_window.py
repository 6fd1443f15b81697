"""Contract tests: every registered model and loss, in 2D and 3D."""

from __future__ import annotations

import torch

from medseg.models.sliding_window import gaussian_weights, sliding_window_logits, tile_starts


def test_tile_starts_cover_the_volume():
    for size, patch in [(10, 10), (11, 10), (100, 32), (33, 32)]:
        starts = tile_starts(size, patch, 0.5)
        assert starts[0] == 0 and starts[-1] == max(size - patch, 0)
        assert all(b - a <= patch * 0.5 + 1 for a, b in zip(starts, starts[1:]))


def test_sliding_window_reproduces_a_translation_equivariant_model():
    """A 1x1 conv is local, so tiled and blended logits equal the whole-image logits."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 3, 1)
    data = torch.randn(1, 30, 21, 17)
    tiled = sliding_window_logits(
        model, data, patch_size=(16, 16, 16), num_classes=3, mirror_axes=(0, 1, 2)
    )
    with torch.no_grad():
        whole = model(data[None])[0]
    assert tiled.shape == (3, 30, 21, 17)
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_gaussian_weights_peak_in_the_centre():
    w = gaussian_weights((9, 9))
    assert w[4, 4] == w.max() == 1.0 and w.min() > 0
