"""What runs at a site: its summary, and one training round on the engine.

A round is ``Engine(SegmentationTask, folder, LoopConfig(max_steps=N), hooks).fit(
initial_weights=global)``: the site preprocesses its own cases with the agreed plan (cached
in its work folder), trains ``local_steps`` steps from the global weights and returns the
new weights and its training case count. Images, labels and preprocessed arrays stay in the
site's folders; only the returned weights and a few numbers (count, loss, steps, seconds,
epsilon) leave it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.errors import MedsegError
from medseg.federated.dp import DPSGDHook, PrivacyLedger, sample_rate
from medseg.federated.summary import site_summary, subset
from medseg.io.dataset import DatasetSpec
from medseg.planning.plan import Plan
from medseg.preprocessing import preprocess_dataset
from medseg.serialization import from_jsonable
from medseg.training import Engine, Hook, LoopConfig, SegmentationTask, TrainConfig

__all__ = ["FAULTS", "LossMeter", "ProximalHook", "RoundConfig", "Site", "SiteResult"]

FAULTS = ("nan", "shape", "crash", "slow")  # drills: what a misbehaving site does


@dataclass(frozen=True)
class RoundConfig:
    """What the coordinator tells every site for one round (plain JSON)."""

    round: int
    rounds: int
    local_steps: int
    learning_rate: float
    optimizer: str = "adamw"
    proximal_mu: float = 0.0
    dp_epsilon: float = 0.0  # total epsilon over all rounds; 0: no differential privacy
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RoundConfig:
        return from_jsonable(cls, json.loads(text))


@dataclass
class SiteResult:
    """A site's reply: new weights, its case count and metrics (plain numbers)."""

    weights: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


class ProximalHook(Hook):
    """FedProx: the gradient of ``mu/2 |w - w_global|^2`` added to every step's gradient."""

    name = "fedprox"

    def __init__(self, global_weights: dict[str, torch.Tensor], mu: float) -> None:
        self.mu, self.reference = float(mu), global_weights

    def on_start(self, engine: Engine) -> None:
        self.pairs = [
            (p, self.reference[n].to(p.device, p.dtype))
            for n, p in engine.model.named_parameters()
            if p.requires_grad
        ]

    def on_gradients(self, engine: Engine) -> None:
        with torch.no_grad():
            for p, ref in self.pairs:
                if p.grad is not None:
                    p.grad.add_(p.detach() - ref, alpha=self.mu)


