"""A self-contained HTML evaluation report, and contour overlay figures.

Figures are drawn with matplotlib's Agg renderer (no display, no global
pyplot state) and embedded as base64 PNG data URIs: the HTML file links to
nothing outside itself.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.evaluation.evaluate import EvaluationReport, write_bytes_atomic
from medseg.io.image import Image

REFERENCE_COLOUR = "#22dd22"  # green
PREDICTION_COLOUR = "#ff2020"  # red
MAX_WORST_CASES = 5
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def worst_cases(report: EvaluationReport, n: int = MAX_WORST_CASES) -> list[str]:
    """Up to ``n`` case ids with the lowest mean Dice over classes, worst first.

    Cases where every class is empty in both masks (NaN mean) are left out.
    """
    means = report.mean_dice_per_case()
    scored = [(score, case_id) for case_id, score in means.items() if not math.isnan(score)]
    return [case_id for _, case_id in sorted(scored)[:n]]


def _lps_order(image: Image) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """For each world axis (L, P, S), the array axis closest to it and whether it runs backwards."""
    direction = image.direction_matrix
    world_of_axis = [int(np.argmax(np.abs(direction[:, a]))) for a in range(image.ndim)]
    if sorted(world_of_axis) != list(range(image.ndim)):  # too oblique to tell: keep as stored
        return tuple(range(image.ndim)), (False,) * image.ndim
    order = tuple(world_of_axis.index(w) for w in range(image.ndim))
    flips = tuple(bool(direction[w, order[w]] < 0) for w in range(image.ndim))
    return order, flips


def _reorient(array: np.ndarray, order: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    out = np.transpose(array, order)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out


def _display_window(array: np.ndarray) -> tuple[float, float]:
    sample = array.ravel()[:: max(1, array.size // 1_000_000)].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(sample, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def _centre_index(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, ...]:
    """Centre of mass of the reference foreground (else the prediction's, else the middle)."""
    for mask in (reference > 0, prediction > 0):
        if mask.any():
            coords = np.nonzero(mask)
            return tuple(int(round(float(c.mean()))) for c in coords)
    return tuple(s // 2 for s in reference.shape)


def _panels(
    image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    """Display slices ``(name, image, reference, prediction, aspect)`` from LPS-ordered arrays.

    Rows are the vertical screen axis: a 2D slice ``(x, y)`` is transposed so x
    runs horizontally; coronal and sagittal slices are flipped so superior is up.
    """
    if image.ndim == 2:
        return [("", image.T, reference.T, prediction.T, spacing[1] / spacing[0])]
    x, y, z = _centre_index(reference, prediction)
    sx, sy, sz = spacing
    cuts = [
        (f"axial z={z}", np.s_[:, :, z], False, sy / sx),
        (f"coronal y={y}", np.s_[:, y, :], True, sz / sx),
        (f"sagittal x={x}", np.s_[x, :, :], True, sz / sy),
    ]
    panels = []
    for name, index, superior_up, aspect in cuts:
        slices = [a[index].T for a in (image, reference, prediction)]
        if superior_up:
            slices = [s[::-1] for s in slices]
        panels.append((name, *slices, aspect))
    return panels


def _draw_contours(axes, mask_slice: np.ndarray, colour: str) -> None:
    for value in np.unique(mask_slice):
        if value == 0:
            continue
        mask = (mask_slice == value).astype(np.float32)
        if mask.all():
            continue
        axes.contour(mask, levels=[0.5], colors=[colour], linewidths=1.2)


def _figure_png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def render_overlay_png(
    image: Image | None, reference: Image, prediction: Image, *, title: str | None = None
) -> bytes:
    """PNG bytes of reference (green) and prediction (red) contours over the image in grey.

    3D images show axial, coronal and sagittal slices through the centre of mass
    of the reference foreground, in LPS display orientation (patient left on the
    screen's right, anterior and superior up); 2D images are shown whole. Pixel
    aspect follows the spacing. Without an image the contours are drawn on black.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if reference.shape != prediction.shape:
        raise MedsegError(
            f"overlay: prediction shape {prediction.shape} differs from reference shape {reference.shape}"
        )
    if image is not None and image.shape != reference.shape:
        raise MedsegError(
            f"overlay: image shape {image.shape} differs from reference shape {reference.shape}"
        )
    order, flips = _lps_order(reference)
    spacing = tuple(reference.spacing[a] for a in order)
    ref_array = _reorient(np.asarray(reference.array), order, flips)
    pred_array = _reorient(np.asarray(prediction.array), order, flips)
    if image is None:
        grey, window = np.zeros(ref_array.shape, dtype=np.float32), (0.0, 1.0)
    else:
        grey = _reorient(np.asarray(image.array), order, flips)
        window = _display_window(grey)
    panels = _panels(grey, ref_array, pred_array, spacing)

    figure = Figure(figsize=(4.2 * len(panels), 4.8) if len(panels) > 1 else (6.4, 5.4))
    for i, (name, grey_slice, ref_slice, pred_slice, aspect) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        axes.imshow(
            grey_slice,
            cmap="gray",
            vmin=window[0],
            vmax=window[1],
            aspect=aspect,
            interpolation="nearest",
        )
        _draw_contours(axes, ref_slice, REFERENCE_COLOUR)
        _draw_contours(axes, pred_slice, PREDICTION_COLOUR)
        rows, columns = grey_slice.shape
        axes.set_xlim(-0.5, columns - 0.5)
        axes.set_ylim(rows - 0.5, -0.5)
        axes.set_title(name, fontsize=9)
        axes.set_axis_off()
    handles = [
        Line2D([], [], color=REFERENCE_COLOUR, linewidth=2, label="reference"),
        Line2D([], [], color=PREDICTION_COLOUR, linewidth=2, label="prediction"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    return _figure_png(figure)


def save_overlay_png(
    image: Image | None,
    reference: Image,
    prediction: Image,
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Write :func:`render_overlay_png`'s figure to ``path`` (atomically) and return the path."""
    path = Path(path)
    write_bytes_atomic(render_overlay_png(image, reference, prediction, title=title), path)
    return path


def dice_boxplot_png(report: EvaluationReport) -> bytes:
    """PNG bytes of a box plot of Dice per class, cases as dots (NaN left out)."""
    from matplotlib.figure import Figure

    names = [name for _, name in report.labels]
    scores = [
        np.asarray(
            [r.dice for r in report.cases if r.label == value and not math.isnan(r.dice)],
            dtype=float,
        )
        for value, _ in report.labels
    ]
    figure = Figure(figsize=(min(20.0, max(4.5, 1.0 + 0.7 * len(names))), 4.2))
    axes = figure.add_subplot(1, 1, 1)
    positions = np.arange(1, len(names) + 1)
    filled = [(p, s) for p, s in zip(positions, scores) if s.size]
    if filled:
        axes.boxplot(
            [s for _, s in filled], positions=[p for p, _ in filled], widths=0.5, showfliers=False
        )
    jitter = np.random.default_rng(0)
    for position, values in filled:
        offsets = jitter.uniform(-0.12, 0.12, size=values.size)
        axes.scatter(position + offsets, values, s=8, alpha=0.5, color="#1f77b4", zorder=3)
    axes.set_xticks(positions)
    axes.set_xticklabels(
        names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
    )
    axes.set_xlim(0.4, len(names) + 0.6)
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("Dice")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _figure_png(figure)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _format_score(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _summary_table(report: EvaluationReport) -> str:
    header = (
        "<tr><th>Class</th><th>Value</th><th>Mean Dice</th><th>Median Dice</th><th>Mean IoU</th>"
        "<th>Median IoU</th><th>Scored cases</th><th>Empty reference</th><th>Empty in both</th></tr>"
    )
    per_class = report.summary.get("per_class", {})
    rows = []
    for value, name in report.labels:
        stats = per_class.get(str(value), {})
        dice, iou = stats.get("dice", {}), stats.get("iou", {})
        cells = [
            html.escape(name),
            str(value),
            _format_score(dice.get("mean")),
            _format_score(dice.get("median")),
            _format_score(iou.get("mean")),
            _format_score(iou.get("median")),
            f"{stats.get('n_scored', '')} / {stats.get('n_cases', '')}",
            str(stats.get("n_empty_reference", "")),
            str(stats.get("n_both_empty", "")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    mean_dice = _format_score(report.summary.get("mean_foreground_dice"))
    mean_iou = _format_score(report.summary.get("mean_foreground_iou"))
    rows.append(
        f"<tr class='total'><td>mean over classes</td><td></td><td>{mean_dice}</td><td></td>"
        f"<td>{mean_iou}</td><td></td><td></td><td></td><td></td></tr>"
    )
    return f"<table>{header}{''.join(rows)}</table>"


def _case_cell(dice: float, iou: float, empty_reference: bool, empty_prediction: bool) -> str:
    if math.isnan(dice):
        return "<td class='na'>empty in both</td>"
    note = " (no reference)" if empty_reference else " (no prediction)" if empty_prediction else ""
    return f"<td>{dice:.3f} / {iou:.3f}{note}</td>"


def _case_table(report: EvaluationReport) -> str:
    means = report.mean_dice_per_case()
    order = sorted(
        means, key=lambda c: (math.isnan(means[c]), means[c] if not math.isnan(means[c]) else 0, c)
    )
    rows_by_case: dict[str, dict[int, object]] = {c: {} for c in order}
    for row in report.cases:
        rows_by_case[row.case_id][row.label] = row
    header = "<tr><th>Case</th><th>Mean Dice</th>" + "".join(
        f"<th>{html.escape(name)}<br><small>Dice / IoU</small></th>" for _, name in report.labels
    )
    lines = [header + "</tr>"]
    for case_id in order:
        cells = [f"<td>{html.escape(case_id)}</td>", f"<td>{_format_score(means[case_id])}</td>"]
        for value, _ in report.labels:
            row = rows_by_case[case_id].get(value)
            cells.append(
                "<td></td>"
                if row is None
                else _case_cell(row.dice, row.iou, row.empty_reference, row.empty_prediction)
            )
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='scroll'><table>{''.join(lines)}</table></div>"


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
tr.total td { font-weight: bold; }
td.na { color: #888; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0; }
figcaption { font-size: 0.9em; color: #444; }
img { max-width: 100%; }
.warning { color: #a04000; }
"""


def write_html_report(
    report: EvaluationReport,
    output_path: str | os.PathLike,
    *,
    images: Mapping[str, Image] | None = None,
    predictions: Mapping[str, Image],
    references: Mapping[str, Image],
    curves_png: str | os.PathLike | None = None,
    title: str = "medseg report",
    extra_sections: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """Write one self-contained HTML file describing an evaluation.

    Parameters
    ----------
    report
        The evaluation to describe.
    output_path
        The HTML file, replaced atomically if it exists.
    images, predictions, references
        Per case id; overlays are drawn for the worst (up to 5) cases by mean
        Dice that have a prediction and a reference here. Images are optional.
    curves_png
        A PNG (training loss/Dice curves) to embed.
    title
        Page title.
    extra_sections
        ``(heading, html)`` pairs appended as they are (the HTML is trusted).

    Returns
    -------
    Path
        ``output_path``.
    """
    images = images or {}
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(report.case_ids)} cases, {len(report.labels)} classes; mean foreground Dice "
        f"{_format_score(report.summary.get('mean_foreground_dice'))}.</p>",
    ]
    warnings = report.summary.get("warnings") or []
    if warnings:
        parts.append(
            "<ul>"
            + "".join(f"<li class='warning'>{html.escape(w)}</li>" for w in warnings)
            + "</ul>"
        )
    parts += ["<h2>Summary</h2>", _summary_table(report)]
    parts += [
        "<h2>Dice per class</h2>",
        f"<img alt='Dice per class' src='{_data_uri(dice_boxplot_png(report))}'>",
    ]
    if curves_png is not None:
        curves = Path(curves_png)
        try:
            data = curves.read_bytes()
        except OSError as exc:
            raise MedsegError(f"{curves}: cannot read training curves ({exc.strerror})") from None
        if not data.startswith(_PNG_MAGIC):
            raise MedsegError(f"{curves}: training curves must be a PNG file")
        parts += [
            "<h2>Training curves</h2>",
            f"<img alt='training curves' src='{_data_uri(data)}'>",
        ]

    means = report.mean_dice_per_case()
    shown = [c for c in worst_cases(report, n=len(means)) if c in predictions and c in references]
    shown = shown[:MAX_WORST_CASES]
    parts.append("<h2>Worst cases</h2>")
    if not shown:
        parts.append("<p>No case to show.</p>")
    for case_id in shown:
        caption = f"{case_id}: mean Dice {_format_score(means[case_id])}"
        png = render_overlay_png(
            images.get(case_id), references[case_id], predictions[case_id], title=caption
        )
        parts.append(
            f"<figure><img alt='{html.escape(case_id)}' src='{_data_uri(png)}'>"
            f"<figcaption>{html.escape(caption)} (reference green, prediction red)</figcaption></figure>"
        )
    parts += ["<h2>Per-case results</h2>", _case_table(report)]
    for heading, body in extra_sections or []:
        parts += [f"<h2>{html.escape(heading)}</h2>", body]
    parts.append("</body></html>")

    path = Path(output_path)
    write_bytes_atomic("\n".join(parts).encode("utf-8"), path)
    return path
