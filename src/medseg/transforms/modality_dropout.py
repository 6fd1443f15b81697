"""Modality dropout: train a multi-channel network to work with any subset of its channels.

Each channel (modality) of each sample is dropped with probability ``p`` by setting it
to zero, the value a missing channel gets at prediction time (zero is the mean of a
normalized channel, so a dropped channel carries no signal and no offset). A sample
never loses all of its channels: when every channel was drawn for dropping, one of
them, chosen uniformly, is kept. This is input-level dropout in the spirit of HeMIS and
U-HVED (which draw random subsets of modalities during training); the late-fusion
network (:mod:`medseg.models.late_fusion`) reads an all-zero channel as absent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dropout_probabilities(probability: float | Sequence[float], num_channels: int) -> torch.Tensor:
    """One dropping probability per channel: ``probability`` for all, or one per channel."""
    if isinstance(probability, (int, float)):
        values = [float(probability)] * num_channels
    else:
        values = [float(p) for p in probability]
        if len(values) != num_channels:
            raise ValueError(
                f"modality dropout gives {len(values)} probabilities for {num_channels} channels"
            )
    if any(not 0.0 <= p < 1.0 for p in values):
        raise ValueError(f"modality dropout probabilities must be in [0, 1), got {values}")
    return torch.tensor(values, dtype=torch.float64)


class ModalityDropout:
    """Zero whole channels of a ``(B, C, *S)`` batch at random (never all of a sample's).

    Parameters
    ----------
    probability
        Probability of dropping each channel: one number, or one per channel.
    num_channels
        Channels of the batches it will see.
    seed
        Seed of its own CPU generator (independent of the other random streams).

    Notes
    -----
    With one channel nothing can be dropped and batches pass unchanged.
    """

    def __init__(
        self, probability: float | Sequence[float], num_channels: int, *, seed: int = 0
    ) -> None:
        self.probabilities = dropout_probabilities(probability, num_channels)
        self.num_channels = num_channels
        self.generator = torch.Generator().manual_seed(int(seed))

    def draw(self, batch_size: int) -> torch.Tensor:
        """A ``(batch_size, C)`` boolean mask of the channels kept (at least one per row)."""
        u = torch.rand(batch_size, self.num_channels, generator=self.generator, dtype=torch.float64)
        keep = u >= self.probabilities
        rescue = torch.randint(self.num_channels, (batch_size,), generator=self.generator)
        empty = ~keep.any(dim=1)
        keep[empty, rescue[empty]] = True
        return keep

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` with the dropped channels set to zero (a new tensor when any is dropped)."""
        if image.ndim < 3 or image.shape[1] != self.num_channels:
            raise ValueError(
                f"modality dropout expects (B, {self.num_channels}, ...) images, got {tuple(image.shape)}"
            )
        if self.num_channels == 1 or not bool((self.probabilities > 0).any()):
            return image
        keep = self.draw(image.shape[0]).to(image.device)
        if bool(keep.all()):
            return image
        shape = (*keep.shape, *([1] * (image.ndim - 2)))
        return image * keep.view(shape).to(image.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state (for a resumable training run)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