class LossMeter(Hook):
    """Mean training loss of the round (the engine's log keeps it per epoch)."""

    name = "loss_meter"

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def after_step(self, engine: Engine, loss: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


class Site:
    """One site's data and work folder.

    Parameters
    ----------
    spec
        The site's dataset (checked).
    work_dir
        Where the site keeps its preprocessed cases, round folders and privacy ledger.
    case_ids
        The labelled cases to train on (default: all); ``simulate`` splits one dataset.
    name
        The site's name in logs.
    device, num_threads
        Where and with how many threads it trains.
    fault
        A drill: ``"nan"`` or ``"shape"`` corrupt the returned weights, ``"crash"`` raises,
        ``"slow"`` sleeps a minute before training (see the docs; never set in production).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        work_dir: str | os.PathLike,
        *,
        case_ids: list[str] | None = None,
        name: str = "site",
        device: str = "cpu",
        num_threads: int | None = None,
        fault: str | None = None,
    ) -> None:
        if fault is not None and fault not in FAULTS:
            raise MedsegError(f"unknown fault drill {fault!r} (use {', '.join(FAULTS)})")
        self.spec = subset(spec, case_ids)
        self.work_dir = Path(work_dir)
        self.name, self.device, self.num_threads, self.fault = name, device, num_threads, fault

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.spec.cases]

    def summary(self) -> str:
        """The site's fingerprint (JSON): geometry and intensity statistics, no voxels."""
        return site_summary(self.spec)

    def preprocess(self, plan: Plan) -> Path:
        """The site's cases preprocessed with ``plan`` (cached in the work folder)."""
        return preprocess_dataset(
            self.spec, plan, self.work_dir, num_workers=1, show_progress=False
        )

    def train_round(
        self, weights: dict[str, torch.Tensor], plan: Plan, config: RoundConfig
    ) -> SiteResult:
        """Train ``config.local_steps`` steps from ``weights``; the new weights and metrics."""
        start = time.perf_counter()
        if self.fault == "crash":
            raise MedsegError(f"{self.name}: fault drill 'crash'")
        if self.fault == "slow":
            time.sleep(60)
        pre = self.preprocess(plan)
        folder = self.work_dir / "round"
        dp = config.dp_epsilon > 0
        train_config = TrainConfig(
            seed=config.seed + 7919 * config.round,
            optimizer=config.optimizer,
            learning_rate=config.learning_rate,
            device=self.device,
            num_threads=self.num_threads,
            amp=not dp,
        )
        task = SegmentationTask(
            plan, pre, folder, train_config, train_ids=self.case_ids, val_ids=[]
        )
        meter = LossMeter()
        hooks: list[Hook] = []
        ledger = None
        noise = 0.0
        rate = sample_rate(task.batch_size, len(self.case_ids))
        if dp:
            ledger = PrivacyLedger.open(self.work_dir, delta=config.dp_delta)
            noise = ledger.noise_for(
                epsilon=config.dp_epsilon, rate=rate, steps=config.rounds * config.local_steps
            )
            hooks.append(DPSGDHook(clip_norm=config.dp_clip, noise_multiplier=noise))
        if config.proximal_mu > 0:
            hooks.append(ProximalHook(weights, config.proximal_mu))
        hooks.append(meter)
        loop = LoopConfig(
            iterations_per_epoch=config.local_steps,
            max_epochs=10**9,  # the schedule's progress stays ~0: the coordinator sets the rate
            max_steps=config.local_steps,
            optimizer=config.optimizer,
            learning_rate=config.learning_rate,
            weight_decay=train_config.weight_decay,
            momentum=train_config.momentum,
            warmup_fraction=0.0,
            grad_clip=12.0,
            amp=not dp,
            device=self.device,
            num_threads=self.num_threads,
            seed=train_config.seed,
            tensorboard=False,
        )
        engine = Engine(task, folder, loop, hooks=hooks, resume=False, show_progress=False)
        cpu0 = time.process_time()
        result = engine.fit(initial_weights=weights)
        train_cpu = time.process_time() - cpu0  # unlike wall time, not inflated by contention
        new = {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}
        metrics: dict[str, Any] = {
            "train_loss": meter.mean,
            "steps": float(result.session_iterations),
            "train_seconds": result.elapsed_seconds,
            "step_seconds": result.step_seconds,
            "train_cpu_seconds": train_cpu,
            "round_seconds": 0.0,
            "batch_size": float(task.batch_size),
        }
        if ledger is not None:
            ledger.record(
                round_index=config.round,
                noise_multiplier=noise,
                rate=rate,
                steps=result.session_iterations,
            )
            metrics.update(
                dp_noise_multiplier=noise,
                dp_sample_rate=rate,
                dp_epsilon_round=ledger.round_epsilon(config.round),
                dp_epsilon_total=ledger.epsilon(),
                dp_delta=config.dp_delta,
            )
        if self.fault == "nan":
            first = next(k for k, v in new.items() if v.is_floating_point())
            new[first] = torch.full_like(new[first], math.nan)
        elif self.fault == "shape":
            first = next(iter(new))
            new[first] = torch.zeros(tuple(s + 1 for s in new[first].shape))
        metrics["round_seconds"] = time.perf_counter() - start
        return SiteResult(new, len(self.case_ids), {k: float(v) for k, v in metrics.items()})
