"""Head circumference on HC18: medseg's ellipse fit against the challenge's reference HC.

Measures the fetal head circumference of the 16 validation cases of ``splits/hc18.json``
(``--cases all``: all 80 images of ``../shared/datasets/HC18_fetal_head_US``) from a folder
of predicted masks (``--predictions DIR``, e.g. ``medseg predict`` output) or, by default,
from the dataset's reference masks, against ``pixel_size_and_HC.csv``. The pixel size of
every mask comes from that CSV (a PNG holds none).

The reference masks are a sanity anchor: the challenge's HC is the circumference of the
ellipse the annotators drew; the masks are those outlines filled, so refitting them carries
the drawing's line width and rasterization (the issue expects about 1 mm). Beside
medseg's fit to the outline (:func:`medseg.evaluation.biometry.measure_head`) the result
holds the ellipse of the mask's second moments (``skimage.measure.regionprops``), which
the image border biases where it cuts the head.

Writes ``results/biometry_hc18_reference.json`` (reference masks) or
``results/biometry_hc18.json`` (``--predictions``; ``--out`` to choose), with the machine.

Run: ``.venv/bin/python benchmarks/biometry.py [--predictions DIR] [--cases val|all] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from skimage.measure import regionprops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg.evaluation.biometry import (  # noqa: E402
    compare_to_reference,
    list_segmentations,
    match_case,
    measure_head,
    ramanujan_circumference,
    read_pixel_sizes,
    read_reference_hc,
    render_head_overlay_png,
    with_pixel_size,
)
from medseg.imaging import keep_largest_component  # noqa: E402
from medseg.io import read_image  # noqa: E402

DATASET = SHARED / "HC18_fetal_head_US"
SPLIT = Path(__file__).resolve().parent / "splits" / "hc18.json"
GOAL_MM = 2.0  # issue 24: mean absolute HC error <= 2.0 mm


def moments_hc(array: np.ndarray, pixel_size: float) -> float:
    """HC of the ellipse with the same second moments as the largest component (the biased way)."""
    head = keep_largest_component((array > 0).astype(np.uint8))
    props = regionprops(head)[0]
    a, b = props.axis_major_length / 2, props.axis_minor_length / 2
    return ramanujan_circumference(a * pixel_size, b * pixel_size)


def brief(comparison: dict) -> dict:
    keep = ("n", "mean_absolute_error_mm", "median_absolute_error_mm", "std_absolute_error_mm")
    return {**{k: comparison[k] for k in keep}, "bland_altman": comparison["bland_altman"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--predictions", help="folder of predicted masks (default: reference masks)"
    )
    parser.add_argument("--cases", choices=("val", "all"), default="val")
    parser.add_argument(
        "--out", help="result JSON (default: results/biometry_hc18[_reference].json)"
    )
    parser.add_argument(
        "--overlay-case",
        help="also draw this case's fitted ellipse over its image (the docs' example)",
    )
    parser.add_argument(
        "--overlay-png", default="docs/images/biometry_hc18_overlay.png", help="where to write it"
    )
    args = parser.parse_args()

    csv_path = DATASET / "pixel_size_and_HC.csv"
    pixel_sizes, reference = read_pixel_sizes(csv_path), read_reference_hc(csv_path)
    folder = Path(args.predictions) if args.predictions else DATASET / "masks"
    files = list_segmentations(folder)
    wanted = json.loads(SPLIT.read_text())["val"] if args.cases == "val" else sorted(files)
    fitted, moments, per_case, seconds = {}, {}, {}, []
    for case_id in wanted:
        key = match_case(case_id, files)
        if key is None:
            raise SystemExit(f"{folder}: no mask for case {case_id}")
        pixel = pixel_sizes[match_case(case_id, pixel_sizes)]
        mask = with_pixel_size(read_image(files[key]), pixel)
        start = time.perf_counter()
        head = measure_head(mask)
        seconds.append(time.perf_counter() - start)
        fitted[case_id] = head.hc_mm if head is not None else float("nan")
        moments[case_id] = moments_hc(np.asarray(mask.array), pixel)
        ref = reference[match_case(case_id, reference)]
        per_case[case_id] = {
            "pixel_size_mm": pixel,
            "reference_hc_mm": ref,
            "outline_fit_hc_mm": fitted[case_id],
            "moments_hc_mm": moments[case_id],
            "bpd_mm": None if head is None else head.bpd_mm,
            "ofd_mm": None if head is None else head.ofd_mm,
            "border_points_excluded": None if head is None else head.border_points_excluded,
            "fit_rms_mm": None if head is None else head.fit_rms_mm,
        }
    outline = compare_to_reference(fitted, reference)
    moment = compare_to_reference(moments, reference)
    cut = [c for c, v in per_case.items() if v["border_points_excluded"]]
    result = {
        "benchmark": "biometry_hc18",
        "machine": machine(),
        "dataset": str(DATASET),
        "masks": "reference masks" if args.predictions is None else str(folder),
        "cases": args.cases,
        "n_cases": len(wanted),
        "goal": f"mean absolute HC error <= {GOAL_MM} mm (issue 24)",
        "goal_met": bool(outline["mean_absolute_error_mm"] <= GOAL_MM),
        "outline_fit": brief(outline),
        "mask_moments": brief(moment),
        "cases_cut_by_the_border": {
            "cases": cut,
            "outline_fit_mean_absolute_error_mm": float(
                np.mean([outline["cases"][c]["absolute_error_mm"] for c in cut])
            )
            if cut
            else None,
            "mask_moments_mean_absolute_error_mm": float(
                np.mean([moment["cases"][c]["absolute_error_mm"] for c in cut])
            )
            if cut
            else None,
        },
        "seconds_per_case_fit": float(np.mean(seconds)),
        "per_case": per_case,
    }
    if args.overlay_case:
        case_id = args.overlay_case
        pixel = pixel_sizes[match_case(case_id, pixel_sizes)]
        mask = with_pixel_size(read_image(files[match_case(case_id, files)]), pixel)
        image = read_image(DATASET / "images" / f"{case_id}.png")
        png = render_head_overlay_png(mask, measure_head(mask), image=image, title=case_id, dpi=90)
        Path(args.overlay_png).parent.mkdir(parents=True, exist_ok=True)
        Path(args.overlay_png).write_bytes(png)
        print(f"overlay of {case_id}: {args.overlay_png} ({len(png) // 1024} KB)")
    default = "biometry_hc18_reference.json" if args.predictions is None else "biometry_hc18.json"
    path = write_result(result, Path(args.out) if args.out else RESULTS / default)
    print(
        json.dumps(
            {k: result[k] for k in ("outline_fit", "mask_moments", "cases_cut_by_the_border")},
            indent=2,
        )
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
