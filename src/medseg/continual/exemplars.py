"""Exemplars: at most K preprocessed cases of the old data, chosen and stored explicitly.

A model folder that keeps exemplars has::

    exemplars.json                    which cases, from where, how they were chosen
    exemplars/<case>_data.npy         the preprocessed image (C, *S) float32
    exemplars/<case>_seg.npy          its label map (old label ids)
    exemplars/<case>.json             geometry and class locations (as in preprocessed/)

The arrays are plain ``.npy`` files, read with ``allow_pickle=False``.

Selection is greedy k-center on a small descriptor per case (volume share of every
class and intensity percentiles inside the foreground), starting from the case nearest
the mean: the exemplars cover the spread of the old data rather than its mode, and the
choice is deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.preprocessing.preprocess import LoadedCase, load_preprocessed
from medseg.serialization import write_json_atomic

EXEMPLARS_JSON = "exemplars.json"
EXEMPLARS_DIR = "exemplars"
SELECTION = "k-center greedy on class volume shares and foreground intensity percentiles"


def case_descriptor(case: LoadedCase, num_classes: int) -> np.ndarray:
    """Class volume shares and foreground intensity percentiles (first channel)."""
    label = np.asarray(case.label)
    data = np.asarray(case.data[0])
    shares = np.bincount(label.ravel().clip(0), minlength=num_classes)[:num_classes] / label.size
    fg = data[label > 0] if (label > 0).any() else data.ravel()
    return np.concatenate([shares[1:] * 10.0, np.percentile(fg, [10, 50, 90])])


def select_exemplars(cases: list[LoadedCase], k: int, *, num_classes: int) -> list[str]:
    """``k`` case ids (or all when fewer) chosen by greedy k-center (see the module)."""
    if k <= 0 or not cases:
        return []
    if k >= len(cases):
        return [c.case_id for c in cases]
    feats = np.stack([case_descriptor(c, num_classes) for c in cases])
    feats = (feats - feats.mean(0)) / np.maximum(feats.std(0), 1e-8)
    chosen = [int(np.argmin(np.linalg.norm(feats, axis=1)))]
    distance = np.linalg.norm(feats - feats[chosen[0]], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(feats - feats[nxt], axis=1))
    return [cases[i].case_id for i in chosen]


def store_exemplars(
    model_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    case_ids: list[str],
    *,
    k: int,
    origin: dict[str, Any],
) -> Path:
    """Copy preprocessed cases from ``source_dir`` into ``model_dir/exemplars/`` and list
    them in ``model_dir/exemplars.json``; refuses more than ``k`` cases."""
    if len(case_ids) > k:
        raise MedsegError(f"{len(case_ids)} exemplars given but at most {k} may be kept")
    model_dir, source_dir = Path(model_dir), Path(source_dir)
    out = model_dir / EXEMPLARS_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for cid in case_ids:
        for suffix in ("_data.npy", "_seg.npy", ".json"):
            src = source_dir / f"{cid}{suffix}"
            if not src.is_file():
                raise MedsegError(f"{src}: exemplar case file missing")
            shutil.copyfile(src, out / f"{cid}{suffix}")
    return write_json_atomic(
        {"k": k, "cases": list(case_ids), "selection": SELECTION, **origin},
        model_dir / EXEMPLARS_JSON,
    )


def read_exemplar_list(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``exemplars.json`` of a model folder (``None`` when it keeps none)."""
    path = Path(model_dir) / EXEMPLARS_JSON
    if not path.is_file():
        return None
    try:
        listing = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{path}: unreadable exemplar list ({exc})") from None
    if not isinstance(listing, dict) or not isinstance(listing.get("cases"), list):
        raise MedsegError(f"{path}: not an exemplar list (no 'cases')")
    return listing


def load_exemplars(model_dir: str | os.PathLike) -> list[LoadedCase]:
    """The exemplar cases a model folder keeps (empty when none)."""
    listing = read_exemplar_list(model_dir)
    if not listing or not listing["cases"]:
        return []
    return load_preprocessed(Path(model_dir) / EXEMPLARS_DIR, [str(c) for c in listing["cases"]])


def copy_into(
    source_dir: str | os.PathLike, case_ids: list[str], target_dir: str | os.PathLike, prefix: str
) -> list[str]:
    """Copy preprocessed cases into another preprocessed folder under ``prefix + id``
    (exemplars joining a new step's training cases); returns the new ids."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    ids = []
    for cid in case_ids:
        new = f"{prefix}{cid}"
        for suffix in ("_data.npy", "_seg.npy"):
            shutil.copyfile(source_dir / f"{cid}{suffix}", target_dir / f"{new}{suffix}")
        props = json.loads((source_dir / f"{cid}.json").read_text())
        write_json_atomic({**props, "case_id": new}, target_dir / f"{new}.json", indent=0)
        ids.append(new)
    return ids
