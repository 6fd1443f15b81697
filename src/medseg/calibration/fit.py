"""``medseg calibrate``: temperature and QC threshold fitted on cross-validation predictions only.

Every fold predicts the validation cases of its own split (cases it never trained on), as
``medseg postprocess`` does. On those predictions:

1. the temperature(s) are fitted by NLL on the voxels inside each case's crop (at most
   ``max_voxels``, sampled uniformly);
2. the cases are predicted again with the temperature, every member on its own (TTA copies,
   MC-dropout samples), giving the per-case scores of ``predict --qc`` and the Dice of the
   final label; :func:`medseg.calibration.qc.choose_review` picks the score and threshold.

The result is ``calibration.json`` in the model folder (read and validated by
:attr:`medseg.model_folder.ModelFolder.calibration`; :class:`~medseg.inference.Predictor`
applies it) and ``calibration_report.html`` beside it (reliability diagrams before and after,
score against Dice).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from medseg.calibration.qc import choose_review
from medseg.calibration.temperature import MODES, fit_temperature, negative_log_likelihood
from medseg.errors import MedsegError
from medseg.evaluation.calibration_metrics import (
    ECE_BINS,
    Reliability,
    foreground_bbox_mask,
    reliability_diagram_png,
)
from medseg.imaging.atomic import write_bytes_atomic
from medseg.imaging.overlap import dice
from medseg.inference.predictor import Predictor, resample_to
from medseg.io.dataset import DatasetSpec, read_case_image, read_case_label
from medseg.model_folder import CALIBRATION_FILE, ModelFolder
from medseg.progress import progress
from medseg.serialization import write_json_atomic
from medseg.training.splits import read_splits

REPORT_FILE = "calibration_report.html"
FIT_REGIONS = ("crop", "bbox")
FORMAT_VERSION = 1


def mean_foreground_dice(label: np.ndarray, reference: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in the label or the reference."""
    values = [dice(label == c, reference == c) for c in range(1, num_classes)]
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else 1.0


def _cropped_logits(predictor: Predictor, data, geometry, mirror_axes, mc_samples) -> np.ndarray:
    """Mean raw logits of a fold's members on the cropped original grid ``(K, *crop)``."""
    total = None
    count = 0
    for logits in predictor.member_logits(data, mirror_axes=mirror_axes, mc_samples=mc_samples):
        total = logits if total is None else total + logits
        count += 1
    mean = total / count
    return np.stack([resample_to(mean[c].float(), geometry) for c in range(mean.shape[0])])


def _reliabilities(
    logits: list[np.ndarray], refs: list[np.ndarray], temperature: tuple[float, ...]
) -> dict[str, Reliability]:
    t = np.asarray(temperature, dtype=np.float32).reshape(-1, *([1] * (logits[0].ndim - 1)))
    whole, box = Reliability(ECE_BINS), Reliability(ECE_BINS)
    for lg, ref in zip(logits, refs, strict=True):
        probs = torch.softmax(torch.from_numpy(lg / t), dim=0).numpy()
        whole.add(probs, ref)
        box.add(probs, ref, foreground_bbox_mask(ref, probs.argmax(0)))
    return {"whole": whole, "bbox": box}


