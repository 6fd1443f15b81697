"""The frozen old network and the engine hooks that keep a new network close to it.

Each method is a :class:`medseg.training.engine.Hook` whose ``loss`` adds a term to the
task's supervised loss:

- :class:`LwFHook`: distillation of the old classes' softmax (LwF);
- :class:`MiBHook`: MiB's unbiased distillation;
- :class:`PODHook`: PLOP's pooled-feature distillation (encoder and decoder stages);
- :class:`EWCHook`: the EWC penalty, with the Fisher information estimated on exemplar
  cases of the old data before training starts.

The old network runs once per batch: :class:`OldModel` keeps its last outputs, which the
task (PLOP's pseudo-labels) and the hooks share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.continual.losses import (
    ewc_penalty,
    old_class_distillation,
    pod_distillation,
    unbiased_distillation,
)
from medseg.errors import MedsegError
from medseg.losses import DeepSupervisionLoss, create_loss
from medseg.preprocessing.preprocess import LoadedCase
from medseg.training.engine import Engine, Hook
from medseg.training.sampling import PatchSampler


class FeatureTap:
    """Keeps the outputs of every ``encoder`` and ``decoder`` stage of the last forward pass.

    Works for the U-Net family (``model.encoder`` and ``model.decoder`` module lists).
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        stages = [
            m
            for part in ("encoder", "decoder")
            if isinstance(getattr(model, part, None), nn.ModuleList)
            for m in getattr(model, part)
        ]
        if not stages:
            raise MedsegError(
                f"feature distillation (plop) needs a U-Net-style encoder and decoder; {name} "
                f"({type(model).__name__}) has none"
            )
        self.features: list[torch.Tensor | None] = [None] * len(stages)
        self.handles = [m.register_forward_hook(self._keep(i)) for i, m in enumerate(stages)]

    def _keep(self, index: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self.features[index] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        """The features of the last pass (then forgotten, so they hold no memory)."""
        features, self.features = self.features, [None] * len(self.features)
        if any(f is None for f in features):
            raise RuntimeError("stage features missing: the forward pass skipped a stage")
        return features  # type: ignore[return-value]


class OldModel:
    """The network before this step, frozen, run once per training batch.

    Parameters
    ----------
    network
        The old network (``C_old`` outputs), for example from
        :meth:`medseg.model_folder.ModelFolder.load_networks` with ``fuse_batchnorm=False``.
    tap_features
        Also keep its encoder and decoder features (for :class:`PODHook`).
    """

    def __init__(self, network: nn.Module, *, tap_features: bool = False) -> None:
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.tap = FeatureTap(network, "the old network") if tap_features else None
        self._key: tuple[int, int] | None = None
        self._logits: torch.Tensor | None = None
        self._features: list[torch.Tensor] = []

    @property
    def num_classes(self) -> int:
        """Output channels of the old network (measured lazily from the last pass)."""
        if self._logits is None:
            raise RuntimeError("the old network has not run yet")
        return int(self._logits.shape[1])

    def to(self, device: torch.device) -> OldModel:
        self.network.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The old network's logits on ``x`` (computed once per batch tensor)."""
        key = (id(x), x._version)
        if self._key != key or self._logits is None:
            self.network.eval()
            out = self.network(x)
            self._logits = (out[0] if isinstance(out, (list, tuple)) else out).float()
            self._features = self.tap.take() if self.tap is not None else []
            self._key = key
        return self._logits

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Its encoder and decoder features on ``x`` (``tap_features=True``)."""
        self(x)
        return self._features


def _full_resolution(outputs: Any) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


class _TermHook(Hook):
    """A hook that adds ``weight * term`` to the loss and logs the term's epoch mean."""

    column = "train_term"

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.values: list[float] = []

    def term(self, outputs: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        value = self.term(outputs, batch)
        self.values.append(float(value.detach()))
        return loss + self.weight * value

    def row(self, engine: Engine) -> dict[str, float]:
        values, self.values = self.values, []
        return {self.column: float(np.mean(values)) if values else float("nan")}


class LwFHook(_TermHook):
    """LwF: distillation of the old network's softmax at ``temperature`` on the old classes."""

    name = "lwf"
    column = "train_lwf_kd"

    def __init__(self, old: OldModel, *, weight: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__(weight)
        self.old, self.temperature = old, temperature

    def term(self, outputs: Any, batch: Any) -> torch.Tensor:
        return old_class_distillation(
            _full_resolution(outputs), self.old(batch[0]), temperature=self.temperature
        )


class MiBHook(_TermHook):
    """MiB's unbiased distillation (background of the old network = background or new)."""

    name = "mib"
    column = "train_mib_kd"

    def __init__(self, old: OldModel, *, new_classes: Sequence[int], weight: float = 10.0) -> None:
        super().__init__(weight)
        self.old, self.new_classes = old, list(new_classes)

    def term(self, outputs: Any, batch: Any) -> torch.Tensor:
        return unbiased_distillation(
            _full_resolution(outputs), self.old(batch[0]), new=self.new_classes
        )


class PODHook(_TermHook):
    """PLOP's pooled-feature distillation over the encoder and decoder stages.

    The weight is scaled by ``sqrt(classes now / new classes)``, PLOP's adaptive factor.
    """

    name = "pod"
    column = "train_pod"

    def __init__(
        self,
        old: OldModel,
        *,
        weight: float = 0.01,
        classes: int,
        new_classes: int,
        scales: Sequence[int] = (1, 2),
    ) -> None:
        super().__init__(weight * math.sqrt(classes / max(new_classes, 1)))
        self.old, self.scales = old, tuple(scales)
        self.tap: FeatureTap | None = None

    def on_start(self, engine: Engine) -> None:
        self.tap = FeatureTap(engine.model, "the network")

    def term(self, outputs: Any, batch: Any) -> torch.Tensor:
        if self.tap is None:
            raise RuntimeError("the POD hook has not started (no engine yet)")
        student = self.tap.take()
        return pod_distillation(student, self.old.features(batch[0]), scales=self.scales)


def fisher_information(
    network: nn.Module,
    cases: list[LoadedCase],
    *,
    patch_size: Sequence[int],
    batches: int = 8,
    batch_size: int = 2,
    loss: str = "dice_ce",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher information of ``network`` on patches of ``cases``.

    The mean over ``batches`` of the squared gradient of the batch loss, per parameter
    (gradients by ``torch.autograd.grad``: no optimizer step, the network is unchanged).
    """
    if not cases:
        raise MedsegError(
            "EWC needs exemplar cases of the old data to estimate the Fisher information"
        )
    device = next(network.parameters()).device
    sampler = PatchSampler(
        cases,
        patch_size=tuple(patch_size),
        region=tuple(patch_size),
        batch_size=batch_size,
        foreground_fraction=0.5,
        seed=seed,
    )
    was_training = network.training
    network.train()
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    params = [p for p in network.parameters() if p.requires_grad]
    num_outputs = len(network.output_scales) if getattr(network, "deep_supervision", False) else 1
    criterion = DeepSupervisionLoss(create_loss(loss), num_outputs)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for _ in range(batches):
        images, labels = sampler.sample()
        x = torch.from_numpy(images).to(device)
        y = torch.from_numpy(labels).to(device)
        grads = torch.autograd.grad(criterion(network(x), y), params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f += g.detach().float() ** 2 / batches
    network.train(was_training)
    return dict(zip(names, fisher))


class EWCHook(_TermHook):
    """EWC: ``weight/2 * sum F (theta - theta*)^2`` around the weights this step starts from.

    The Fisher information is scaled to mean 1, so ``weight`` does not depend on the
    loss scale or the number of parameters.

    Parameters
    ----------
    anchor
        The weights this step starts from (theta*), by name.
    fisher
        Diagonal Fisher information by parameter name (:func:`fisher_information`).
    """

    name = "ewc"
    column = "train_ewc"

    def __init__(
        self,
        anchor: Mapping[str, torch.Tensor],
        fisher: Mapping[str, torch.Tensor],
        *,
        weight: float = 100.0,
    ) -> None:
        super().__init__(weight)
        total = sum(float(f.sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        scale = count / total if total > 0 else 1.0
        self.anchor = {k: v.detach().float().clone() for k, v in anchor.items() if k in fisher}
        self.fisher = {k: v.float() * scale for k, v in fisher.items()}
        self.triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def on_start(self, engine: Engine) -> None:
        device = engine.device
        self.triples = []
        for name, param in engine.model.named_parameters():
            key = name.removeprefix("base.")  # a GrownNetwork's old modules
            if key not in self.fisher:
                continue  # the new classes' extra heads: nothing to remember
            anchor, fisher = self.anchor[key], self.fisher[key]
            if anchor.shape != param.shape:  # a grown head's old rows
                anchor, fisher = anchor[: param.shape[0]], fisher[: param.shape[0]]
            self.triples.append((param, anchor.to(device), fisher.to(device)))

    def term(self, outputs: Any, batch: Any) -> torch.Tensor:
        return ewc_penalty(self.triples)
