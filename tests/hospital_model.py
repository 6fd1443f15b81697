"""A tiny trained 3D model for the hospital tests (DICOM, PACS, service): seconds to train."""

from __future__ import annotations

from pathlib import Path

from medseg import api
from medseg.io.phantoms import write_phantom_dataset
from medseg.training import TrainConfig

TINY = TrainConfig(
    max_epochs=1, iterations_per_epoch=2, batch_size=2, seed=0, max_validation_cases=1
)


def train_tiny_model(root: Path, *, spacing: float = 8.0) -> Path:
    """Train one epoch of two iterations on 6 small phantoms; the model folder.

    The phantoms get a coarse ``spacing`` (mm), so that the plan's target spacing is coarse
    and a 512 x 512 CT series is predicted in seconds on a CPU.
    """
    from medseg.io import read_image, write_image

    data = write_phantom_dataset(root / "data", num_train=6, num_test=0, shape=(24, 24, 16))
    for path in sorted(data.rglob("*.nii.gz")):
        image = read_image(path)
        coarse = type(image)(image.array, (spacing,) * 3, image.origin, image.direction)
        write_image(coarse, path, overwrite=True)
    api.train(data, root / "work", config=TINY, show_progress=False)
    return root / "work" / "model"


class ThresholdPredictor:
    """A stand-in model whose output is known by construction: 1 above ``low``, 2 above ``high``.

    Service and viewer tests use it so that the expected label map is exact; the real
    Predictor is exercised by the tests that train :func:`train_tiny_model`.
    """

    def __init__(self, low: float = 100.0, high: float = 1000.0, delay_s: float = 0.0):
        from types import SimpleNamespace

        self.low, self.high, self.delay_s = low, high, delay_s
        self.model_dir = Path("threshold")
        self.plan = SimpleNamespace(labels=((0, "background"), (1, "liver"), (2, "lesion")), ndim=3)

    def predict(self, channels, **_):
        import time

        import numpy as np

        time.sleep(self.delay_s)
        a = channels[0].array
        label = (a > self.low).astype(np.uint8) + (a > self.high).astype(np.uint8)
        return channels[0].with_array(label)
