"""One machine, several sites: the coordinator's code with sites called in turn.

:func:`split_sites` divides one dataset's labelled cases into sites, by a seed (random,
equal sizes), by ``dtype`` (the image files' stored data type: a proxy for a scanner or
export pipeline; Task04_Hippocampus has 45 ``uint8`` and 163 ``float32`` images) or by a
JSON file mapping case ids to site names. :class:`LocalTransport` calls each
:class:`medseg.federated.site.Site` in the same process, one after the other, and the
coordinator (:func:`medseg.federated.coordinator.run_federation`) is the one a deployment
runs. No Ray, no sockets.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.federated.aggregate import Update
from medseg.federated.coordinator import tensor_bytes
from medseg.federated.site import RoundConfig, Site
from medseg.io.dataset import DatasetSpec
from medseg.planning.plan import Plan
from medseg.serialization import from_jsonable

__all__ = ["LocalTransport", "split_sites"]


def _dtype(path: str) -> str:
    if path.endswith((".nii", ".nii.gz")):
        return str(nib.load(path).get_data_dtype())
    return Path(path).suffix.lstrip(".") or "unknown"


def split_sites(
    spec: DatasetSpec, *, sites: int, split_by: str, case_ids: list[str] | None = None
) -> dict[str, list[str]]:
    """Site name -> case ids.

    Parameters
    ----------
    spec
        The dataset.
    sites
        How many sites.
    split_by
        An integer seed (random split into equal parts), ``"dtype"`` (the cases of the
        rarest stored image data type form one site, the rest are split at random with
        seed 0 into the other sites) or the path of a JSON file ``{case_id: site}``.
    case_ids
        Only these labelled cases (e.g. a fixed training split); default all.
    """
    ids = [c.case_id for c in spec.cases if c.label is not None]
    if case_ids is not None:
        wanted = set(case_ids)
        ids = [i for i in ids if i in wanted]
    if sites < 1 or sites > len(ids):
        raise MedsegError(f"cannot split {len(ids)} cases into {sites} sites")
    if split_by.lstrip("-").isdigit():
        rng = np.random.default_rng(int(split_by))
        order = [ids[i] for i in rng.permutation(len(ids))]
        return {f"site{k + 1}": sorted(order[k::sites]) for k in range(sites)}
    if split_by == "dtype":
        groups: dict[str, list[str]] = defaultdict(list)
        for cid in ids:
            groups[_dtype(spec.case(cid).images[0])].append(cid)
        if len(groups) < 2:
            raise MedsegError(f"{spec.root}: all images have one data type; split by a seed")
        rare = min(groups, key=lambda k: len(groups[k]))
        rest = [c for k, v in groups.items() if k != rare for c in v]
        out = {f"site1_{rare}": sorted(groups[rare])}
        if sites > 1:
            rng = np.random.default_rng(0)
            order = [rest[i] for i in rng.permutation(len(rest))]
            for k in range(sites - 1):
                out[f"site{k + 2}"] = sorted(order[k :: sites - 1])
        return out
    path = Path(split_by)
    if not path.is_file():
        raise MedsegError(f"--split-by {split_by}: not a seed, 'dtype' or a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MedsegError(f"{path}: not JSON ({exc})") from None
    out2: dict[str, list[str]] = defaultdict(list)
    for cid in ids:
        if cid in mapping:
            out2[str(mapping[cid])].append(cid)
    if len(out2) != sites:
        raise MedsegError(f"{path}: names {len(out2)} sites, --sites is {sites}")
    return dict(out2)


class LocalTransport:
    """Sites in this process, trained one after the other (see the module docstring)."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = {s.name: s for s in sites}

    def nodes(self) -> list[str]:
        return list(self.sites)

    def fingerprints(self, nodes: list[str], *, timeout: float) -> dict[str, str]:
        return {n: self.sites[n].summary() for n in nodes}

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
        plan = from_jsonable(Plan, json.loads(plan_json))
        updates = []
        for name in nodes:
            t = time.perf_counter()
            try:
                result = self.sites[name].train_round(
                    {k: v.clone() for k, v in weights.items()}, plan, config
                )
            except Exception as exc:  # a failing site is reported, the round goes on
                updates.append(
                    Update(
                        name,
                        None,
                        0,
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                    )
                )
                traceback.print_exc()
                continue
            metrics = dict(result.metrics, round_seconds=time.perf_counter() - t)
            updates.append(
                Update(
                    name,
                    result.weights,
                    result.num_examples,
                    metrics,
                    bytes_received=tensor_bytes(result.weights),
                )
            )
        return updates


def write_site_files(
    out_dir: str | os.PathLike, spec: DatasetSpec, groups: dict[str, list[str]]
) -> dict[str, Path]:
    """One ``<out>/<site>/site.json`` per site (dataset root and case ids) for SuperNodes."""
    paths = {}
    for name, ids in groups.items():
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "site.json"
        path.write_text(json.dumps({"dataset": spec.root, "case_ids": ids, "name": name}))
        paths[name] = path
    return paths
