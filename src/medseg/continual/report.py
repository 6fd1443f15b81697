"""The report of an extension step: Dice before and after, forgetting per class.

``report.json`` holds the numbers (see :func:`medseg.continual.extend.step_report`);
``report.html`` shows them as a table and a bar chart (a matplotlib ``Figure``, never
pyplot's global state, embedded as a PNG data URI so the file stands alone).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from medseg.serialization import write_json_atomic

COLUMNS = (
    ("old_task_before", "old task, before"),
    ("old_task_after", "old task, after"),
    ("forgetting", "forgetting"),
    ("new_task_before", "new task, before"),
    ("new_task_after", "new task, after"),
)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def step_figure(report: dict[str, Any]) -> Figure:
    """Grouped bars per class: old-task and new-task Dice before and after the step."""
    rows = report["rows"]
    figure = Figure(figsize=(max(4.8, 1.6 * len(rows) + 2.0), 3.6))
    ax = figure.add_subplot(1, 1, 1)
    series = [k for k, _ in COLUMNS if k != "forgetting"]
    labels = dict(COLUMNS)
    colors = {
        "old_task_before": "#9ecae1",
        "old_task_after": "#08519c",
        "new_task_before": "#fdae6b",
        "new_task_after": "#d94801",
    }
    width = 0.8 / len(series)
    for i, key in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ys = [r.get(key) if r.get(key) is not None else math.nan for r in rows]
        ax.bar(xs, ys, width=width, label=labels[key], color=colors[key])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([str(r["name"]) for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(f"{report['mode']}-incremental step")
    ax.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def figure_data_uri(figure: Figure) -> str:
    """A figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def step_html(report: dict[str, Any], *, title: str) -> str:
    """The report as one self-contained HTML page."""
    head = "".join(f"<th>{html.escape(name)}</th>" for _, name in COLUMNS)
    body = "".join(
        "<tr><td>"
        + html.escape(f"{r['class']}: {r['name']}")
        + "</td>"
        + "".join(f"<td>{_cell(r.get(k))}</td>" for k, _ in COLUMNS)
        + "</tr>"
        for r in report["rows"]
    )
    means = "".join(f"<td>{_cell(report.get(f'mean_{k}'))}</td>" for k, _ in COLUMNS)
    note = (
        f"Old task: {report['old_task_cases']} validation case(s) of the old data"
        + (
            ""
            if report["old_task_cases"]
            else " (none given: pass the old dataset to measure forgetting)"
        )
        + f"; new task: {report['new_task_cases']} validation case(s) of the new data. "
        "Dice at the preprocessed resolution; forgetting = old-task Dice before minus after. "
        "Before the step the old network cannot predict a new class (Dice 0)."
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>"
        f"<table><tr><th>class</th>{head}</tr>{body}<tr><td>mean</td>{means}</tr></table>"
        f"<p><img alt='Dice before and after' src='{figure_data_uri(step_figure(report))}'></p>"
        "</body></html>"
    )


def write_step_report(report: dict[str, Any], output_dir: str | os.PathLike, *, title: str) -> Path:
    """Write ``report.json`` and ``report.html`` into ``output_dir``; returns the HTML path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out / "report.json")
    path = out / "report.html"
    path.write_text(step_html(report, title=title))
    return path
