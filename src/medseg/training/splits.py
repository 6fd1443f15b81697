"""Seeded k-fold splits, written to and read from a splits JSON, and labelled subsets."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.serialization import write_json_atomic


def make_folds(
    case_ids: list[str], *, num_folds: int = 5, seed: int = 0
) -> list[dict[str, list[str]]]:
    """Split case ids into ``num_folds`` train/val folds (each case is validated once)."""
    ids = sorted(case_ids)
    if num_folds < 2:
        raise MedsegError(f"need at least 2 folds, got {num_folds}")
    if len(ids) < num_folds:
        raise MedsegError(f"{len(ids)} labelled case(s) cannot make {num_folds} folds")
    order = np.random.default_rng(seed).permutation(len(ids))
    chunks = np.array_split(order, num_folds)
    folds = []
    for k in range(num_folds):
        val = sorted(ids[i] for i in chunks[k])
        folds.append({"train": sorted(set(ids) - set(val)), "val": val})
    return folds


def read_splits(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """Folds from a JSON file: a list of {"train", "val"} or one {"train", "val"} object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{path}: cannot read splits ({exc})") from None
    folds = data if isinstance(data, list) else [data]
    for i, fold in enumerate(folds):
        if (
            not isinstance(fold, dict)
            or not isinstance(fold.get("train"), list)
            or not isinstance(fold.get("val"), list)
        ):
            raise MedsegError(f"{path}: fold {i} needs 'train' and 'val' lists")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]


def write_splits(folds: list[dict[str, list[str]]], path: str | os.PathLike) -> Path:
    return write_json_atomic(folds, path)


def labelled_subset(
    train_ids: list[str],
    *,
    fraction: float | None = None,
    cases: int | None = None,
    seed: int = 0,
) -> list[str]:
    """A reproducible subset of a fold's training cases (label-efficient training).

    Parameters
    ----------
    train_ids
        The fold's training cases (their order does not matter).
    fraction
        Share of the cases to keep, rounded half up (0.1 of 166 cases: 17).
    cases
        Number of cases to keep instead (at most all of them).
    seed
        The draw: the sorted ids are permuted with ``numpy.random.default_rng(seed)``
        and the first ones kept, so a smaller subset of one seed lies inside a larger one.

    Returns
    -------
    list of str
        Sorted case ids; all of ``train_ids`` when neither ``fraction`` nor ``cases`` is given.
    """
    ids = sorted(train_ids)
    if fraction is not None and cases is not None:
        raise MedsegError("give a labelled fraction or a number of labelled cases, not both")
    if fraction is None and cases is None:
        return ids
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise MedsegError(f"labelled fraction must lie in (0, 1] (got {fraction})")
        n = max(1, math.floor(fraction * len(ids) + 0.5))
    else:
        if cases is None or not 1 <= cases <= len(ids):
            raise MedsegError(f"labelled cases must lie in 1..{len(ids)} (got {cases})")
        n = cases
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])
