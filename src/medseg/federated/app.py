"""The Flower apps: ``server_app`` runs the coordinator, ``client_app`` runs a site.

Flower starts these in its own processes (``flwr-serverapp`` under the SuperLink,
``flwr-clientapp`` under each SuperNode); ``medseg federated server`` names them in the app
it submits (``medseg.federated.app:server_app`` and ``:client_app``). Messages:

- ``query.fingerprint`` -> the site's fingerprint JSON (:mod:`medseg.federated.summary`);
- ``train`` with the global weights (``ArrayRecord`` "weights"), the plan and the round's
  settings (``ConfigRecord`` "config") -> the site's new weights and a ``MetricRecord``
  "metrics" (case count, loss, steps, seconds, epsilon).

A site's SuperNode is started with ``--node-config`` keys ``dataset`` (its dataset folder),
``work-dir`` (its private work folder), optionally ``cases-file`` (a JSON list of case
ids), ``device``, ``threads`` and ``fault`` (a drill, :data:`medseg.federated.site.FAULTS`).
This module needs the ``federated`` extra (flwr).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medseg.errors import MedsegError
from medseg.federated.aggregate import Update
from medseg.federated.coordinator import FederationConfig, run_federation
from medseg.federated.site import RoundConfig, Site
from medseg.io.dataset import load_dataset
from medseg.planning.plan import Plan
from medseg.serialization import from_jsonable

__all__ = ["FlowerTransport", "client_app", "server_app"]

server_app = ServerApp()
client_app = ClientApp()


def _array_bytes(record: ArrayRecord) -> int:
    return int(sum(len(a.data) for a in record.values()))


class FlowerTransport:
    """The coordinator's :class:`medseg.federated.coordinator.Transport` over a Flower grid."""

    def __init__(self, grid: Grid, *, poll_seconds: float = 0.5) -> None:
        self.grid, self.poll_seconds = grid, poll_seconds

    def nodes(self) -> list[str]:
        return [str(n) for n in self.grid.get_node_ids()]

    def fingerprints(self, nodes: list[str], *, timeout: float) -> dict[str, str]:
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({})}),
                dst_node_id=int(n),
                message_type="query.fingerprint",
            )
            for n in nodes
        ]
        out = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            site = str(reply.metadata.src_node_id)
            if reply.has_error():
                print(f"medseg: site {site} sent no fingerprint: {reply.error.reason}", flush=True)
                continue
            out[site] = str(reply.content.config_records["fingerprint"]["json"])
        return out

    def train(
        self,
        nodes: list[str],
        weights: dict[str, torch.Tensor],
        plan_json: str,
        config: RoundConfig,
        *,
        min_replies: int,
        straggler_seconds: float,
        timeout: float,
    ) -> list[Update]:
        content = RecordDict(
            {
                "weights": ArrayRecord(torch_state_dict=weights),
                "config": ConfigRecord({"round": config.to_json(), "plan": plan_json}),
            }
        )
        messages = [Message(content, dst_node_id=int(n), message_type="train") for n in nodes]
        ids = list(self.grid.push_messages(messages))
        node_of = dict(zip(ids, nodes))
        pending, replies = set(ids), {}
        start = time.monotonic()
        enough_since: float | None = None
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    replies[mid] = reply
                    pending.discard(mid)
            if not pending:
                break
            now = time.monotonic()
            good = sum(1 for m in replies.values() if not m.has_error())
            if good >= min_replies and enough_since is None:
                enough_since = now
            online = set(self.nodes())
            if all(node_of[m] not in online for m in pending):
                break  # every missing site has left the federation
            if enough_since is not None and now - enough_since > straggler_seconds:
                break
            if now - start > timeout:
                break
            time.sleep(self.poll_seconds)
        updates = []
        for mid in ids:
            site = node_of[mid]
            reply = replies.get(mid)
            if reply is None:
                updates.append(Update(site, None, 0, error="no reply (dropped out or too slow)"))
            elif reply.has_error():
                updates.append(Update(site, None, 0, error=str(reply.error.reason)[:300]))
            else:
                record = reply.content.array_records["weights"]
                metrics = dict(reply.content.metric_records["metrics"])
                count = int(metrics.pop("num_examples", 0))
                info = reply.content.config_records.get("site")
                if info is not None:
                    site = f"{info['name']} ({site})"
                updates.append(
                    Update(
                        site,
                        record.to_torch_state_dict(),
                        count,
                        {k: float(v) for k, v in metrics.items()},
                        bytes_received=_array_bytes(record),
                    )
                )
        return updates


@server_app.main()
def coordinator_main(grid: Grid, context: Context) -> None:
    """Run the rounds configured in ``<out-dir>/federation_config.json``."""
    out = Path(str(context.run_config["out-dir"]))
    config = from_jsonable(
        FederationConfig, json.loads((out / "federation_config.json").read_text())
    )
    run_federation(
        FlowerTransport(grid), out, config, log=lambda s: print(f"medseg: {s}", flush=True)
    )


def _site(context: Context) -> Site:
    cfg = context.node_config
    if "dataset" not in cfg or "work-dir" not in cfg:
        raise MedsegError('the SuperNode needs --node-config \'dataset="..." work-dir="..."\'')
    spec = load_dataset(str(cfg["dataset"]))
    case_ids = None
    if cfg.get("cases-file"):
        case_ids = list(json.loads(Path(str(cfg["cases-file"])).read_text())["case_ids"])
    threads = int(cfg.get("threads", 0)) or None
    return Site(
        spec,
        str(cfg["work-dir"]),
        case_ids=case_ids,
        name=str(cfg.get("name", "site")),
        device=str(cfg.get("device", "cpu")),
        num_threads=threads,
        fault=str(cfg["fault"]) if cfg.get("fault") else None,
    )


@client_app.query("fingerprint")
def fingerprint(message: Message, context: Context) -> Message:
    """The site's fingerprint (summary statistics, no voxels)."""
    summary = _site(context).summary()
    return Message(RecordDict({"fingerprint": ConfigRecord({"json": summary})}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """One round at the site: train from the global weights, return the new weights."""
    site = _site(context)
    cfg = message.content.config_records["config"]
    plan = from_jsonable(Plan, json.loads(str(cfg["plan"])))
    round_config = RoundConfig.from_json(str(cfg["round"]))
    weights = message.content.array_records["weights"].to_torch_state_dict()
    result = site.train_round(weights, plan, round_config)
    metrics = MetricRecord({**result.metrics, "num_examples": int(result.num_examples)})
    reply = RecordDict(
        {
            "weights": ArrayRecord(torch_state_dict=result.weights),
            "metrics": metrics,
            "site": ConfigRecord({"name": site.name}),
        }
    )
    return Message(reply, reply_to=message)
