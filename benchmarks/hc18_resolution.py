"""What shrinking HC18 images costs, before any network: the resolution ceiling of a plan.

    python benchmarks/hc18_resolution.py            # all 80 reference masks, factors 1..4

A network at a coarser grid can at best predict, for each coarse pixel, the fraction of it
that is head. This script builds that perfect coarse prediction from each reference mask
(area averaging by ``factor``), brings it back to the image's grid as medseg's inference
does (linear interpolation of the probability, then a 0.5 threshold) and scores it against
the original mask: Dice, and the head circumference of medseg's ellipse fit against the
challenge's reference HC. The CPU plan shrinks HC18 about 2.5-fold; if the ceiling at 2.5
is far above the trained network's Dice, the resolution is not what limits it.

Writes ``results/hc18_resolution.json`` with the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg.evaluation.biometry import (  # noqa: E402
    compare_to_reference,
    list_segmentations,
    match_case,
    measure_head,
    read_pixel_sizes,
    read_reference_hc,
    with_pixel_size,
)
from medseg.imaging import dice  # noqa: E402
from medseg.io import Image, read_image  # noqa: E402

DATASET = SHARED / "HC18_fetal_head_US"


def coarse_and_back(mask: np.ndarray, factor: float) -> np.ndarray:
    """The best prediction a ``factor``-fold coarser grid allows, on the original grid."""
    if factor == 1:
        return mask > 0
    x = torch.from_numpy((mask > 0).astype(np.float32))[None, None]
    small = [max(1, round(s / factor)) for s in mask.shape]
    coarse = F.interpolate(x, size=small, mode="area")  # each coarse pixel: its head fraction
    back = F.interpolate(coarse, size=mask.shape, mode="bilinear", align_corners=False)
    return back[0, 0].numpy() >= 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default="1,1.5,2,2.5,3,4")
    parser.add_argument("--out", default=str(RESULTS / "hc18_resolution.json"))
    args = parser.parse_args()
    csv_path = DATASET / "pixel_size_and_HC.csv"
    pixel_sizes, reference = read_pixel_sizes(csv_path), read_reference_hc(csv_path)
    files = list_segmentations(DATASET / "masks")
    factors = [float(f) for f in args.factors.split(",")]
    rows = {}
    for factor in factors:
        dices, hcs, small_dices = [], {}, []
        for case_id, path in files.items():
            pixel = pixel_sizes[match_case(case_id, pixel_sizes)]
            original = np.asarray(read_image(path).array) > 0
            back = coarse_and_back(original, factor)
            d = float(dice(back, original))
            dices.append(d)
            head = measure_head(with_pixel_size(Image(back.astype(np.uint8), (1.0, 1.0)), pixel))
            hcs[case_id] = head.hc_mm if head is not None else float("nan")
            if reference[match_case(case_id, reference)] < 100:  # small, early-gestation heads
                small_dices.append(d)
        comparison = compare_to_reference(hcs, reference)
        rows[str(factor)] = {
            "dice_mean": float(np.mean(dices)),
            "dice_min": float(np.min(dices)),
            "dice_mean_heads_under_100mm": float(np.mean(small_dices)) if small_dices else None,
            "n_heads_under_100mm": len(small_dices),
            "hc_mean_absolute_error_mm": comparison["mean_absolute_error_mm"],
            "hc_median_absolute_error_mm": comparison["median_absolute_error_mm"],
        }
        print(factor, rows[str(factor)], flush=True)
    write_result(
        {
            "benchmark": "hc18_resolution",
            "dataset": str(DATASET),
            "n_cases": len(files),
            "method": "reference mask -> area-averaged to 1/factor -> bilinear back -> >= 0.5; "
            "Dice against the reference mask, HC of medseg's ellipse fit against the CSV",
            "machine": machine(),
            "factors": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
