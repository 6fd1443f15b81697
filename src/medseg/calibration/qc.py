"""Per-case quality control: which uncertainty score to report and where to flag a case.

On the cross-validation cases (each predicted by the fold that did not train on it), a
*failure* is a case whose mean foreground Dice is below the ``failure_quantile`` of those
Dice values (default: the 10th percentile). The score whose Spearman correlation with Dice
is most negative is chosen; the review threshold is the largest one that flags at least
``target_recall`` of the failures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

from medseg.errors import MedsegError
from medseg.inference.uncertainty import CASE_SCORES


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant or too short)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def failures(dice: Sequence[float], *, quantile: float = 0.1) -> tuple[np.ndarray, float]:
    """Which cases fail (Dice below the ``quantile`` of ``dice``) and that Dice value."""
    dice = np.asarray(dice, dtype=float)
    cut = float(np.quantile(dice, quantile))
    return dice < cut, cut


def review_threshold(
    scores: Sequence[float], failed: Sequence[bool], *, target_recall: float = 0.8
) -> float:
    """The largest score threshold that flags (score >= threshold) ``target_recall`` of failures."""
    scores, failed = np.asarray(scores, dtype=float), np.asarray(failed, dtype=bool)
    if not failed.any():
        raise MedsegError("no failing case among the validation cases: cannot set a threshold")
    ranked = np.sort(scores[failed])[::-1]
    k = max(1, math.ceil(target_recall * len(ranked) - 1e-9))
    return float(ranked[k - 1])


def recall_and_flagged(
    scores: Sequence[float], failed: Sequence[bool], threshold: float
) -> tuple[float, float]:
    """Recall of failures and fraction of cases flagged at ``threshold``."""
    scores, failed = np.asarray(scores, dtype=float), np.asarray(failed, dtype=bool)
    flagged = scores >= threshold
    recall = float(flagged[failed].mean()) if failed.any() else float("nan")
    return recall, float(flagged.mean())


def recall_at_fraction(
    scores: Sequence[float], failed: Sequence[bool], *, fraction: float = 0.1
) -> float:
    """Recall of failures when the ``fraction`` of cases with the highest scores is flagged."""
    scores, failed = np.asarray(scores, dtype=float), np.asarray(failed, dtype=bool)
    if not failed.any():
        return float("nan")
    n = max(1, int(round(fraction * len(scores))))
    top = np.argsort(-scores, kind="stable")[:n]
    return float(failed[top].sum() / failed.sum())


def choose_review(
    cases: Sequence[Mapping[str, float]],
    *,
    target_recall: float = 0.8,
    failure_quantile: float = 0.1,
    score: str | None = None,
) -> dict:
    """Score and threshold for ``predict --qc`` from validation cases.

    Parameters
    ----------
    cases
        One mapping per case with ``dice`` and the :data:`CASE_SCORES`.
    target_recall
        Share of the failing cases that the threshold must flag.
    failure_quantile
        Cases below this quantile of Dice are failures.
    score
        Use this score instead of the one that ranks Dice best.

    Returns
    -------
    dict
        ``score``, ``threshold``, ``target_recall``, ``failure_quantile``, ``failure_dice``,
        ``failures``, ``recall``, ``flagged_fraction``, ``recall_at_10_percent`` and
        ``spearman`` (per score, against Dice).
    """
    if len(cases) < 3:
        raise MedsegError(f"{len(cases)} validation case(s): too few to choose a QC threshold")
    dice = [float(c["dice"]) for c in cases]
    failed, cut = failures(dice, quantile=failure_quantile)
    rhos = {s: spearman([c[s] for c in cases], dice) for s in CASE_SCORES}
    if score is None:
        usable = {s: r for s, r in rhos.items() if np.isfinite(r)}
        if not usable:
            raise MedsegError("every uncertainty score is constant on the validation cases")
        score = min(usable, key=usable.get)  # most negative: high score, low Dice
    elif score not in CASE_SCORES:
        raise MedsegError(f"unknown score {score!r} (use one of {', '.join(CASE_SCORES)})")
    values = [float(c[score]) for c in cases]
    threshold = review_threshold(values, failed, target_recall=target_recall)
    recall, flagged = recall_and_flagged(values, failed, threshold)
    return {
        "score": score,
        "threshold": threshold,
        "target_recall": target_recall,
        "failure_quantile": failure_quantile,
        "failure_dice": cut,
        "failures": int(failed.sum()),
        "recall": recall,
        "flagged_fraction": flagged,
        "recall_at_10_percent": recall_at_fraction(values, failed, fraction=0.1),
        "spearman": rhos,
    }
