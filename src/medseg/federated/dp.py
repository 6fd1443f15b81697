"""Differentially private SGD at a site: per-sample clipping and Gaussian noise as an engine hook.

:class:`DPSGDHook` wraps the network in Opacus' ``GradSampleModule`` (per-sample gradients;
medseg's U-Net writes instance norm as ``GroupNorm``, which Opacus supports, and its
transposed convolutions go through Opacus' functorch fallback), replaces the batch loss by
the mean of per-sample losses (the batch Dice is not a sum over samples, so its per-sample
gradients would not bound one sample's influence), then at ``on_gradients`` clips every
sample's gradient to ``clip_norm``, sums, adds ``N(0, (noise_multiplier * clip_norm)^2)``
and divides by the batch size.

:class:`PrivacyLedger` keeps, in a site's work folder, the noise and sampling rate of every
round, and gives the epsilon spent (Opacus' RDP accountant) per round and in total.

The privacy unit is one case (a patient's image): each batch draws ``batch_size`` cases
uniformly, so a case is in a batch with probability about ``batch_size / n_cases``; the
accountant treats this as Poisson sampling at that rate, an approximation that the docs
state. Opacus is imported when a hook or ledger is used (the ``federated`` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.imaging import atomic_path
from medseg.training.engine import Engine, Hook

__all__ = ["DPSGDHook", "PrivacyLedger", "noise_for_epsilon", "sample_rate"]


def sample_rate(batch_size: int, num_cases: int) -> float:
    """The chance that one case is in a batch of ``batch_size`` cases drawn uniformly."""
    if num_cases <= 0:
        raise MedsegError("differential privacy needs at least one training case")
    return min(1.0, batch_size / num_cases)


def noise_for_epsilon(*, epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The noise multiplier that spends ``epsilon`` (at ``delta``) over ``steps`` steps."""
    from opacus.accountants.utils import get_noise_multiplier

    if epsilon <= 0 or not 0 < delta < 1:
        raise MedsegError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}")
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=max(int(steps), 1),
            accountant="rdp",
        )
    )