def calibrate_model(
    model_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mode: str = "global",
    mirror_axes: tuple[int, ...] = (),
    mc_samples: int = 0,
    max_cases: int | None = None,
    max_voxels: int = 4_000_000,
    fit_region: str = "crop",
    target_recall: float = 0.8,
    failure_quantile: float = 0.1,
    device: str = "auto",
    overwrite: bool = False,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Fit temperature scaling and the QC threshold on a model's cross-validation predictions.

    Parameters
    ----------
    model_dir
        A model folder trained by medseg (``splits.json`` and ``dataset.json`` name the
        validation cases of each fold).
    folds
        Folds whose validation cases are used (default: every trained fold).
    mode
        ``"global"`` (one temperature) or ``"per_class"``.
    mirror_axes, mc_samples
        The members of ``predict`` (TTA axes, MC-dropout samples) to score cases with.
    max_cases
        At most this many validation cases per fold.
    max_voxels
        Voxels used to fit the temperature (sampled uniformly from all cases' crops).
    fit_region
        ``"crop"``: fit on every voxel the network saw; ``"bbox"``: only inside the bounding
        box of each case's reference foreground, where the uncertain voxels are (the NLL of
        the crop is dominated by easy background voxels).
    target_recall, failure_quantile
        See :func:`medseg.calibration.qc.choose_review`.
    device, seed, show_progress
        Where the networks run; the voxel sampling seed; a progress bar.
    overwrite
        Replace an existing ``calibration.json``.

    Returns
    -------
    dict
        What was written to ``calibration.json``.
    """
    started = time.perf_counter()
    if mode not in MODES:
        raise MedsegError(f"unknown calibration mode {mode!r} (use one of {', '.join(MODES)})")
    if fit_region not in FIT_REGIONS:
        raise MedsegError(f"unknown fit region {fit_region!r} (use one of crop, bbox)")
    if not 0 < target_recall <= 1:
        raise MedsegError(f"target recall must be in (0, 1] (got {target_recall})")
    folder = ModelFolder.open(model_dir)
    model_dir = folder.path
    out = model_dir / CALIBRATION_FILE
    if out.exists() and not overwrite:
        raise MedsegError(f"{out}: already exists (use --overwrite to fit again)")
    for name in ("splits.json", "dataset.json"):
        if not (model_dir / name).exists():
            raise MedsegError(f"{model_dir / name}: missing (train the model with medseg first)")
    spec = DatasetSpec.from_json(json.loads((model_dir / "dataset.json").read_text()))
    splits = read_splits(model_dir / "splits.json")
    folds = folder.select_folds(folds)
    num_classes = folder.plan.num_classes

    # 1. each fold's raw logits on its own validation cases
    cases: list[tuple[int, str]] = []
    logits: list[np.ndarray] = []
    refs: list[np.ndarray] = []
    predictors: dict[int, Predictor] = {}
    for fold in folds:
        if fold >= len(splits):
            raise MedsegError(f"{model_dir / 'splits.json'}: no fold {fold}")
        predictor = Predictor(model_dir, folds=[fold], device=device, calibrated=False)
        predictors[fold] = predictor
        val_ids = splits[fold]["val"][:max_cases] if max_cases else splits[fold]["val"]
        for case_id in progress(val_ids, desc=f"calibrate fold {fold}", enabled=show_progress):
            case = spec.case(case_id)
            data, geometry = predictor.prepare(read_case_image(spec, case))
            box = tuple(slice(a, b) for a, b in geometry.bbox)
            logits.append(_cropped_logits(predictor, data, geometry, mirror_axes, mc_samples))
            refs.append(np.asarray(read_case_label(spec, case).array)[box].astype(np.int64))
            cases.append((fold, case_id))
    if not cases:
        raise MedsegError(f"{model_dir}: the folds {folds} have no validation cases")

    # 2. the temperature, on uniformly sampled voxels
    rng = np.random.default_rng(seed)
    regions = [
        foreground_bbox_mask(r).ravel() if fit_region == "bbox" else np.ones(r.size, bool)
        for r in refs
    ]
    total = sum(int(m.sum()) for m in regions)
    keep = min(1.0, max_voxels / total)
    xs, ys = [], []
    for lg, ref, inside in zip(logits, refs, regions, strict=True):
        flat_l, flat_r = lg.reshape(num_classes, -1).T[inside], ref.ravel()[inside]
        if keep < 1.0:
            chosen = rng.random(flat_r.size) < keep
            flat_l, flat_r = flat_l[chosen], flat_r[chosen]
        xs.append(flat_l)
        ys.append(flat_r)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32))
    y = torch.from_numpy(np.concatenate(ys))
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise MedsegError(f"{model_dir}: reference labels outside 0..{num_classes - 1}")
    temperature = fit_temperature(x, y, mode=mode)
    before = _reliabilities(logits, refs, (1.0,))
    after = _reliabilities(logits, refs, temperature)
    fit_record = {
        "folds": list(folds),
        "cases": len(cases),
        "voxels": int(y.numel()),
        "fit_region": fit_region,
        "mirror_axes": list(mirror_axes),
        "mc_samples": mc_samples,
        "nll_before": negative_log_likelihood(x, y),
        "nll_after": negative_log_likelihood(x, y, torch.tensor(temperature)),
        "ece_bins": ECE_BINS,
        "ece_whole_before": before["whole"].ece(),
        "ece_whole_after": after["whole"].ece(),
        "ece_bbox_before": before["bbox"].ece(),
        "ece_bbox_after": after["bbox"].ece(),
        "ece_regions": {
            "whole": "every voxel of the crop the network saw",
            "bbox": "inside the bounding box of the reference foreground",
        },
    }
    del x, y, xs, ys

    # 3. scores and Dice of every case as ``predict`` makes them, with the temperature
    t = torch.tensor(temperature, dtype=torch.float32)
    rows = []
    del logits, refs
    for fold, case_id in progress(cases, desc="score cases", enabled=show_progress):
        predictor = predictors[fold]
        predictor.temperature = t
        case = spec.case(case_id)
        channels = read_case_image(spec, case)
        data, geometry = predictor.prepare(channels)
        result = predictor.infer_trust(
            data, geometry, channels[0], mirror_axes=mirror_axes, mc_samples=mc_samples
        )
        reference = np.asarray(read_case_label(spec, case).array)
        rows.append(
            {
                "case_id": case_id,
                "fold": fold,
                "dice": mean_foreground_dice(result.label.array, reference, num_classes),
                **result.scores,
            }
        )
    try:
        qc = choose_review(rows, target_recall=target_recall, failure_quantile=failure_quantile)
    except MedsegError as exc:  # too few or too uniform cases: the temperature still counts
        qc = {"score": None, "threshold": None, "reason": str(exc)}
    record = {
        "format_version": FORMAT_VERSION,
        "method": "temperature_scaling",
        "mode": mode,
        "temperature": list(temperature),
        "fitted_on": fit_record,
        "qc": {**qc, "cases": rows},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(record, out)
    write_calibration_report(record, before, after, model_dir / REPORT_FILE)
    return record


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def score_dice_png(rows: list[dict], score: str, threshold: float, failure_dice: float) -> bytes:
    """Scatter of the chosen score against Dice, with the review threshold and failure cut."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6, 4.2), dpi=100)
    ax = figure.add_subplot(1, 1, 1)
    s = np.array([r[score] for r in rows])
    d = np.array([r["dice"] for r in rows])
    flagged = s >= threshold
    ax.scatter(s[~flagged], d[~flagged], s=12, color="tab:blue", label="not flagged")
    ax.scatter(s[flagged], d[flagged], s=12, color="tab:red", label="flagged for review")
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.axhline(failure_dice, color="0.5", linestyle=":", linewidth=1, label="failure Dice")
    ax.set_xlabel(score)
    ax.set_ylabel("mean foreground Dice")
    ax.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_calibration_report(
    record: dict,
    before: dict[str, Reliability],
    after: dict[str, Reliability],
    path: str | os.PathLike,
) -> Path:
    """``calibration_report.html``: reliability before/after and the QC score against Dice."""
    fit, qc = record["fitted_on"], record["qc"]
    temps = ", ".join(f"{t:.3f}" for t in record["temperature"])
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>medseg calibration</title></head><body style='font-family:sans-serif'>",
        "<h1>Calibration on cross-validation predictions</h1>",
        f"<p>Temperature ({html.escape(record['mode'])}): {temps}. Fitted on {fit['cases']} "
        f"validation cases of folds {fit['folds']} ({fit['voxels']} voxels); NLL "
        f"{fit['nll_before']:.4f} &rarr; {fit['nll_after']:.4f}.</p>",
        "<table border='1' cellpadding='4'><tr><th>ECE, 15 bins</th><th>before</th>"
        "<th>after</th></tr>",
    ]
    for region in ("whole", "bbox"):
        parts.append(
            f"<tr><td>{html.escape(fit['ece_regions'][region])}</td>"
            f"<td>{fit[f'ece_{region}_before']:.4f}</td><td>{fit[f'ece_{region}_after']:.4f}</td></tr>"
        )
    parts.append("</table>")
    for region in ("whole", "bbox"):
        png = reliability_diagram_png(
            {"before": before[region], "after": after[region]},
            title=fit["ece_regions"][region],
        )
        parts.append(f"<img alt='reliability {region}' src='{_png_uri(png)}'>")
    if qc.get("threshold") is None:
        parts += [
            "<h2>Quality control</h2>",
            f"<p>No review threshold: {html.escape(qc['reason'])}</p>",
        ]
        parts.append("</body></html>")
        path = Path(path)
        write_bytes_atomic("\n".join(parts).encode("utf-8"), path)
        return path
    parts += [
        "<h2>Quality control</h2>",
        f"<p>Score <b>{html.escape(qc['score'])}</b>; review threshold {qc['threshold']:.4g} "
        f"flags {100 * qc['flagged_fraction']:.0f}% of the validation cases and "
        f"{100 * qc['recall']:.0f}% of the {qc['failures']} failures (Dice below "
        f"{qc['failure_dice']:.3f}, the {100 * qc['failure_quantile']:.0f}th percentile). "
        "Spearman against Dice: "
        + ", ".join(f"{k} {v:.3f}" for k, v in qc["spearman"].items() if np.isfinite(v))
        + ".</p>",
        f"<img alt='score against Dice' src='{_png_uri(score_dice_png(qc['cases'], qc['score'], qc['threshold'], qc['failure_dice']))}'>",
        "</body></html>",
    ]
    path = Path(path)
    write_bytes_atomic("\n".join(parts).encode("utf-8"), path)
    return path
