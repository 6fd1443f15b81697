"""Classical baselines on the shared datasets, scored with medseg's metrics, next to the deep model.

    python benchmarks/classical_baselines.py

Writes benchmarks/results/classical_baselines.json and classical_baselines.md.

- HC18 (validation split of benchmarks/splits/hc18.json, pixel size from the CSV):
  median + Gaussian denoising, Otsu or local Gaussian threshold, closing 3 mm, fill holes,
  opening 5 mm, largest component, then optionally a least-squares ellipse fitted to its contour.
- Hippocampus (validation split): the crops are centred on the hippocampus, so the methods start
  from the crop centre: spatial FCM (3 classes) keeping the centre voxel's class component, and
  confidence-connected region growing from the centre; also region growing from a simulated
  user click (the reference's deepest voxel: interactive use, not automatic). Scored as whole hippocampus (labels 1+2):
  no classical method here separates anterior from posterior.
- TotalSegmentator CT (2 cases; reference labels are model predictions, a silver standard):
  lungs = HU < -400 inside the body, not touching the border, 2 largest components;
  bone = HU > 200 with components under 100 mm^3 removed (reference: all bone labels).

Parameters were chosen by looking at a few training cases, never at validation cases.
Other engineers load the same 2 CPU cores: the load average at start and end is recorded,
and times are medians per case.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

from medseg.classical import (  # noqa: E402
    fuzzy_c_means,
    morphology,
    region_grow,
    threshold,
)
from medseg.filters import gaussian, median  # noqa: E402
from medseg.imaging import (  # noqa: E402
    dice,
    keep_largest_components,
    remove_small_components,
)
from medseg.io import Image, read_image  # noqa: E402


def summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": int(a.size),
    }


# --- HC18 ---


def _ellipse_mask(mask: np.ndarray) -> np.ndarray | None:
    from skimage.draw import ellipse
    from skimage.measure import EllipseModel, find_contours

    contours = find_contours(np.pad(mask, 1).astype(float), 0.5)
    if not contours:
        return None
    model = EllipseModel.from_estimate(max(contours, key=len) - 1)
    if not model:
        return None
    (xc, yc), (a, b), theta = model.center, model.axis_lengths, model.theta
    rr, cc = ellipse(xc, yc, a, b, shape=mask.shape, rotation=theta)
    out = np.zeros(mask.shape, np.uint8)
    out[rr, cc] = 1
    return out


def hc18_methods(image: Image) -> dict[str, np.ndarray]:
    smooth = gaussian(median(image, radius_mm=0.5), sigma_mm=1.0)
    out = {}
    for name, options in (("otsu", {}), ("local", {"window_mm": 25.0, "offset": -10.0})):
        mask = threshold(smooth, method="otsu" if name == "otsu" else "gaussian", **options)
        mask = morphology(mask, "closing", radius_mm=3.0)
        mask = morphology(mask, "fill_holes")
        mask = morphology(mask, "opening", radius_mm=5.0)
        mask = keep_largest_components(mask.array, k=1)
        if name == "otsu":
            out["Otsu + morphology"] = mask
        fitted = _ellipse_mask(mask)
        out[
            f"{'Otsu' if name == 'otsu' else 'local Gaussian threshold'} + morphology + ellipse fit"
        ] = fitted if fitted is not None else np.zeros_like(mask)
    return out


def run_hc18() -> dict:
    root = SHARED / "HC18_fetal_head_US"
    split = json.loads((REPO / "benchmarks" / "splits" / "hc18.json").read_text())
    with open(root / "pixel_size_and_HC.csv") as f:
        pixel = {r["filename"]: float(r["pixel size(mm)"]) for r in csv.DictReader(f)}
    scores: dict[str, list[float]] = {}
    seconds = []
    for cid in split["val"]:
        raw = read_image(root / "images" / f"{cid}.png")
        s = pixel[f"{cid}.png"]
        image = Image(raw.array.astype(np.float32), (s, s))
        ref = read_image(root / "masks" / f"{cid}.png").array > 0
        t = time.perf_counter()
        preds = hc18_methods(image)
        seconds.append((time.perf_counter() - t) / len(preds))
        for name, pred in preds.items():
            scores.setdefault(name, []).append(dice(pred, ref))
    return {
        "cases": len(split["val"]),
        "methods": {k: {"dice": summary(v)} for k, v in scores.items()},
        "seconds_per_case_per_method_median": float(np.median(seconds)),
    }


# --- hippocampus ---


def _centre_component(mask: np.ndarray, centre: tuple[int, ...]) -> np.ndarray:
    import cc3d

    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    if labels[centre] == 0:  # centre not in the class: nearest voxel of it
        idx = np.argwhere(labels > 0)
        if idx.size == 0:
            return np.zeros(mask.shape, bool)
        centre = tuple(idx[np.argmin(((idx - np.asarray(centre)) ** 2).sum(1))])
    return labels == labels[centre]


def hippocampus_methods(
    image: Image, click: tuple[int, ...] | None = None
) -> dict[str, tuple[np.ndarray, float]]:
    centre = tuple(n // 2 for n in image.shape)
    out = {}
    if click is not None:  # an interactive user's click, simulated from the reference
        t = time.perf_counter()
        grown = region_grow(
            image, [click], criterion="confidence", multiplier=1.5, iterations=3, radius=1
        ).array  # no opening here: the grown region is thin and an opening erases it
        out["confidence region growing from a simulated click (interactive)"] = (
            _centre_component(grown > 0, click),
            time.perf_counter() - t,
        )
    t = time.perf_counter()
    fcm = fuzzy_c_means(image, classes=3, spatial_weight=1.0)
    cls = fcm.labels.array == fcm.labels.array[centre]
    out["spatial FCM (3 classes), centre component"] = (
        _centre_component(cls, centre),
        time.perf_counter() - t,
    )
    t = time.perf_counter()
    grown = region_grow(
        image, [centre], criterion="confidence", multiplier=1.5, iterations=3, radius=2
    ).array
    grown = morphology(image.with_array(grown), "opening", radius_mm=1.0).array
    out["confidence region growing from the centre"] = (
        _centre_component(grown > 0, centre),
        time.perf_counter() - t,
    )
    return out


def run_hippocampus() -> dict:
    root = SHARED / "Task04_Hippocampus"
    split = json.loads((REPO / "benchmarks" / "splits" / "hippocampus.json").read_text())
    scores: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    deep = []
    pred_dir = REPO / "benchmarks" / "work" / "hippocampus" / "validation" / "predictions"
    for cid in split["val"]:
        image = read_image(root / "imagesTr" / f"{cid}.nii.gz")
        image = image.with_array(image.array.astype(np.float32))
        ref = read_image(root / "labelsTr" / f"{cid}.nii.gz").array > 0
        from scipy import ndimage

        depth = ndimage.distance_transform_edt(ref)
        click = tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), ref.shape))
        for name, (pred, sec) in hippocampus_methods(image, click).items():
            scores.setdefault(name, []).append(dice(pred, ref))
            times.setdefault(name, []).append(sec)
        if (pred_dir / f"{cid}.nii.gz").exists():
            deep.append(dice(read_image(pred_dir / f"{cid}.nii.gz").array, ref))
    result = {
        "cases": len(split["val"]),
        "scored_as": "whole hippocampus (labels 1 and 2 together)",
        "methods": {
            k: {"dice": summary(v), "seconds_per_case_median": float(np.median(times[k]))}
            for k, v in scores.items()
        },
    }
    if len(deep) == len(split["val"]):
        result["deep_model_whole_hippocampus_dice"] = summary(deep)
    return result


# --- TotalSegmentator CT ---

LUNG_LABELS = range(10, 15)
BONE_LABELS = [*range(25, 51), *range(69, 79), 91, *range(92, 117)]


def ct_methods(image: Image) -> dict[str, np.ndarray]:
    import cc3d
    from scipy import ndimage

    hu = image.array
    body = ndimage.binary_fill_holes(
        ndimage.binary_opening(hu > -300, iterations=1)
    )  # slice-stack fill: air inside the body is kept
    air = (hu < -400).astype(np.uint8)
    comps = cc3d.connected_components(air, connectivity=6)
    border = np.unique(
        np.concatenate(
            [comps[0].ravel(), comps[-1].ravel(), comps[:, 0].ravel(), comps[:, -1].ravel()]
        )
    )
    inside = air.astype(bool) & ~np.isin(comps, border)
    lungs = keep_largest_components(inside.astype(np.uint8), k=2, connectivity=6)
    bone = (hu > 200) & body
    bone = remove_small_components(bone.astype(np.uint8), min_volume_mm3=100, spacing=image.spacing)
    return {"lungs: HU < -400, inside, 2 largest": lungs, "bone: HU > 200, >= 100 mm^3": bone}


def run_ct() -> dict:
    root = SHARED / "TotalSegmentator_example_CT"
    out: dict = {"reference": "TotalSegmentator predictions (silver standard)", "cases": {}}
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        image = read_image(path)
        ref = read_image(root / "labelsTr" / path.name).array
        t = time.perf_counter()
        preds = ct_methods(image)
        sec = time.perf_counter() - t
        refs = {"lungs": np.isin(ref, list(LUNG_LABELS)), "bone": np.isin(ref, BONE_LABELS)}
        out["cases"][path.name] = {
            "shape": list(image.shape),
            "seconds_both_methods": sec,
            **{name: dice(pred, refs[name.split(":")[0]]) for name, pred in preds.items()},
        }
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Classical baselines versus the deep model",
        "",
        f"Generated by `benchmarks/classical_baselines.py` on {result['machine']['date']} "
        f"({result['machine']['cores']} shared CPU cores, load average "
        f"{result['load_average_start'][0]:.2f} at start, {result['load_average_end'][0]:.2f} at end). "
        "Dice from `medseg.evaluation.metrics`; times are medians per case.",
        "",
        "| dataset | structure | method | Dice median | Dice mean | time / case |",
        "|---|---|---|---|---|---|",
    ]
    hc = result["hc18"]
    for name, m in hc["methods"].items():
        lines.append(
            f"| HC18 val ({hc['cases']}) | fetal head | {name} | {m['dice']['median']:.3f} | "
            f"{m['dice']['mean']:.3f} | {hc['seconds_per_case_per_method_median']:.2f} s |"
        )
    deep = result.get("deep_models", {}).get("hc18")
    if deep:
        lines.append(
            f"| HC18 val ({hc['cases']}) | fetal head | **deep model** (medseg U-Net, {deep['budget_minutes']:.0f} min CPU training) | "
            f"{deep['dice_median']:.3f} | {deep['dice_mean']:.3f} | {deep['predict_seconds_per_case']:.2f} s |"
        )
    hp = result["hippocampus"]
    for name, m in hp["methods"].items():
        lines.append(
            f"| Hippocampus val ({hp['cases']}) | whole hippocampus | {name} | {m['dice']['median']:.3f} | "
            f"{m['dice']['mean']:.3f} | {m['seconds_per_case_median']:.2f} s |"
        )
    deep = result.get("deep_models", {}).get("hippocampus")
    if "deep_model_whole_hippocampus_dice" in hp:
        d = hp["deep_model_whole_hippocampus_dice"]
        lines.append(
            f"| Hippocampus val ({hp['cases']}) | whole hippocampus | **deep model** (its saved validation predictions) | "
            f"{d['median']:.3f} | {d['mean']:.3f} | {deep['predict_seconds_per_case']:.2f} s |"
        )
    if deep:
        lines.append(
            f"| Hippocampus val ({hp['cases']}) | anterior / posterior | **deep model** ({deep['budget_minutes']:.0f} min CPU training) | "
            f"{deep['anterior_median']:.3f} / {deep['posterior_median']:.3f} | {deep['dice_mean']:.3f} (mean of both) | "
            f"{deep['predict_seconds_per_case']:.2f} s |"
        )
    for case, c in result["totalsegmentator_ct"]["cases"].items():
        for name, v in c.items():
            if ":" in name:
                lines.append(
                    f"| TotalSeg CT `{case}` | {name.split(':')[0]} | {name.split(': ')[1]} | {v:.3f} | - | "
                    f"{c['seconds_both_methods'] / 2:.2f} s |"
                )
    lines += [
        "",
        "TotalSegmentator references are model predictions (silver standard), 2 cases only. "
        "`example_ct` is mostly abdomen with small lung bases (about 4,100 reference voxels): "
        "its two largest inside-body air components are bowel gas, so the lung threshold scores 0 "
        "there; a real chest CT would need a superior-position rule or a seed. "
        "Hippocampus classical methods find the whole structure only (no anterior/posterior split). "
        "No deep model was trained on the CT examples.",
        "",
    ]
    return "\n".join(lines)


def deep_numbers() -> dict:
    out = {}
    for name in ("hc18", "hippocampus"):
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        per = d["dice_per_class"]
        entry = {
            "source": f"benchmarks/results/{name}.json",
            "budget_minutes": d["budget_minutes"],
            "dice_mean": d["dice_mean"],
            "predict_seconds_per_case": d["predict_seconds_per_case"],
        }
        if name == "hc18":
            entry["dice_median"] = per["label_1"]["median"]
        else:
            entry["anterior_median"] = per["Anterior"]["median"]
            entry["posterior_median"] = per["Posterior"]["median"]
        out[name] = entry
    return out


def main() -> None:
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    load_start = os.getloadavg()
    started = time.perf_counter()
    result = {
        "benchmark": "classical_baselines",
        "machine": machine(),
        "load_average_start": load_start,
        "note": "2 CPU cores shared with four other engineers' jobs; see load averages",
        "hc18": run_hc18(),
        "hippocampus": run_hippocampus(),
        "totalsegmentator_ct": run_ct(),
        "deep_models": deep_numbers(),
    }
    result["load_average_end"] = os.getloadavg()
    result["wall_seconds"] = time.perf_counter() - started
    write_result(result, RESULTS / "classical_baselines.json")
    md = RESULTS / "classical_baselines.md"
    tmp = md.with_name(f".tmp-{md.name}")
    tmp.write_text(markdown(result))
    os.replace(tmp, md)
    print(markdown(result))


if __name__ == "__main__":
    main()