@dataclass
class PrivacyLedger:
    """The DP-SGD steps a site has taken, in ``<work>/privacy.json``; epsilon from RDP."""

    path: Path
    delta: float
    entries: list[dict[str, Any]]
    noise_cache: dict[str, float]

    @classmethod
    def open(cls, work_dir: str | os.PathLike, *, delta: float) -> PrivacyLedger:
        path = Path(work_dir) / "privacy.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls(path, delta, data.get("entries", []), data.get("noise", {}))

    def noise_for(self, *, epsilon: float, rate: float, steps: int) -> float:
        """:func:`noise_for_epsilon`, computed once per setting (the search takes seconds)."""
        key = f"{epsilon}|{self.delta}|{rate}|{steps}"
        cache = self.noise_cache
        if key not in cache:
            cache[key] = noise_for_epsilon(
                epsilon=epsilon, delta=self.delta, rate=rate, steps=steps
            )
            self._save()
        return cache[key]

    def _save(self) -> None:
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(
                json.dumps(
                    {"delta": self.delta, "entries": self.entries, "noise": self.noise_cache}
                )
            )

    def record(self, *, round_index: int, noise_multiplier: float, rate: float, steps: int) -> None:
        """Add one round's steps (replacing an earlier record of the same round) and save."""
        self.entries = [e for e in self.entries if e["round"] != round_index]
        self.entries.append(
            {
                "round": round_index,
                "noise_multiplier": noise_multiplier,
                "sample_rate": rate,
                "steps": steps,
            }
        )
        self.entries.sort(key=lambda e: e["round"])
        self._save()

    def epsilon(self, entries: list[dict[str, Any]] | None = None) -> float:
        """Epsilon at ``delta`` of ``entries`` (default: every round recorded)."""
        from opacus.accountants import RDPAccountant

        entries = self.entries if entries is None else entries
        if not entries:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [
            (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["steps"]
        ]
        return float(accountant.get_epsilon(self.delta)) if accountant.history else 0.0

    def round_epsilon(self, round_index: int) -> float:
        """Epsilon of one round alone."""
        return self.epsilon([e for e in self.entries if e["round"] == round_index])


class DPSGDHook(Hook):
    """DP-SGD on the training engine (see the module docstring).

    Parameters
    ----------
    clip_norm
        Each sample's gradient is scaled to at most this L2 norm.
    noise_multiplier
        Noise standard deviation in units of ``clip_norm``.
    seed
        Seeds the noise generator (``None``: from the operating system, as a deployment
        should); tests fix it.

    Notes
    -----
    Needs the task's per-sample criterion (``task.criterion``, as
    :class:`medseg.training.segmentation.SegmentationTask` has) and float32 training
    (CUDA AMP off): the gradient scaler does not unscale per-sample gradients.
    """

    name = "dp_sgd"

    def __init__(self, *, clip_norm: float, noise_multiplier: float, seed: int | None = None):
        if clip_norm <= 0 or noise_multiplier < 0:
            raise MedsegError(
                f"DP-SGD needs clip > 0 and noise >= 0, got {clip_norm}, {noise_multiplier}"
            )
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.generator = torch.Generator()
        self.generator.manual_seed(
            int.from_bytes(os.urandom(8), "little") if seed is None else int(seed)
        )
        self.steps = 0
        self.clipped_share = 0.0  # share of samples clipped, mean over steps

    def on_start(self, engine: Engine) -> None:
        if engine.use_amp:
            raise MedsegError("DP-SGD needs float32 training: turn AMP off")
        self.criterion = getattr(engine.task, "criterion", None)
        if self.criterion is None:
            raise MedsegError("DP-SGD needs a task with a per-sample criterion (task.criterion)")

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from opacus import GradSampleModule

        # Opacus' backward hooks refuse in-place activations on their outputs; the same
        # function out of place.
        for module in model.modules():
            if isinstance(getattr(module, "inplace", None), bool):
                module.inplace = False
        self.gsm = GradSampleModule(model, loss_reduction="mean")
        return self.gsm

    def loss(self, outputs: Any, batch: Any, loss: torch.Tensor) -> torch.Tensor:
        _, target = batch
        heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        per_sample = [
            self.criterion([h[i : i + 1] for h in heads], target[i : i + 1])
            if isinstance(outputs, (list, tuple))
            else self.criterion(heads[0][i : i + 1], target[i : i + 1])
            for i in range(target.shape[0])
        ]
        return torch.stack(per_sample).mean()

    def on_gradients(self, engine: Engine) -> None:
        params, samples = [], []
        for p in engine.model.parameters():
            g = getattr(p, "grad_sample", None)
            if g is not None:
                params.append(p)
                samples.append(g)
            elif p.requires_grad and p.grad is not None and bool(p.grad.any()):
                raise MedsegError("DP-SGD: a trained parameter got no per-sample gradient")
            # else: unused this step (e.g. the unweighted coarsest deep-supervision head)
        batch = samples[0].shape[0]
        norms = torch.stack([g.reshape(batch, -1).norm(dim=1) for g in samples]).norm(dim=0)
        factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        std = self.noise_multiplier * self.clip_norm
        for p, g in zip(params, samples):
            summed = torch.einsum("b,b...->...", factor, g)
            noise = torch.normal(0.0, std, size=summed.shape, generator=self.generator)
            p.grad = ((summed + noise.to(summed.device)) / batch).to(p.dtype)
            p.grad_sample = None
        self.clipped_share += (
            float((norms > self.clip_norm).float().mean()) - self.clipped_share
        ) / (self.steps + 1)
        self.steps += 1

    def row(self, engine: Engine) -> dict[str, float]:
        return {"dp_clipped_share": round(self.clipped_share, 4)}
