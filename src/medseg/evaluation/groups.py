"""Grouped evaluation: the same summary per subgroup of cases (site, sex, scanner...) and the gaps.

A fairness check: a model that scores well on average may still fail one
site or one scanner. For every grouping (a column of the groups CSV), each
group gets the statistics :func:`medseg.evaluation.records.summarize` gives
the whole set, and each class and metric gets the gap between the best and
the worst group mean.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

from medseg.errors import MedsegError
from medseg.evaluation.metrics import HIGHER_IS_BETTER
from medseg.evaluation.records import EvaluationReport, summarize

UNASSIGNED = "(no group)"
_CASE_COLUMNS = ("case", "case_id", "case id", "id", "subject")

GroupsArg = Mapping[str, Mapping[str, str] | str] | str | os.PathLike


def read_groups(groups: GroupsArg) -> dict[str, dict[str, str]]:
    """Case subgroups as ``{grouping: {case_id: group}}``.

    Parameters
    ----------
    groups
        A CSV file with a header: the case column (``case``, ``case_id``,
        ``id`` or ``subject``, else the first column) and one column per
        grouping (empty cells leave a case out of that grouping); or a mapping
        ``{grouping: {case: group}}``; or a flat ``{case: group}`` (grouping
        ``group``).

    Raises
    ------
    MedsegError
        Naming the CSV file and its problem (missing, no grouping column,
        a case listed twice).
    """
    if isinstance(groups, Mapping):
        if groups and all(isinstance(v, str) for v in groups.values()):
            return {"group": {str(k): str(v) for k, v in groups.items()}}
        return {str(g): {str(c): str(v) for c, v in table.items()} for g, table in groups.items()}
    path = Path(groups)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise MedsegError(f"{path}: groups file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedsegError(f"{path}: cannot read the groups CSV ({exc})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise MedsegError(f"{path}: needs a header and a case column plus one grouping column")
    header = [h.strip() for h in rows[0]]
    lowered = [h.lower() for h in header]
    case_col = next((lowered.index(c) for c in _CASE_COLUMNS if c in lowered), 0)
    out: dict[str, dict[str, str]] = {h: {} for i, h in enumerate(header) if i != case_col}
    for line, row in enumerate(rows[1:], start=2):
        row = row + [""] * (len(header) - len(row))
        case_id = row[case_col].strip()
        if not case_id:
            raise MedsegError(f"{path}: line {line} has no case id")
        for i, name in enumerate(header):
            if i == case_col or not row[i].strip():
                continue
            if case_id in out[name]:
                raise MedsegError(f"{path}: case {case_id} is listed twice")
            out[name][case_id] = row[i].strip()
    return out


def _gap(per_group: Mapping[str, dict], label: str, metric: str) -> dict | None:
    means = {
        group: stats["per_class"][label][metric]["mean"]
        for group, stats in per_group.items()
        if metric in stats["per_class"].get(label, {})
        and stats["per_class"][label][metric]["mean"] is not None
    }
    if len(means) < 2:
        return None
    higher = metric in HIGHER_IS_BETTER
    best = (max if higher else min)(means, key=means.get)
    worst = (min if higher else max)(means, key=means.get)
    return {"gap": abs(means[best] - means[worst]), "best": best, "worst": worst}


def group_summaries(report: EvaluationReport, groups: GroupsArg) -> dict:
    """Per grouping: per-group summaries, the gaps between groups, and the cases without a group.

    Returns
    -------
    dict
        ``{grouping: {"groups": {group: summary}, "gap": {label: {metric:
        {"gap", "best", "worst"}}}, "unassigned": [case ids], "unknown": [case ids]}}``.
        The gap is between group means, best and worst by the metric's own
        direction (Dice higher, distances lower).
    """
    table = read_groups(groups)
    case_ids = set(report.case_ids)
    out = {}
    for grouping, assignment in table.items():
        members: dict[str, list] = {}
        for row in report.cases:
            members.setdefault(assignment.get(row.case_id, UNASSIGNED), []).append(row)
        per_group = {g: summarize(rows, report.labels) for g, rows in sorted(members.items())}
        for stats in per_group.values():
            stats.pop("warnings", None)
            stats.pop("labels", None)
        assigned = {g: s for g, s in per_group.items() if g != UNASSIGNED}
        metrics = sorted(
            {
                m
                for s in assigned.values()
                for c in s["per_class"].values()
                for m, v in c.items()
                if isinstance(v, dict) and "mean" in v
            }
        )
        gap = {}
        for value, _ in report.labels:
            label = str(value)
            gaps = {m: _gap(assigned, label, m) for m in metrics}
            gap[label] = {m: g for m, g in gaps.items() if g is not None}
        out[grouping] = {
            "groups": per_group,
            "gap": gap,
            "unassigned": sorted(c for c in case_ids if c not in assignment),
            "unknown": sorted(c for c in assignment if c not in case_ids),
        }
    return out


def with_group_summaries(report: EvaluationReport, groups: GroupsArg) -> EvaluationReport:
    """The report with ``summary["groups"]`` (see :func:`group_summaries`) and warnings added."""
    summaries = group_summaries(report, groups)
    warnings = list(report.summary.get("warnings", []))
    for grouping, data in summaries.items():
        if data["unassigned"]:
            warnings.append(
                f"groups '{grouping}': {len(data['unassigned'])} case(s) without a group"
            )
        if data["unknown"]:
            warnings.append(
                f"groups '{grouping}': {len(data['unknown'])} listed case(s) were not evaluated"
            )
    summary = {**report.summary, "groups": summaries, "warnings": warnings}
    return EvaluationReport(labels=report.labels, cases=report.cases, summary=summary)
