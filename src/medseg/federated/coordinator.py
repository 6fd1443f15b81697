"""The coordinator's rounds, the same over Flower and in a one-machine simulation.

:func:`run_federation` drives a :class:`Transport` (Flower's grid in a deployment,
:class:`medseg.federated.simulate.LocalTransport` in a simulation):

1. wait for ``min_clients`` sites; ask each for its fingerprint (:mod:`.summary`), merge
   them and make the plan (``out/plan.json``), so every site preprocesses alike;
2. for each round: send the global weights, the plan and the round's settings; collect
   the replies (a site that drops out is waited for at most ``straggler_seconds`` once
   enough have replied); reject and log updates that fail :func:`check_update`; combine
   the rest with the strategy;
3. save the round's global model as an ordinary medseg model folder
   ``out/round_<r>/`` (``plan.json``, ``fold_0/weights_best.safetensors``...), with
   ``round.json`` (accepted and rejected sites and why, metrics, bytes, seconds) and the
   strategy's state; ``out/federation.json`` records the progress.

Started again on the same ``out`` folder, it resumes after the last saved round with that
round's weights and strategy state.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from medseg.errors import MedsegError
from medseg.federated.aggregate import Update, check_update, make_strategy
from medseg.federated.site import RoundConfig
from medseg.federated.summary import fingerprint_from_json, merge_summaries
from medseg.imaging import atomic_path
from medseg.model_folder import build_network, read_weights, write_weights
from medseg.planning.plan import Plan, make_plan, read_plan
from medseg.serialization import from_jsonable, to_jsonable, write_json_atomic

__all__ = [
    "FederationConfig",
    "Transport",
    "round_folder",
    "round_learning_rate",
    "run_federation",
    "say",
    "tensor_bytes",
]

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FederationConfig:
    """The coordinator's settings (``out/federation_config.json``)."""

    rounds: int = 5
    strategy: str = "fedavg"
    min_clients: int = 2
    local_steps: int = 20
    learning_rate: float = 3e-3
    optimizer: str = "adamw"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    dp_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    seed: int = 0
    straggler_seconds: float = 60.0
    round_timeout_seconds: float = 3600.0
    wait_for_clients_seconds: float = 600.0
    gpu_plan: bool = False
    dataset_name: str = "federated"
    plan_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"batch_size": 2}

    def check(self) -> None:
        if self.rounds < 1 or self.local_steps < 1 or self.min_clients < 1:
            raise MedsegError("rounds, local steps and min clients must be at least 1")
        make_strategy(self.strategy)  # names a known strategy


class Transport(Protocol):
    """How the coordinator reaches the sites."""

    def nodes(self) -> list[str]:
        """Sites connected now."""
        ...

    def fingerprints(self, nodes: list[str], *, timeout: float) -> dict[str, str]:
        """Each site's fingerprint JSON (a failed site: missing)."""
        ...

    def train(
        self,
        nodes: list[str],
        weights: Weights,
        plan_json: str,
        config: RoundConfig,
        *,
        min_replies: int,
        straggler_seconds: float,
        timeout: float,
    ) -> list[Update]:
        """Every reply of one round (a site that dropped out: an Update with ``error``)."""
        ...


def say(message: str) -> None:
    """The default progress log: one line on stderr (stdout stays for results)."""
    print(f"medseg: {message}", file=sys.stderr, flush=True)


def tensor_bytes(weights: Weights) -> int:
    """Payload bytes of a set of tensors (what a round sends per site, before framing)."""
    return int(sum(t.numel() * t.element_size() for t in weights.values()))


def round_learning_rate(config: FederationConfig, round_index: int) -> float:
    """Cosine decay over rounds (round 1 gets the full rate)."""
    p = (round_index - 1) / max(config.rounds, 1)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * p))


def round_folder(out_dir: str | os.PathLike, round_index: int) -> Path:
    """The model folder of round ``round_index``."""
    return Path(out_dir) / f"round_{round_index:03d}"


def _last_round(out: Path) -> int:
    done = [
        int(p.name[6:])
        for p in out.glob("round_*")
        if p.name[6:].isdigit() and (p / "round.json").is_file()
    ]
    return max(done, default=0)


