"""The plan of a work folder: ``dataset.json``, ``fingerprint.json`` and the editable ``plan.json``.

These take a checked :class:`~medseg.io.dataset.DatasetSpec` (see
:func:`medseg.io.check.require_clean`); :mod:`medseg.workflow` and :mod:`medseg.tuning`
build on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medseg.io.dataset import DatasetSpec
from medseg.planning.fingerprint import Fingerprint, compute_fingerprint
from medseg.planning.plan import Plan, make_plan, read_plan
from medseg.serialization import write_json_atomic

PLAN_FILE = "plan.json"


def fingerprint_dataset(
    spec: DatasetSpec, work_dir: str | os.PathLike, *, num_workers: int, show_progress: bool
) -> Fingerprint:
    """Compute the fingerprint; write ``work_dir/dataset.json`` and ``work_dir/fingerprint.json``."""
    work = Path(work_dir)
    write_json_atomic(spec.to_json(), work / "dataset.json")
    fp = compute_fingerprint(spec, num_workers=num_workers, show_progress=show_progress)
    write_json_atomic(fp, work / "fingerprint.json")
    return fp


def plan_dataset(
    spec: DatasetSpec,
    work_dir: str | os.PathLike,
    *,
    gpu: bool | None,
    num_workers: int,
    show_progress: bool,
) -> Plan:
    """Fingerprint the dataset and write a new ``work_dir/plan.json``.

    ``gpu`` None plans for a GPU when one is present.
    """
    if gpu is None:
        gpu = torch.cuda.is_available()
    fp = fingerprint_dataset(spec, work_dir, num_workers=num_workers, show_progress=show_progress)
    result = make_plan(fp, gpu=gpu)
    write_json_atomic(result, Path(work_dir) / PLAN_FILE)
    return result


def plan_for(
    spec: DatasetSpec, work_dir: str | os.PathLike, *, num_workers: int, show_progress: bool
) -> Plan:
    """The work folder's plan (possibly hand-edited), or a new one."""
    path = Path(work_dir) / PLAN_FILE
    if path.exists():
        return read_plan(path)
    return plan_dataset(
        spec, work_dir, gpu=None, num_workers=num_workers, show_progress=show_progress
    )
