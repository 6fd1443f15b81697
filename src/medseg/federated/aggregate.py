"""Checking site updates and combining them: FedAvg, FedProx and FedAdam.

Every update is checked against the global weights before it counts
(:func:`check_update`): the same tensor names, shapes and dtypes, finite values and a
positive example count. A failing update is rejected with its reason; the round goes on
with the others.

- FedAvg (McMahan et al. 2017): the mean of the site weights, weighted by their training
  case counts.
- FedProx (Li et al. 2020): the same mean; the sites add ``mu/2 |w - w_global|^2`` to their
  loss (:class:`medseg.federated.site.ProximalHook`).
- FedAdam (Reddi et al. 2021): the weighted mean minus the global weights is a
  pseudo-gradient for a server-side Adam step (moments kept across rounds and saved with
  the coordinator's state, so a restart resumes them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "STRATEGIES",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "Strategy",
    "Update",
    "check_update",
    "make_strategy",
    "weighted_mean",
]

Weights = dict[str, torch.Tensor]


@dataclass
class Update:
    """One site's reply to a training round."""

    site: str
    weights: Weights | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the site failed (its own report, or lost)
    bytes_received: int = 0


def check_update(update: Update, reference: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``update`` cannot be aggregated (``None``: it can)."""
    if update.error:
        return f"site error: {update.error}"
    weights = update.weights
    if weights is None:
        return "no weights"
    if not (isinstance(update.num_examples, int) and update.num_examples > 0):
        return f"example count {update.num_examples!r} is not a positive integer"
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        got = weights[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{name}: dtype {got.dtype}, expected {ref.dtype}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"{name}: not finite (NaN or Inf)"
    return None


def weighted_mean(updates: list[Update]) -> Weights:
    """The mean of the updates' weights, weighted by their example counts (float64 sums).

    Integer tensors (counters, if a network has any) are taken from the largest site.
    """
    total = float(sum(u.num_examples for u in updates))
    largest = max(updates, key=lambda u: u.num_examples)
    out: Weights = {}
    for name, ref in largest.weights.items():  # type: ignore[union-attr]
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for u in updates:
                acc += u.weights[name].double() * (u.num_examples / total)  # type: ignore[index]
            out[name] = acc.to(ref.dtype)
        else:
            out[name] = ref.clone()
    return out


class Strategy:
    """How a round's accepted updates become the next global weights."""

    name = "strategy"
    proximal_mu = 0.0  # sent to the sites (FedProx)

    def aggregate(self, current: Weights, updates: list[Update]) -> Weights:
        raise NotImplementedError

    def state_dict(self) -> Weights:
        """Tensors to save with the coordinator's state (e.g. FedAdam's moments)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(self, current: Weights, updates: list[Update]) -> Weights:
        return weighted_mean(updates)


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01) -> None:
        self.proximal_mu = float(proximal_mu)


class FedAdam(Strategy):
    """Server Adam on the pseudo-gradient ``mean(w_site) - w`` (Reddi et al. 2021)."""

    name = "fedadam"

    def __init__(
        self, *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: Weights = {}
        self.v: Weights = {}

    def aggregate(self, current: Weights, updates: list[Update]) -> Weights:
        mean = weighted_mean(updates)
        out: Weights = {}
        for name, w in current.items():
            if not w.is_floating_point():
                out[name] = mean[name]
                continue
            delta = mean[name].double() - w.double()
            m = self.m.get(name, torch.zeros_like(delta))
            v = self.v.get(name, torch.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self.m[name], self.v[name] = m, v
            out[name] = (w.double() + self.lr * m / (v.sqrt() + self.tau)).to(w.dtype)
        return out

    def state_dict(self) -> Weights:
        return {
            **{f"m.{k}": v.float() for k, v in self.m.items()},
            **{f"v.{k}": v.float() for k, v in self.v.items()},
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: v.double() for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v.double() for k, v in state.items() if k.startswith("v.")}


STRATEGIES = ("fedavg", "fedprox", "fedadam")


def make_strategy(name: str, *, proximal_mu: float = 0.01, server_lr: float = 0.01) -> Strategy:
    """A strategy by name (one of :data:`STRATEGIES`)."""
    if name == "fedavg":
        return FedAvg()
    if name == "fedprox":
        if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
            raise ValueError(f"proximal mu must be >= 0, got {proximal_mu}")
        return FedProx(proximal_mu=proximal_mu)
    if name == "fedadam":
        return FedAdam(server_lr=server_lr)
    raise ValueError(f"unknown strategy {name!r} (use {', '.join(STRATEGIES)})")
