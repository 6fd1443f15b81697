"""Pictures and files of an explanation: PNG overlays, the NIfTI map, a JSON record, HTML."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.explain.attribution import Explanation
from medseg.imaging.atomic import write_bytes_atomic
from medseg.io.files import write_image
from medseg.serialization import write_json_atomic

REPORT_FILE = "report.html"


def _window(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1, 99])
    return float(low), float(high if high > low else low + 1)


def overlay_png(explanation: Explanation, *, title: str | None = None) -> bytes:
    """Three orthogonal slices (one for 2D) through the region's centre: image in grey,
    positive attribution in a heat map on top, the region's outline in cyan."""
    from matplotlib.figure import Figure

    image = np.asarray(explanation.image.array, dtype=np.float32)
    attr = np.asarray(explanation.attribution.array, dtype=np.float32)
    region = np.asarray(explanation.region.array) > 0
    positive = np.clip(attr, 0, None)
    scale = float(positive.max()) or 1.0
    where = np.nonzero(region)
    centre = [int(np.round(w.mean())) if w.size else n // 2 for w, n in zip(where, region.shape)]
    if image.ndim == 2:
        views = [(image, positive, region)]
        names = ["image"]
    else:
        views, names = [], []
        for axis, name in zip(range(3), ("axis 0", "axis 1", "axis 2"), strict=True):
            index = [slice(None)] * 3
            index[axis] = centre[axis]
            views.append(tuple(v[tuple(index)] for v in (image, positive, region)))
            names.append(f"{name} = {centre[axis]}")
    low, high = _window(image)
    figure = Figure(figsize=(3.4 * len(views), 3.6), dpi=100)
    for k, ((img, pos, reg), name) in enumerate(zip(views, names, strict=True)):
        ax = figure.add_subplot(1, len(views), k + 1)
        ax.imshow(img.T, cmap="gray", vmin=low, vmax=high, origin="lower")
        heat = np.ma.masked_less_equal(pos.T / scale, 0.02)
        ax.imshow(heat, cmap="hot", vmin=0, vmax=1, alpha=0.6, origin="lower")
        if reg.any():
            ax.contour(reg.T.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    figure.suptitle(
        title
        or f"{explanation.method}: {explanation.class_name} "
        f"({100 * explanation.mass_in_dilated_region:.0f}% of positive mass within "
        f"{explanation.dilation_voxels} voxels of the region)",
        fontsize=9,
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def record(explanation: Explanation, files: dict[str, str]) -> dict:
    """The JSON record of an explanation (no arrays)."""
    return {
        "method": explanation.method,
        "class_value": explanation.class_value,
        "class_name": explanation.class_name,
        "target_mean_logit": explanation.target,
        "seconds": round(explanation.seconds, 3),
        "positive_mass_in_region": explanation.mass_in_region,
        "positive_mass_in_dilated_region": explanation.mass_in_dilated_region,
        "dilation_voxels": explanation.dilation_voxels,
        "settings": explanation.settings,
        "files": files,
    }


def write_explanation(
    explanation: Explanation, output_dir: str | os.PathLike, *, case_id: str
) -> dict:
    """``<case>_<method>_<class>.nii.gz`` (the map), ``.png`` (overlay) and ``.json``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{case_id}_{explanation.method}_{explanation.class_name}"
    nifti = write_image(explanation.attribution, out / f"{stem}.nii.gz", overwrite=True)
    png = out / f"{stem}.png"
    write_bytes_atomic(overlay_png(explanation), png)
    files = {"map": nifti.name, "overlay": png.name}
    data = record(explanation, files) | {"case_id": case_id}
    write_json_atomic(data, out / f"{stem}.json")
    return data


def write_report(records: Sequence[dict], output_dir: str | os.PathLike) -> Path:
    """``report.html`` listing every explanation JSON of the folder (and those given)."""
    out = Path(output_dir)
    known = {(r["case_id"], r["method"], r["class_name"]): r for r in records}
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"case_id", "method", "class_name", "files"} <= set(data):
            known.setdefault((data["case_id"], data["method"], data["class_name"]), data)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>medseg explanations</title></head><body style='font-family:sans-serif'>",
        "<h1>Explanations</h1>",
        "<p>Attribution of the mean logit of a class inside a region (its segmentation unless"
        " a mask was given). Heat: positive attribution (supports the class); cyan: the region."
        "</p>",
        "<table border='1' cellpadding='4'><tr><th>case</th><th>method</th><th>class</th>"
        "<th>positive mass in region</th><th>within 3 voxels</th><th>seconds</th></tr>",
    ]
    for (case_id, method, name), r in sorted(known.items()):
        parts.append(
            f"<tr><td>{html.escape(case_id)}</td><td>{html.escape(method)}</td>"
            f"<td>{html.escape(name)}</td><td>{_pct(r['positive_mass_in_region'])}</td>"
            f"<td>{_pct(r['positive_mass_in_dilated_region'])}</td><td>{r['seconds']:.2f}</td></tr>"
        )
    parts.append("</table>")
    for (case_id, method, name), r in sorted(known.items()):
        png = out / r["files"]["overlay"]
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            caption = f"{case_id}: {method}, {name}"
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)} (map: {html.escape(r['files']['map'])})"
                "</figcaption></figure>"
            )
    parts.append("</body></html>")
    path = out / REPORT_FILE
    write_bytes_atomic("\n".join(parts).encode("utf-8"), path)
    return path


def _pct(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"
