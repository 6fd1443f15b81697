"""The federated fingerprint: each site summarises its data, the coordinator merges and plans.

A site sends :func:`site_summary` (a :class:`medseg.planning.fingerprint.Fingerprint` as
plain JSON): the image geometry of each case (spacing, shape, shape after cropping: header
values, no voxels), intensity statistics of each channel over the foreground (mean,
standard deviation, median, 0.5 and 99.5 percentiles, minimum and maximum) and the share of
voxels and of cases per class. It never sends an image, a label map or a voxel sample.

:func:`merge_summaries` pools these into one fingerprint for :func:`medseg.planning.plan.make_plan`:
geometry lists are concatenated, means and variances pooled exactly (weighted by case
count), percentiles and medians averaged with the same weights (an approximation of the
pooled percentile; it only matters for CT clipping), extremes taken over sites.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from medseg.errors import MedsegError
from medseg.io.dataset import DatasetSpec
from medseg.planning.fingerprint import ChannelStats, Fingerprint, compute_fingerprint
from medseg.serialization import from_jsonable, to_jsonable

__all__ = ["fingerprint_from_json", "merge_summaries", "site_summary", "subset"]


def subset(spec: DatasetSpec, case_ids: list[str] | None) -> DatasetSpec:
    """``spec`` restricted to the labelled cases ``case_ids`` (``None``: all labelled cases)."""
    cases = [c for c in spec.cases if c.label is not None]
    if case_ids is not None:
        wanted = set(case_ids)
        cases = [c for c in cases if c.case_id in wanted]
        missing = wanted - {c.case_id for c in cases}
        if missing:
            raise MedsegError(f"{spec.root}: no labelled case(s) {', '.join(sorted(missing)[:5])}")
    if not cases:
        raise MedsegError(f"{spec.root}: no labelled case to train on")
    return replace(spec, cases=tuple(cases), test_cases=())


def site_summary(spec: DatasetSpec, *, case_ids: list[str] | None = None, seed: int = 0) -> str:
    """A site's fingerprint as a JSON string (what leaves the site before training)."""
    fp = compute_fingerprint(subset(spec, case_ids), num_workers=1, seed=seed, show_progress=False)
    return json.dumps(to_jsonable(fp))


def fingerprint_from_json(text: str) -> Fingerprint:
    """A fingerprint sent by a site (checked: plain JSON with the expected fields)."""
    try:
        return from_jsonable(Fingerprint, json.loads(text))
    except (TypeError, ValueError, KeyError) as exc:
        raise MedsegError(f"a site sent an unreadable fingerprint ({exc})") from None


def _pool(stats: list[ChannelStats], weights: np.ndarray) -> ChannelStats:
    w = weights / weights.sum()
    mean = float(sum(wi * s.mean for wi, s in zip(w, stats)))
    # pooled variance: within-site plus between-site
    var = float(sum(wi * (s.std**2 + (s.mean - mean) ** 2) for wi, s in zip(w, stats)))

    def avg(name: str) -> float:
        return float(sum(wi * getattr(s, name) for wi, s in zip(w, stats)))

    return ChannelStats(
        mean=mean,
        std=float(np.sqrt(max(var, 0.0))),
        median=avg("median"),
        p00_5=avg("p00_5"),
        p99_5=avg("p99_5"),
        minimum=min(s.minimum for s in stats),
        maximum=max(s.maximum for s in stats),
    )


def merge_summaries(summaries: list[Fingerprint], *, name: str | None = None) -> Fingerprint:
    """One fingerprint of all sites' data, from their summaries.

    Raises
    ------
    MedsegError
        When sites disagree on dimensionality, channels or labels (they would not train
        one model).
    """
    if not summaries:
        raise MedsegError("no site sent a fingerprint")
    first = summaries[0]
    for i, fp in enumerate(summaries[1:], 1):
        for field in ("ndim", "channel_names", "labels"):
            if getattr(fp, field) != getattr(first, field):
                raise MedsegError(
                    f"site {i} disagrees on {field}: {getattr(fp, field)} vs {getattr(first, field)}"
                )
    cases = np.array([fp.num_cases for fp in summaries], dtype=float)
    voxels = np.array([float(np.sum([np.prod(s) for s in fp.cropped_shapes])) for fp in summaries])
    stats = tuple(
        _pool([fp.foreground_intensities[c] for fp in summaries], cases)
        for c in range(len(first.channel_names))
    )
    return Fingerprint(
        dataset_name=name or first.dataset_name,
        ndim=first.ndim,
        channel_names=first.channel_names,
        is_ct=tuple(bool(any(v)) for v in zip(*(fp.is_ct for fp in summaries))),
        labels=first.labels,
        num_cases=int(cases.sum()),
        spacings=tuple(s for fp in summaries for s in fp.spacings),
        shapes=tuple(s for fp in summaries for s in fp.shapes),
        cropped_shapes=tuple(s for fp in summaries for s in fp.cropped_shapes),
        crop_volume_ratio=float(
            np.average([fp.crop_volume_ratio for fp in summaries], weights=cases)
        ),
        foreground_intensities=stats,
        class_voxel_fraction=tuple(
            float(v)
            for v in np.average(
                [fp.class_voxel_fraction for fp in summaries], axis=0, weights=voxels
            )
        ),
        class_case_fraction=tuple(
            float(v)
            for v in np.average([fp.class_case_fraction for fp in summaries], axis=0, weights=cases)
        ),
    )
