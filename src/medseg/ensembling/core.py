"""Ensembles of trained models: mean probability, weighted mean and majority vote, and the
choice of the best combination on cross-validation (as nnU-Net's find_best_configuration).

Members may differ in architecture and in plan (spacing, patch size): each member
predicts in its own preprocessed grid and its probabilities are taken back to the
original image grid, where they are combined.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.ensembling.members import load_fold_models, member_probabilities
from medseg.errors import MedsegError
from medseg.imaging.overlap import dice_per_class
from medseg.inference.batch import collect_inputs, group_inputs
from medseg.io.dataset import DatasetSpec, read_case_image, read_case_label
from medseg.io.files import image_suffix, read_image_channels, write_image
from medseg.io.image import Image
from medseg.model_folder import ModelFolder
from medseg.planning.plan import Plan
from medseg.preprocessing.preprocess import CaseGeometry, preprocess_image
from medseg.progress import progress

METHODS = ("mean", "weighted", "vote")


def mean_probabilities(
    probabilities: list[torch.Tensor], weights: list[float] | None = None
) -> torch.Tensor:
    """(Weighted) mean of members' probability maps ``(K, *S)``; weights are normalized."""
    if not probabilities:
        raise ValueError("no member probabilities to ensemble")
    w = np.ones(len(probabilities)) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != len(probabilities) or (w < 0).any() or w.sum() <= 0:
        raise MedsegError(
            f"ensemble weights must be {len(probabilities)} non-negative numbers, not all zero"
        )
    w = w / w.sum()
    total = probabilities[0] * float(w[0])
    for p, wi in zip(probabilities[1:], w[1:]):
        total = total + p * float(wi)
    return total