def _save_round(
    out: Path, r: int, plan: Plan, weights: Weights, state: Weights, record: dict
) -> Path:
    folder = round_folder(out, r)
    fold = folder / "fold_0"
    write_json_atomic(to_jsonable(plan), folder / "plan.json")
    metadata = {"network": plan.network.name, "epoch": r, "round": r, "federated": True}
    write_weights(fold, "best", weights, metadata=metadata)
    write_weights(fold, "last", weights, metadata=metadata)
    if state:
        with atomic_path(folder / "server_state.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    write_json_atomic(record, folder / "round.json")  # last: marks the round complete
    return folder


def _wait_for_clients(
    transport: Transport, config: FederationConfig, log: Callable[[str], None]
) -> list[str]:
    deadline = time.monotonic() + config.wait_for_clients_seconds
    said = -1
    while True:
        nodes = transport.nodes()
        if len(nodes) >= config.min_clients:
            return nodes
        if len(nodes) != said:
            log(f"waiting for sites: {len(nodes)} of {config.min_clients} connected")
            said = len(nodes)
        if time.monotonic() > deadline:
            raise MedsegError(
                f"only {len(nodes)} of {config.min_clients} sites connected within "
                f"{config.wait_for_clients_seconds:.0f} s"
            )
        time.sleep(0.5)


def _agree_plan(
    transport: Transport, out: Path, config: FederationConfig, log: Callable[[str], None]
) -> Plan:
    nodes = _wait_for_clients(transport, config, log)
    texts = transport.fingerprints(nodes, timeout=config.round_timeout_seconds)
    if len(texts) < config.min_clients:
        raise MedsegError(f"only {len(texts)} of {config.min_clients} sites sent a fingerprint")
    merged = merge_summaries(
        [fingerprint_from_json(t) for t in texts.values()], name=config.dataset_name
    )
    plan = make_plan(merged, gpu=config.gpu_plan)
    if config.plan_overrides:
        plan = from_jsonable(Plan, {**to_jsonable(plan), **config.plan_overrides})
    write_json_atomic(to_jsonable(merged), out / "fingerprint.json")
    write_json_atomic(to_jsonable(plan), out / "plan.json")
    log(
        f"plan agreed from {len(texts)} site fingerprints ({merged.num_cases} cases): "
        f"patch {list(plan.patch_size)}, batch {plan.batch_size}, spacing {list(plan.target_spacing)}"
    )
    return plan


def run_federation(
    transport: Transport,
    out_dir: str | os.PathLike,
    config: FederationConfig,
    *,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Agree a plan, then run the rounds (resuming after the last saved one).

    Returns
    -------
    dict
        ``federation.json``: the configuration, one record per round and the final model
        folder.
    """
    config.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(asdict(config), out / "federation_config.json")
    strategy = make_strategy(
        config.strategy, proximal_mu=config.proximal_mu, server_lr=config.server_lr
    )
    last = _last_round(out)
    if last and (out / "plan.json").is_file():
        plan = read_plan(out / "plan.json")
        weights, _ = read_weights(round_folder(out, last) / "fold_0", "last")
        state_file = round_folder(out, last) / "server_state.safetensors"
        if state_file.is_file():
            strategy.load_state_dict(load_file(state_file))
        log(
            f"resuming after round {last} of {config.rounds} (weights of {round_folder(out, last)})"
        )
    else:
        last = 0
        plan = _agree_plan(transport, out, config, log)
        torch.manual_seed(config.seed)
        weights = {k: v.detach().clone() for k, v in build_network(plan).state_dict().items()}
    plan_json = json.dumps(to_jsonable(plan))
    history_path = out / "federation.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    records = [r for r in history.get("rounds", []) if r["round"] <= last]

    for r in range(last + 1, config.rounds + 1):
        nodes = _wait_for_clients(transport, config, log)
        round_config = RoundConfig(
            round=r,
            rounds=config.rounds,
            local_steps=config.local_steps,
            learning_rate=round_learning_rate(config, r),
            optimizer=config.optimizer,
            proximal_mu=strategy.proximal_mu,
            dp_epsilon=config.dp_epsilon,
            dp_delta=config.dp_delta,
            dp_clip=config.dp_clip,
            seed=config.seed,
        )
        t0 = time.perf_counter()
        updates = transport.train(
            nodes,
            weights,
            plan_json,
            round_config,
            min_replies=config.min_clients,
            straggler_seconds=config.straggler_seconds,
            timeout=config.round_timeout_seconds,
        )
        wait_seconds = time.perf_counter() - t0
        accepted, rejected = [], []
        for u in updates:
            reason = check_update(u, weights)
            if reason is None:
                accepted.append(u)
            else:
                rejected.append({"site": u.site, "reason": reason})
                log(f"round {r}: rejected the update of {u.site}: {reason}")
        if len(accepted) < config.min_clients:
            raise MedsegError(
                f"round {r}: only {len(accepted)} valid update(s), {config.min_clients} needed "
                f"(rejected: {rejected}); the last saved round is kept, start again to resume"
            )
        t1 = time.perf_counter()
        weights = strategy.aggregate(weights, accepted)
        aggregate_seconds = time.perf_counter() - t1
        sent = tensor_bytes(weights) * len(nodes)
        received = sum(u.bytes_received or tensor_bytes(u.weights or {}) for u in accepted)
        site_seconds = [u.metrics.get("train_seconds", 0.0) for u in accepted]
        record = {
            "round": r,
            "learning_rate": round_config.learning_rate,
            "sites_asked": len(nodes),
            "accepted": [
                {"site": u.site, "num_examples": u.num_examples, **u.metrics} for u in accepted
            ],
            "rejected": rejected,
            "bytes_sent": sent,
            "bytes_received": received,
            "wait_seconds": round(wait_seconds, 3),
            "aggregate_seconds": round(aggregate_seconds, 4),
            "train_seconds_max": max(site_seconds, default=0.0),
            "train_seconds_sum": sum(site_seconds),
        }
        if config.dp_epsilon > 0:
            record["dp_epsilon_total_max"] = max(
                (u.metrics.get("dp_epsilon_total", 0.0) for u in accepted), default=0.0
            )
            record["dp_epsilon_round_max"] = max(
                (u.metrics.get("dp_epsilon_round", 0.0) for u in accepted), default=0.0
            )
        t2 = time.perf_counter()
        folder = _save_round(out, r, plan, weights, strategy.state_dict(), record)
        record["save_seconds"] = round(time.perf_counter() - t2, 3)
        record["round_seconds"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(record, folder / "round.json")
        records.append(record)
        eps = (
            f", epsilon {record['dp_epsilon_total_max']:.2f} so far"
            if config.dp_epsilon > 0
            else ""
        )
        log(
            f"round {r}/{config.rounds}: {len(accepted)} update(s) accepted, "
            f"{len(rejected)} rejected, {record['round_seconds']:.1f} s{eps} -> {folder}"
        )
        history = {
            "config": asdict(config),
            "rounds": records,
            "final_model": str(folder),
            "completed": r == config.rounds,
        }
        write_json_atomic(history, history_path)
    if not history:
        history = {"config": asdict(config), "rounds": records, "completed": True}
    return history
