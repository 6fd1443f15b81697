"""Speed of surface-distance metrics: medseg against MONAI and surface-distance on the same pairs.

Pairs:
- ``synthetic_512``: a 512x512x300 CT-like label map (0.8 x 0.8 x 1.5 mm) with 6
  organs of different sizes (ellipsoids with bumpy surfaces), against a
  prediction with shifted, eroded and dilated organs and a few false positive
  blobs; the issue's "512x512x300 pair with several labels".
- ``totalseg_fast``: TotalSegmentator's reference labels of example_ct_sm against
  the fast model's labels (``../shared/datasets/TotalSegmentator_example_CT``),
  every class present in either map.

Each tool computes, per class, HD, HD95, the average surface distance and
NSD at 2 mm, from the same label arrays in memory (file reading not timed):
- medseg: ``compute_metrics(..., with_boundary_iou=False)`` (it also gives all
  overlap metrics and MASD in the same pass); ``medseg_full`` adds the boundary IoU.
- surface-distance: ``compute_surface_distances`` once per class (it crops to
  the masks' bounding box itself), then its four metric functions.
- MONAI 1.6: ``compute_hausdorff_distance`` (twice: max and 95th percentile),
  ``compute_average_surface_distance`` and ``compute_surface_dice`` with
  ``use_subvoxels=True``, each on the class's 2-channel one-hot pair (bool
  tensors; MONAI recomputes edges and distance transforms per call, which is
  how its API is used).

Times are medians of ``--repeats`` runs; ratios are tool time / medseg time
(> 1: medseg faster). The machine is shared with other engineers, so the load
average at start and end is recorded: absolute times are noisy, ratios from
the same run less so.

Run: ``.venv/bin/python benchmarks/metrics_speed.py [--repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg.evaluation.metrics import compute_metrics  # noqa: E402

TOLERANCE_MM = 2.0


def synthetic_pair(shape=(512, 512, 300), spacing=(0.8, 0.8, 1.5), seed=0):
    """Reference and prediction label maps with 6 organs (uint8, (x, y, z) order)."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    organs = [  # centre (fraction of the extent), radii in mm
        ((0.35, 0.45, 0.55), (90, 70, 80)),  # liver-sized
        ((0.68, 0.40, 0.50), (45, 40, 55)),  # spleen
        ((0.30, 0.65, 0.40), (30, 28, 50)),  # kidney
        ((0.70, 0.65, 0.40), (30, 28, 50)),  # kidney
        ((0.50, 0.55, 0.70), (60, 20, 25)),  # pancreas-like, flat
        ((0.52, 0.30, 0.35), (12, 12, 15)),  # small structure
    ]
    for value, (centre_frac, radii) in enumerate(organs, start=1):
        centre = np.multiply(centre_frac, np.multiply(shape, spacing))
        lo = [max(0, int((c - r * 1.3) / s)) for c, r, s in zip(centre, radii, spacing)]
        hi = [
            min(n, int((c + r * 1.3) / s) + 1) for c, r, s, n in zip(centre, radii, spacing, shape)
        ]
        grids = np.meshgrid(
            *[np.arange(a, b) * s for a, b, s in zip(lo, hi, spacing)], indexing="ij", sparse=True
        )
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        bumps = ndimage.gaussian_filter(rng.standard_normal([b - a for a, b in zip(lo, hi)]), 6)
        bumps *= 0.12 / (bumps.std() + 1e-9)
        field = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        organ_ref = field <= 1 + bumps
        ref[box][organ_ref] = value
        # prediction: shifted a little, grown or shrunk, its own bumps
        shift = rng.integers(-3, 4, size=3)
        moved = np.roll(organ_ref, tuple(shift), axis=(0, 1, 2))
        noise = ndimage.gaussian_filter(rng.standard_normal(moved.shape), 4)
        grow = ndimage.binary_dilation(moved) & (noise > 0.02)
        shrink = moved & ~(ndimage.binary_erosion(moved) ^ moved) | grow
        pred[box][shrink] = value
    for _ in range(5):  # false positive blobs
        c = [rng.integers(20, n - 20) for n in shape]
        pred[tuple(slice(a - 4, a + 4) for a in c)] = rng.integers(1, 7)
    return ref, pred, spacing


def totalseg_pair():
    from medseg.io.files import read_image

    root = SHARED / "TotalSegmentator_example_CT"
    ref = read_image(root / "labelsTr" / "example_ct_sm.nii.gz")
    pred = read_image(root / "extras" / "example_ct_sm_seg_fast.nii.gz")
    return ref.array.astype(np.uint8), pred.array.astype(np.uint8), ref.spacing


def run_medseg(ref, pred, spacing, labels, boundary_iou=False):
    rows = compute_metrics(
        pred,
        ref,
        labels=labels,
        spacing=spacing,
        tolerance_mm=TOLERANCE_MM,
        with_boundary_iou=boundary_iou,
    )
    return {v: (r["hd"], r["hd95"], r["masd"], r["nsd"]) for v, r in rows.items()}