def majority_vote(labels: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-voxel most frequent label among members; ties go to the lowest label value."""
    votes = np.zeros((num_classes, *labels[0].shape), dtype=np.int32)
    for lab in labels:
        for c in range(num_classes):
            votes[c] += lab == c
    return votes.argmax(0).astype(labels[0].dtype)


def combine(
    probabilities: list[torch.Tensor], *, method: str = "mean", weights: list[float] | None = None
) -> np.ndarray:
    """Label map from members' probabilities by ``method`` ("mean", "weighted", "vote")."""
    if method not in METHODS:
        raise MedsegError(f"unknown ensemble method {method!r} (use {', '.join(METHODS)})")
    if method == "vote":
        num_classes = probabilities[0].shape[0]
        return majority_vote([p.argmax(0).numpy() for p in probabilities], num_classes)
    return (
        mean_probabilities(probabilities, weights if method == "weighted" else None)
        .argmax(0)
        .numpy()
    )


def probabilities_in_original_grid(probs: torch.Tensor, geometry: CaseGeometry) -> torch.Tensor:
    """Resample ``(K, *S)`` probabilities to the cropped grid and un-crop (outside: background)."""
    cropped = geometry.cropped_shape
    if tuple(probs.shape[1:]) != cropped:
        mode = "bilinear" if len(cropped) == 2 else "trilinear"
        probs = F.interpolate(probs[None], size=cropped, mode=mode, align_corners=False)[0]
    full = torch.zeros((probs.shape[0], *geometry.shape), dtype=probs.dtype)
    full[0] = 1.0
    full[(slice(None),) + tuple(slice(a, b) for a, b in geometry.bbox)] = probs
    return full


@dataclass
class Member:
    """One ensemble member: a model folder and the fold networks it contributes."""

    source: str
    plan: Plan
    models: list[torch.nn.Module]

    def probabilities(
        self, channels: list[Image], *, mirror: bool = False, device: str = "cpu"
    ) -> torch.Tensor:
        """Class probabilities ``(K, *original shape)`` for one case's channel images."""
        data, geometry = preprocess_image(channels, self.plan)
        probs = member_probabilities(
            self.plan,
            self.models,
            data,
            mirror_axes=tuple(range(self.plan.ndim)) if mirror else (),
            device=device,
        )
        return probabilities_in_original_grid(probs, geometry)


def load_member(
    source: str | os.PathLike, *, folds: list[int] | None = None, device: str = "cpu"
) -> Member:
    plan, models = load_fold_models(source, folds=folds, device=device)
    return Member(str(source), plan, models)


def check_compatible(members: list[Member]) -> None:
    """Members must predict the same labels from the same input channels."""
    first = members[0].plan
    for m in members[1:]:
        if tuple(m.plan.labels) != tuple(first.labels):
            raise MedsegError(
                f"{m.source}: labels {dict(m.plan.labels)} differ from {members[0].source}'s "
                f"{dict(first.labels)}; ensemble members must predict the same labels"
            )
        if m.plan.channel_names != first.channel_names or m.plan.ndim != first.ndim:
            raise MedsegError(f"{m.source}: expects other input channels than {members[0].source}")


def mean_dice(preds: list[np.ndarray], refs: list[np.ndarray], num_classes: int) -> float:
    """Mean over classes of the mean over cases of foreground Dice (NaN-aware)."""
    scores = np.array([dice_per_class(p, r, num_classes) for p, r in zip(preds, refs)])
    with np.errstate(all="ignore"):
        per_class = np.nanmean(scores, axis=0)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """All weight vectors of ``n`` non-negative multiples of ``step`` summing to one."""
    k = int(round(1 / step))
    out = []
    for combo in itertools.product(range(k + 1), repeat=n):
        if sum(combo) == k:
            out.append(tuple(c / k for c in combo))
    return out


def tune_weights(
    case_probabilities: list[list[torch.Tensor]],
    references: list[np.ndarray],
    *,
    step: float = 0.1,
) -> tuple[tuple[float, ...], float]:
    """Weights (on a simplex grid) that maximize mean Dice of the weighted mean on validation.

    ``case_probabilities[i][m]`` is member m's probabilities for case i.
    """
    n = len(case_probabilities[0])
    num_classes = case_probabilities[0][0].shape[0]
    best: tuple[tuple[float, ...], float] = ((1.0 / n,) * n, -1.0)
    for w in simplex_grid(n, step if n <= 4 else max(step, 0.25)):
        preds = [mean_probabilities(ps, list(w)).argmax(0).numpy() for ps in case_probabilities]
        score = mean_dice(preds, references, num_classes)
        if score > best[1] + 1e-12:
            best = (w, score)
    return best


@dataclass(frozen=True)
class Candidate:
    members: tuple[str, ...]
    method: str
    weights: tuple[float, ...] | None
    mean_dice: float


@dataclass(frozen=True)
class Selection:
    """Cross-validated scores of every single model and combination; ``best`` first."""

    best: Candidate
    candidates: tuple[Candidate, ...]
    folds: tuple[int, ...]
    num_cases: int


def _common_splits(sources: list[str]) -> list[dict]:
    splits = None
    for s in sources:
        path = ModelFolder.open(s).path / "splits.json"
        if not path.exists():
            raise MedsegError(f"{path}: missing; ensemble selection needs cross-validation splits")
        data = json.loads(path.read_text())
        data = data if isinstance(data, list) else [data]
        if splits is None:
            splits = data
        elif data != splits:
            raise MedsegError(
                f"{path}: splits differ from {sources[0]}'s; train the members on the same folds"
            )
    return splits or []


def select_best(
    sources: list[str | os.PathLike],
    *,
    folds: list[int] | None = None,
    methods: tuple[str, ...] = METHODS,
    max_members: int = 3,
    weight_step: float = 0.1,
    mirror: bool = False,
    device: str = "cpu",
    show_progress: bool = True,
) -> Selection:
    """Score every model and every combination of up to ``max_members`` models on the
    out-of-fold validation cases (fold k's networks predict fold k's validation cases).

    Weighted means are tuned on the same cases; with few cases prefer "mean".
    """
    sources = [str(s) for s in sources]
    if len(set(sources)) != len(sources):
        raise MedsegError("each model may appear only once in an ensemble")
    for m in methods:
        if m not in METHODS:
            raise MedsegError(f"unknown ensemble method {m!r} (use {', '.join(METHODS)})")
    splits = _common_splits(sources)
    members = [ModelFolder.open(s) for s in sources]
    spec = DatasetSpec.from_json(json.loads((members[0].path / "dataset.json").read_text()))
    # Folds every member has trained.
    common = sorted(set.intersection(*(set(m.folds()) for m in members)))
    folds = common if folds is None else [f for f in folds if f in common]
    if not folds:
        raise MedsegError("the models have no trained fold in common")
    # probs[i][m]: member m's probabilities for OOF case i.
    probs: list[list[torch.Tensor]] = []
    refs: list[np.ndarray] = []
    first_plan = None
    for fold in folds:
        members = [load_member(s, folds=[fold], device=device) for s in sources]
        check_compatible(members)
        first_plan = members[0].plan
        for case_id in progress(splits[fold]["val"], desc=f"fold {fold}", enabled=show_progress):
            case = spec.case(case_id)
            channels = read_case_image(spec, case)
            probs.append([m.probabilities(channels, mirror=mirror, device=device) for m in members])
            refs.append(np.asarray(read_case_label(spec, case).array))
    assert first_plan is not None
    k = first_plan.num_classes
    candidates: list[Candidate] = []
    for size in range(1, min(max_members, len(sources)) + 1):
        for combo in itertools.combinations(range(len(sources)), size):
            names = tuple(sources[i] for i in combo)
            subset = [[p[i] for i in combo] for p in probs]
            if size == 1:
                preds = [s[0].argmax(0).numpy() for s in subset]
                candidates.append(Candidate(names, "single", None, mean_dice(preds, refs, k)))
                continue
            for method in methods:
                weights = None
                if method == "weighted":
                    weights, score = tune_weights(subset, refs, step=weight_step)
                else:
                    preds = [combine(s, method=method) for s in subset]
                    score = mean_dice(preds, refs, k)
                candidates.append(Candidate(names, method, weights, score))
    ranked = sorted(candidates, key=lambda c: (-np.nan_to_num(c.mean_dice, nan=-1), len(c.members)))
    return Selection(ranked[0], tuple(ranked), tuple(folds), len(refs))


def ensemble_predict_folder(
    sources: list[str | os.PathLike],
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    method: str = "mean",
    weights: list[float] | None = None,
    folds: list[int] | None = None,
    mirror: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    show_progress: bool = True,
) -> list[Path]:
    """Predict every case under ``input_path`` with the ensemble; outputs keep the input geometry."""
    if method not in METHODS:
        raise MedsegError(f"unknown ensemble method {method!r} (use {', '.join(METHODS)})")
    if method == "weighted" and (weights is None or len(weights) != len(sources)):
        raise MedsegError(f"--method weighted needs one weight per model ({len(sources)})")
    members = [load_member(s, folds=folds, device=device) for s in sources]
    check_compatible(members)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    groups = group_inputs(collect_inputs(input_path), members[0].plan.num_channels)
    written = []
    for case_id, files in progress(
        groups.items(), total=len(groups), desc="ensemble", enabled=show_progress
    ):
        suffix = (
            ".png" if image_suffix(files[0]) in (".png", ".jpg", ".jpeg", ".bmp") else ".nii.gz"
        )
        out = output_dir / f"{case_id}{suffix}"
        if out.exists() and not overwrite:
            continue
        channels: list[Image] = []
        for f in files:
            channels.extend(read_image_channels(f))
        probs = [m.probabilities(channels, mirror=mirror, device=device) for m in members]
        label = combine(probs, method=method, weights=weights).astype(np.uint8)
        write_image(channels[0].with_array(label), out, overwrite=overwrite)
        written.append(out)
    return written
