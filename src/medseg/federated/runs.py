"""The federated steps as the facade calls them: certificates, coordinator, site, simulation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medseg.federated.coordinator import FederationConfig, run_federation
from medseg.federated.deploy import join, run_local_deployment, serve
from medseg.federated.simulate import LocalTransport, split_sites
from medseg.federated.site import Site
from medseg.io.check import require_clean
from medseg.training.splits import read_splits

__all__ = ["join_federation", "serve_federation", "simulate_federation"]


def serve_federation(
    out_dir: str | os.PathLike,
    certs_dir: str | os.PathLike,
    config: FederationConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 9092,
    connect_host: str = "127.0.0.1",
) -> dict[str, Any]:
    """The coordinator of a deployment (see :func:`medseg.federated.deploy.serve`)."""
    return serve(out_dir, certs_dir, config, host=host, port=port, connect_host=connect_host)


def join_federation(
    dataset: str | os.PathLike,
    *,
    server: str,
    certs_dir: str | os.PathLike,
    key: str | os.PathLike,
    work_dir: str | os.PathLike,
    name: str,
    runtime_port: int | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
) -> int:
    """A site: check its dataset, then run its SuperNode until stopped."""
    require_clean(dataset)  # a broken dataset fails here, not in the first round
    return join(
        dataset,
        server=server,
        ca_certificate=Path(certs_dir) / "ca.crt",
        private_key=key,
        work_dir=work_dir,
        runtime_port=runtime_port,
        device=device,
        num_threads=num_threads,
        name=name,
    )


def simulate_federation(
    dataset: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: FederationConfig,
    *,
    sites: int,
    split_by: str,
    split_file: str | os.PathLike | None = None,
    deployment: bool = False,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Split one dataset into sites and federate them on this machine.

    ``split_file`` (a medseg split JSON) limits the sites to its ``train`` cases of fold 0,
    keeping its validation cases out of every site. ``deployment`` runs the real Flower
    deployment on loopback (TLS, node keys, one SuperNode process per site) instead of
    calling the sites in this process.
    """
    spec = require_clean(dataset)
    case_ids = read_splits(split_file)[0]["train"] if split_file else None
    groups = split_sites(spec, sites=sites, split_by=split_by, case_ids=case_ids)
    out = Path(out_dir)
    if deployment:
        return run_local_deployment(spec, groups, out, config, num_threads=num_threads)
    members = [
        Site(spec, out / "sites" / name, case_ids=ids, name=name, num_threads=num_threads)
        for name, ids in groups.items()
    ]
    return run_federation(LocalTransport(members), out / "server", config)
