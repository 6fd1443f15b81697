"""Registration report: check-board and overlay of fixed vs warped, Jacobian map, as PNG and HTML."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.figure import Figure  # not pyplot: no global backend, no window

from medseg.imaging.atomic import atomic_path, write_text_atomic
from medseg.io.files import to_sitk
from medseg.io.image import Image


def _slices(image: Image) -> list[tuple[str, np.ndarray]]:
    """The middle slice along each axis (2D images: the image), displayed with y down."""
    a = np.asarray(image.array, dtype=np.float32)
    if a.ndim == 2:
        return [("", a.T)]
    x, y, z = (s // 2 for s in a.shape)
    return [
        ("axial", a[:, :, z].T),
        ("coronal", a[:, y, :].T[::-1]),
        ("sagittal", a[x, :, :].T[::-1]),
    ]


def _rescale(image: Image) -> Image:
    a = np.asarray(image.array, dtype=np.float32)
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0, 1)
    return image.with_array(np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))


def checkerboard(fixed: Image, warped: Image, *, squares: int = 6) -> Image:
    """SimpleITK's check-board of the two images (intensities rescaled to [0, 1] first)."""
    f, w = to_sitk(_rescale(fixed)), to_sitk(_rescale(warped))
    w.CopyInformation(f)
    board = sitk.CheckerBoard(f, w, [squares] * fixed.ndim)
    array = sitk.GetArrayFromImage(board).transpose(tuple(range(fixed.ndim))[::-1])
    return fixed.with_array(array)


def save_views(
    fixed: Image,
    warped: Image,
    out_dir: str | os.PathLike,
    *,
    jacobian: Image | None = None,
    moving_on_fixed: Image | None = None,
) -> dict[str, Path]:
    """Write ``checkerboard.png``, ``overlay.png`` and ``jacobian.png``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    board = _slices(checkerboard(fixed, warped))
    f_sl, w_sl = _slices(_rescale(fixed)), _slices(_rescale(warped))
    rows = [("check-board, fixed | warped", board)]
    if moving_on_fixed is not None:
        rows.insert(0, ("check-board before", _slices(checkerboard(fixed, moving_on_fixed))))
    fig = Figure(figsize=(3.2 * len(board), 3.2 * len(rows)))
    axes = fig.subplots(len(rows), len(board), squeeze=False)
    for r, (title, sl) in enumerate(rows):
        for c, (name, a) in enumerate(sl):
            axes[r, c].imshow(a, cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_title(f"{title} {name}".strip(), fontsize=8)
            axes[r, c].axis("off")
    paths["checkerboard"] = _save(fig, out / "checkerboard.png")
    fig = Figure(figsize=(3.2 * len(f_sl), 3.4))
    axes = fig.subplots(1, len(f_sl), squeeze=False)
    for c, ((name, fa), (_, wa)) in enumerate(zip(f_sl, w_sl)):
        rgb = np.stack([fa, wa, fa], axis=-1)  # fixed magenta, warped green, grey where they agree
        axes[0, c].imshow(np.clip(rgb, 0, 1))
        axes[0, c].set_title(f"fixed (magenta) vs warped (green) {name}".strip(), fontsize=7)
        axes[0, c].axis("off")
    paths["overlay"] = _save(fig, out / "overlay.png")
    if jacobian is not None:
        j_sl = _slices(jacobian)
        fig = Figure(figsize=(3.4 * len(j_sl), 3.4))
        axes = fig.subplots(1, len(j_sl), squeeze=False)
        im = None
        for c, (name, ja) in enumerate(j_sl):
            im = axes[0, c].imshow(ja, cmap="RdBu_r", vmin=0, vmax=2)
            folded = np.ma.masked_where(ja > 0, np.ones_like(ja))
            axes[0, c].imshow(folded, cmap="autumn", vmin=0, vmax=1)  # folding in yellow
            axes[0, c].set_title(f"Jacobian determinant {name}".strip(), fontsize=8)
            axes[0, c].axis("off")
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
        paths["jacobian"] = _save(fig, out / "jacobian.png", tight=False)
    return paths


def _save(fig, path: Path, *, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path


def write_report(
    out_dir: str | os.PathLike,
    *,
    title: str,
    summary: dict,
    images: dict[str, Path],
) -> Path:
    """A self-contained ``report.html`` beside the PNGs (relative links)."""
    out = Path(out_dir)
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in summary.items()
    )
    figures = "".join(
        f'<h2>{html.escape(name)}</h2><img src="{html.escape(Path(p).name)}" alt="{html.escape(name)}">'
        for name, p in images.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>{figures}</body></html>\n"
    )
    return write_text_atomic(page, out / "report.html")