def run_surface_distance(ref, pred, spacing, labels):
    import surface_distance as sd

    out = {}
    for value in labels:
        r, p = ref == value, pred == value
        if not r.any() or not p.any():
            out[value] = None  # surface-distance needs both (np.Inf under NumPy 2)
            continue
        d = sd.compute_surface_distances(r, p, spacing)
        forward, backward = sd.compute_average_surface_distance(d)
        out[value] = (
            sd.compute_robust_hausdorff(d, 100),
            sd.compute_robust_hausdorff(d, 95),
            (forward + backward) / 2,
            sd.compute_surface_dice_at_tolerance(d, TOLERANCE_MM),
        )
    return out


def run_monai(ref, pred, spacing, labels):
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    out = {}
    for value in labels:
        r = torch.from_numpy(ref == value)
        p = torch.from_numpy(pred == value)
        y = torch.stack([~r, r])[None]
        y_pred = torch.stack([~p, p])[None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(y_pred, y, spacing=spacing).item()
            hd95 = compute_hausdorff_distance(y_pred, y, spacing=spacing, percentile=95).item()
            asd = compute_average_surface_distance(y_pred, y, spacing=spacing, symmetric=True)
            nsd = compute_surface_dice(
                y_pred, y, class_thresholds=[TOLERANCE_MM], spacing=spacing, use_subvoxels=True
            )
        out[value] = (hd, hd95, asd.item(), nsd.item())
    return out


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def max_difference(a: dict, b: dict, index: int) -> float | None:
    diffs = [
        abs(a[v][index] - b[v][index])
        for v in a
        if a.get(v) is not None
        and b.get(v) is not None
        and np.isfinite(a[v][index])
        and np.isfinite(b[v][index])
    ]
    return float(max(diffs)) if diffs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--monai-repeats", type=int, default=1, help="MONAI is slow: fewer runs")
    parser.add_argument("--quick", action="store_true", help="256x256x150 instead of 512x512x300")
    parser.add_argument("--output", default=str(RESULTS / "metrics_speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    load_start = os.getloadavg()
    import torch

    torch.set_num_threads(2)

    shape = (256, 256, 150) if args.quick else (512, 512, 300)
    spacing = (1.6, 1.6, 3.0) if args.quick else (0.8, 0.8, 1.5)
    pairs = {"synthetic_512" if not args.quick else "synthetic_256": synthetic_pair(shape, spacing)}
    pairs["totalseg_fast"] = totalseg_pair()
    results = {}
    for name, (ref, pred, sp) in pairs.items():
        labels = sorted(set(np.unique(ref).tolist()) | set(np.unique(pred).tolist()) - {0})
        labels = [v for v in labels if v != 0]
        print(f"{name}: shape {ref.shape}, spacing {sp}, {len(labels)} classes", flush=True)
        entry = {"shape": list(ref.shape), "spacing": list(sp), "n_classes": len(labels)}
        pair = (ref, pred, sp, labels)
        t_med, all_med, res_med = timed(partial(run_medseg, *pair), args.repeats)
        print(f"  medseg {t_med:.2f} s", flush=True)
        t_full, all_full, _ = timed(partial(run_medseg, *pair, boundary_iou=True), args.repeats)
        print(f"  medseg_full {t_full:.2f} s", flush=True)
        t_sd, all_sd, res_sd = timed(partial(run_surface_distance, *pair), args.repeats)
        print(f"  surface-distance {t_sd:.2f} s", flush=True)
        t_mo, all_mo, res_mo = timed(partial(run_monai, *pair), args.monai_repeats)
        print(f"  monai {t_mo:.2f} s", flush=True)
        entry["seconds_median"] = {
            "medseg": t_med,
            "medseg_full": t_full,
            "surface_distance": t_sd,
            "monai": t_mo,
        }
        entry["seconds_all"] = {
            "medseg": all_med,
            "medseg_full": all_full,
            "surface_distance": all_sd,
            "monai": all_mo,
        }
        entry["ratio_tool_over_medseg"] = {
            "surface_distance": t_sd / t_med,
            "monai": t_mo / t_med,
            "fastest_other": min(t_sd, t_mo) / t_med,
        }
        entry["goal_at_least_as_fast_as_fastest"] = t_med <= min(t_sd, t_mo)
        entry["max_abs_difference_vs_surface_distance"] = {
            m: max_difference(res_med, res_sd, i)
            for i, m in enumerate(("hd", "hd95", "masd", "nsd"))
        }
        entry["max_abs_difference_vs_monai"] = {
            m: max_difference(res_med, res_mo, i)
            for i, m in enumerate(("hd", "hd95", "assd_vs_monai_pooled_voxel_mean", "nsd"))
        }
        results[name] = entry
    data = {
        "benchmark": "metrics_speed",
        "notes": (
            "HD, HD95, average surface distance and NSD@2mm per class; medians; ratio > 1 means "
            "medseg is faster. MONAI's HD/ASD use edge voxels (differences up to a voxel "
            "diagonal expected); surface-distance's definition equals medseg's (differences ~1e-12). "
            "The 2-core machine is shared with other engineers: see load_average_start/end."
        ),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "versions_extra": _versions(),
        "tolerance_mm": TOLERANCE_MM,
        "repeats": args.repeats,
        "monai_repeats": args.monai_repeats,
        "results": results,
    }
    print(write_result(data, args.output))


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("monai", "surface-distance", "scipy")}


if __name__ == "__main__":
    main()
