"""A tiny training task for engine tests: y = x . w learned by an MLP with dropout."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from medseg.training.engine import LoopConfig, TrainingTask, Validation


class TinyRegression(TrainingTask):
    """y = x . w + noise, learned by a small MLP with dropout.

    Random streams: the task's NumPy generator picks the batches, torch's global
    generator drives dropout and the input noise, so a resume must restore both.
    """

    has_validation = True

    def __init__(self, *, seed: int = 0, batch_size: int = 4, delay: float = 0.0) -> None:
        data = np.random.default_rng(123)
        self.x = data.normal(size=(64, 8)).astype(np.float32)
        self.y = (self.x @ data.normal(size=(8, 1))).astype(np.float32)
        self.batch_size, self.seed, self.delay = batch_size, seed, delay

    def setup(self, device: torch.device) -> nn.Module:
        self.rng = np.random.default_rng(self.seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def make_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        idx = self.rng.integers(0, len(self.x), self.batch_size)
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])

    def forward_loss(self, model: nn.Module, batch):
        x, y = batch
        outputs = model(x + 0.01 * torch.randn_like(x))
        return outputs, nn.functional.mse_loss(outputs, y)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> Validation:
        mse = float(
            nn.functional.mse_loss(model(torch.from_numpy(self.x)), torch.from_numpy(self.y))
        )
        return Validation(score=-mse, columns={"val_mse": mse})

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state) -> None:
        self.rng.bit_generator.state = state["rng"]


CONFIG = LoopConfig(
    iterations_per_epoch=3,
    max_epochs=4,
    optimizer="sgd",
    learning_rate=0.05,
    momentum=0.9,
    device="cpu",
    num_threads=1,
    seed=5,
    tensorboard=False,
)


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
