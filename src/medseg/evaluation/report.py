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
from medseg.evaluation.records import EvaluationReport
from medseg.imaging.atomic import write_bytes_atomic
from medseg.io.image import Image

REFERENCE_COLOUR = "#22dd22"  # green
PREDICTION_COLOUR = "#ff2020"  # red
MAX_WORST_CASES = 5
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _worst_label(report: EvaluationReport, case_id: str) -> tuple[int, str, float] | None:
    """The class with the lowest Dice in a case (NaN left out), for the overlay's slices."""
    rows = [r for r in report.cases if r.case_id == case_id and not math.isnan(r.dice)]
    if not rows:
        return None
    row = min(rows, key=lambda r: (r.dice, r.label))
    return row.label, row.label_name, row.dice


def _shown_labels(report: EvaluationReport) -> list[tuple[int, str]]:
    """Classes present (in a prediction or a reference) in at least one case."""
    present = {r.label for r in report.cases if not (r.empty_reference and r.empty_prediction)}
    return [(v, n) for v, n in report.labels if v in present]


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


def display_window(array: np.ndarray) -> tuple[float, float]:
    """Grey-level window of an image for display: its 0.5th to 99.5th percentile."""
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
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    focus_label: int | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    """Display slices ``(name, image, reference, prediction, aspect)`` from LPS-ordered arrays.

    Rows are the vertical screen axis: a 2D slice ``(x, y)`` is transposed so x
    runs horizontally; coronal and sagittal slices are flipped so superior is up.
    """
    if image.ndim == 2:
        return [("", image.T, reference.T, prediction.T, spacing[1] / spacing[0])]
    if focus_label is not None and (
        (reference == focus_label).any() or (prediction == focus_label).any()
    ):
        x, y, z = _centre_index(reference == focus_label, prediction == focus_label)
    else:
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
    image: Image | None,
    reference: Image,
    prediction: Image,
    *,
    title: str | None = None,
    focus_label: int | None = None,
) -> bytes:
    """PNG bytes of reference (green) and prediction (red) contours over the image in grey.

    3D images show axial, coronal and sagittal slices through the centre of mass
    of the reference foreground (of ``focus_label`` only when given and present,
    else of the prediction's), in LPS display orientation (patient left on the
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
        window = display_window(grey)
    panels = _panels(grey, ref_array, pred_array, spacing, focus_label)

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


_METRIC_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "hd": "HD (mm)",
    "hd95": "HD95 (mm)",
    "assd": "ASSD (mm)",
    "masd": "MASD (mm)",
    "nsd": "NSD",
    "boundary_iou": "boundary IoU",
    "precision": "precision",
    "recall": "recall",
    "volume_similarity": "volume similarity",
}
_BOUNDED = {"dice", "iou", "nsd", "boundary_iou", "precision", "recall", "volume_similarity"}


def _metric_values(
    report: EvaluationReport, metric: str, labels: Sequence[tuple[int, str]] | None = None
) -> list[np.ndarray]:
    out = []
    for value, _ in labels if labels is not None else report.labels:
        scores = [getattr(r, metric) for r in report.cases if r.label == value]
        out.append(
            np.asarray([s for s in scores if s is not None and math.isfinite(s)], dtype=float)
        )
    return out


def metric_distribution_png(report: EvaluationReport, metrics: str | Sequence[str]) -> bytes:
    """PNG bytes of violin plots with box plots inside, per class, one row per metric.

    Cases are dots; NaN (undefined, e.g. empty masks) values are left out (the
    tick labels give ``n=`` scored cases when there are few classes). Boxes
    alone are drawn where a class has a single case or no spread.
    """
    from matplotlib.figure import Figure

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    labels_shown = _shown_labels(report) or list(report.labels)
    names = [name for _, name in labels_shown]
    width = min(24.0, max(5.0, 1.0 + 0.6 * len(names)))
    figure = Figure(figsize=(width, 2.6 * len(metrics) + (1.6 if len(names) > 6 else 0.6)))
    positions = np.arange(1, len(names) + 1)
    jitter = np.random.default_rng(0)
    axes = None
    for row, metric in enumerate(metrics):
        axes = figure.add_subplot(len(metrics), 1, row + 1, sharex=axes)
        values = _metric_values(report, metric, labels_shown)
        filled = [(p, v) for p, v in zip(positions, values) if v.size]
        spread = [(p, v) for p, v in filled if v.size > 1 and np.ptp(v) > 0]
        if spread:
            parts = axes.violinplot(
                [v for _, v in spread],
                positions=[p for p, _ in spread],
                widths=0.8,
                showextrema=False,
            )
            for body in parts["bodies"]:
                body.set_facecolor("#9ecae1")
                body.set_alpha(0.6)
        boxed = [(p, v) for p, v in filled if v.size > 1]
        if boxed:
            axes.boxplot(
                [v for _, v in boxed],
                positions=[p for p, _ in boxed],
                widths=0.25,
                showfliers=False,
                manage_ticks=False,
            )
        for position, v in filled:
            offsets = jitter.uniform(-0.1, 0.1, size=v.size)
            axes.scatter(position + offsets, v, s=8, alpha=0.6, color="#1f5fa0", zorder=3)
        if metric in _BOUNDED:
            axes.set_ylim(-0.02, 1.02)
        else:
            top = max((float(v.max()) for _, v in filled), default=1.0)
            axes.set_ylim(0, top * 1.05 if top > 0 else 1.0)
        axes.set_ylabel(_METRIC_TITLES.get(metric, metric), fontsize=9)
        axes.grid(axis="y", alpha=0.3)
        axes.tick_params(axis="x", labelbottom=row == len(metrics) - 1)
    values = _metric_values(report, metrics[0], labels_shown)
    labels = [f"{n} (n={v.size})" if len(names) <= 12 else n for n, v in zip(names, values)]
    axes.set_xticks(positions)
    rotate = len(names) > 6
    axes.set_xticklabels(
        labels,
        rotation=60 if rotate else 0,
        ha="right" if rotate else "center",
        fontsize=7 if len(names) > 20 else 9,
    )
    axes.set_xlim(0.4, len(names) + 0.6)
    # Fixed margins: tight_layout measures every tick label and is slow with 100+ classes.
    bottom = 1.4 if rotate else 0.5
    height = figure.get_figheight()
    figure.subplots_adjust(
        left=0.9 / width,
        right=1 - 0.2 / width,
        top=1 - 0.2 / height,
        bottom=bottom / height,
        hspace=0.15,
    )
    return _figure_png(figure)


def volume_agreement(report: EvaluationReport) -> dict[str, dict[str, float | int | None]]:
    """Bland-Altman statistics of predicted against reference volumes (mL), per class.

    Returns
    -------
    dict
        ``{label: {"n", "bias_ml", "sd_ml", "loa_low_ml", "loa_high_ml"}}``: the
        mean difference (prediction - reference), its standard deviation
        (ddof 1) and the 95 % limits of agreement ``bias +- 1.96 sd``. Cases
        where both volumes are 0 are left out.
    """
    out = {}
    for value, _ in report.labels:
        rows = [
            r
            for r in report.cases
            if r.label == value and not (r.empty_reference and r.empty_prediction)
        ]
        diff = np.asarray(
            [(r.predicted_volume_mm3 - r.reference_volume_mm3) / 1000.0 for r in rows]
        )
        if diff.size == 0:
            out[str(value)] = {
                "n": 0,
                "bias_ml": None,
                "sd_ml": None,
                "loa_low_ml": None,
                "loa_high_ml": None,
            }
            continue
        bias = float(diff.mean())
        sd = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        out[str(value)] = {
            "n": int(diff.size),
            "bias_ml": bias,
            "sd_ml": sd,
            "loa_low_ml": bias - 1.96 * sd,
            "loa_high_ml": bias + 1.96 * sd,
        }
    return out


def bland_altman_png(report: EvaluationReport) -> bytes:
    """PNG bytes of a Bland-Altman plot of volumes: difference against mean, per class.

    Up to 12 classes get one panel each with their bias and 95 % limits of
    agreement; more classes share one panel of relative differences (percent
    of the mean volume), pooled bias and limits.
    """
    from matplotlib.figure import Figure

    stats = volume_agreement(report)
    labels = [(v, n) for v, n in report.labels if stats[str(v)]["n"]]
    per_panel = 0 < len(labels) <= 12
    columns = min(4, max(1, len(labels))) if per_panel else 1
    rows_n = math.ceil(len(labels) / columns) if per_panel else 1
    figure = Figure(figsize=(3.6 * columns + 0.6, 3.0 * rows_n + 0.4))
    if not labels:
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no volumes to compare", ha="center", va="center")
        axes.set_axis_off()
        return _figure_png(figure)

    def points(value: int, relative: bool) -> tuple[np.ndarray, np.ndarray]:
        rows = [
            r
            for r in report.cases
            if r.label == value and not (r.empty_reference and r.empty_prediction)
        ]
        pred = np.asarray([r.predicted_volume_mm3 for r in rows]) / 1000.0
        ref = np.asarray([r.reference_volume_mm3 for r in rows]) / 1000.0
        mean, diff = (pred + ref) / 2, pred - ref
        if relative:
            diff = 100.0 * diff / np.where(mean > 0, mean, np.nan)
        return mean, diff

    if per_panel:
        for i, (value, name) in enumerate(labels):
            axes = figure.add_subplot(rows_n, columns, i + 1)
            mean, diff = points(value, relative=False)
            s = stats[str(value)]
            axes.scatter(mean, diff, s=12, alpha=0.7, color="#1f5fa0")
            axes.axhline(s["bias_ml"], color="#d62728", linewidth=1.2)
            for limit in (s["loa_low_ml"], s["loa_high_ml"]):
                axes.axhline(limit, color="#d62728", linewidth=0.9, linestyle="--")
            axes.axhline(0, color="#555", linewidth=0.6)
            axes.set_title(f"{name}: bias {s['bias_ml']:+.2f} mL", fontsize=9)
            axes.set_xlabel("mean volume (mL)", fontsize=8)
            axes.set_ylabel("prediction - reference (mL)", fontsize=8)
            axes.tick_params(labelsize=7)
    else:
        axes = figure.add_subplot(1, 1, 1)
        all_diff = []
        cmap = __import__("matplotlib").colormaps["tab20"]
        for i, (value, _) in enumerate(labels):
            mean, diff = points(value, relative=True)
            axes.scatter(mean, diff, s=10, alpha=0.7, color=cmap(i % 20))
            all_diff.append(diff[np.isfinite(diff)])
        pooled = np.concatenate(all_diff)
        bias, sd = float(pooled.mean()), float(pooled.std(ddof=1)) if pooled.size > 1 else 0.0
        axes.axhline(bias, color="#d62728", linewidth=1.2)
        for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
            axes.axhline(limit, color="#d62728", linewidth=0.9, linestyle="--")
        axes.set_xscale("log")
        axes.set_title(f"{len(labels)} classes pooled: bias {bias:+.1f} %", fontsize=10)
        axes.set_xlabel("mean volume (mL)")
        axes.set_ylabel("difference (% of mean volume)")
    figure.tight_layout()
    return _figure_png(figure)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _format_score(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


_TABLE_COLUMNS = (
    ("dice", "mean", "Mean Dice"),
    ("dice", "median", "Median Dice"),
    ("iou", "mean", "Mean IoU"),
    ("hd95", "median", "Median HD95 (mm)"),
    ("hd", "median", "Median HD (mm)"),
    ("assd", "mean", "Mean ASSD (mm)"),
    ("masd", "mean", "Mean MASD (mm)"),
    ("nsd", "mean", "Mean NSD"),
    ("boundary_iou", "mean", "Mean boundary IoU"),
    ("lesion_f1", "mean", "Mean lesion F1"),
)


def _format_number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _summary_table(report: EvaluationReport) -> str:
    per_class = report.summary.get("per_class", {})
    columns = [
        c for c in _TABLE_COLUMNS if any(c[0] in stats for stats in per_class.values())
    ] or list(_TABLE_COLUMNS[:3])
    header = (
        "<tr><th>Class</th><th>Value</th>"
        + "".join(f"<th>{title}</th>" for _, _, title in columns)
        + "<th>Scored cases</th><th>Empty reference</th><th>Empty prediction</th>"
        "<th>Empty in both</th></tr>"
    )
    rows = []
    shown = _shown_labels(report) or list(report.labels)
    for value, name in shown:
        stats = per_class.get(str(value), {})
        cells = [html.escape(name), str(value)]
        cells += [_format_number(stats.get(m, {}).get(s)) for m, s, _ in columns]
        cells += [
            f"{stats.get('n_scored', '')} / {stats.get('n_cases', '')}",
            str(stats.get("n_empty_reference", "")),
            str(stats.get("n_empty_prediction", "")),
            str(stats.get("n_both_empty", "")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    over = report.summary.get("mean_over_classes", {})
    over.setdefault("dice", report.summary.get("mean_foreground_dice"))
    over.setdefault("iou", report.summary.get("mean_foreground_iou"))
    totals = [_format_number(over.get(m)) if s == "mean" else "" for m, s, _ in columns]
    rows.append(
        "<tr class='total'><td>mean over classes</td><td></td>"
        + "".join(f"<td>{t}</td>" for t in totals)
        + "<td></td>" * 4
        + "</tr>"
    )
    absent = [name for value, name in report.labels if (value, name) not in shown]
    note = (
        f"<p>{len(absent)} classes absent from every prediction and reference (not shown): "
        f"{html.escape(', '.join(absent))}.</p>"
        if absent
        else ""
    )
    return f"<div class='scroll'><table>{header}{''.join(rows)}</table></div>{note}"


def _settings_text(report: EvaluationReport) -> str:
    settings = report.summary.get("settings")
    if not settings:
        return ""
    policy = settings.get("empty_policy", "nan")
    policy_text = (
        "undefined scores are NaN (nnU-Net); statistics leave them out and count them"
        if policy == "nan"
        else "both empty scores perfect, one empty scores worst (BraTS-style penalty "
        f"{settings.get('max_distance_mm')})"
    )
    return (
        f"<p class='settings'>Empty masks: <b>{html.escape(policy)}</b>, {html.escape(policy_text)}."
        f" Surfaces as in DeepMind's surface-distance; HD{settings.get('hd_percentile', 95):g},"
        f" NSD at {settings.get('nsd_tolerance_mm', 2):g} mm, boundary IoU band"
        f" {settings.get('boundary_width_mm', 2):g} mm; distances in mm from the reference"
        " spacing.</p>"
    )


def _volume_table(report: EvaluationReport) -> str:
    stats = volume_agreement(report)
    header = (
        "<tr><th>Class</th><th>Cases</th><th>Bias (mL)</th><th>SD (mL)</th>"
        "<th>95% limits of agreement (mL)</th></tr>"
    )
    rows = []
    for value, name in _shown_labels(report):
        s = stats[str(value)]
        limits = (
            "n/a"
            if s["n"] == 0
            else f"{_format_number(s['loa_low_ml'])} to {_format_number(s['loa_high_ml'])}"
        )
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{s['n']}</td>"
            f"<td>{_format_number(s['bias_ml'])}</td><td>{_format_number(s['sd_ml'])}</td>"
            f"<td>{limits}</td></tr>"
        )
    return f"<div class='scroll'><table>{header}{''.join(rows)}</table></div>"


def _groups_html(report: EvaluationReport) -> str:
    groups = report.summary.get("groups")
    if not groups:
        return ""
    parts = []
    metrics = [m for m in ("dice", "hd95", "nsd") if m in _TABLE_COLUMNS_METRICS(report)]
    for grouping, data in groups.items():
        parts.append(f"<h3>By {html.escape(grouping)}</h3>")
        header = (
            "<tr><th>Group</th><th>Cases</th>"
            + "".join(
                f"<th>{html.escape(name)}<br><small>{' / '.join(metrics)} (mean)</small></th>"
                for _, name in report.labels
            )
            + "</tr>"
        )
        rows = []
        for group, summary in data["groups"].items():
            cells = [html.escape(group), str(summary["n_cases"])]
            for value, _ in report.labels:
                stats = summary["per_class"].get(str(value), {})
                cells.append(
                    " / ".join(_format_number(stats.get(m, {}).get("mean")) for m in metrics)
                )
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        gap_cells = ["gap (best - worst)", ""]
        for value, _ in report.labels:
            gap = data["gap"].get(str(value), {})
            gap_cells.append(
                " / ".join(_format_number(gap[m]["gap"]) if m in gap else "n/a" for m in metrics)
            )
        rows.append("<tr class='total'>" + "".join(f"<td>{c}</td>" for c in gap_cells) + "</tr>")
        parts.append(f"<div class='scroll'><table>{header}{''.join(rows)}</table></div>")
    return "".join(parts)


def _TABLE_COLUMNS_METRICS(report: EvaluationReport) -> set[str]:  # noqa: N802
    return {m for stats in report.summary.get("per_class", {}).values() for m in stats}


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
    parts += ["<h2>Summary</h2>", _settings_text(report), _summary_table(report)]
    present = _TABLE_COLUMNS_METRICS(report)
    shown = ["dice"] + [m for m in ("hd95", "assd", "nsd") if m in present]
    titles = ", ".join(_METRIC_TITLES[m] for m in shown)
    png = metric_distribution_png(report, shown)
    parts += [
        "<h2>Distributions per class</h2>",
        f"<p>{html.escape(titles)}: violin and box plots, one dot per case; undefined"
        " values (empty masks) and classes absent from every case are left out.</p>",
        f"<img alt='{html.escape(titles)} per class' src='{_data_uri(png)}'>",
    ]
    parts += [
        "<h2>Volume agreement (Bland-Altman)</h2>",
        "<p>Predicted minus reference volume against their mean; solid line: bias,"
        " dashed: 95% limits of agreement (bias &plusmn; 1.96 SD).</p>",
        f"<img alt='Bland-Altman volume agreement' src='{_data_uri(bland_altman_png(report))}'>",
        _volume_table(report),
    ]
    if report.summary.get("groups"):
        parts += ["<h2>Groups</h2>", _groups_html(report)]
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
        worst = _worst_label(report, case_id)
        caption = f"{case_id}: mean Dice {_format_score(means[case_id])}"
        if worst is not None:
            caption += f"; slices through {worst[1]} (Dice {_format_score(worst[2])})"
        png = render_overlay_png(
            images.get(case_id),
            references[case_id],
            predictions[case_id],
            title=caption,
            focus_label=None if worst is None else worst[0],
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
