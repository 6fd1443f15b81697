"""Inference speed, memory and Dice: medseg (PyTorch, ONNX, ONNX int8) vs nnU-Net and MONAI.

    python benchmarks/inference.py                   # all parts
    python benchmarks/inference.py --parts hippocampus --rounds 2

Parts (results in benchmarks/results/inference.json):

* ``hippocampus``: the 42 validation cases of benchmarks/splits/hippocampus.json, predicted
  by ``medseg predict`` (the trained model benchmarks/work/hippocampus/model; backends torch
  with and without mirroring TTA, onnx, onnx-int8 dynamic and static) and by
  ``nnUNetv2_predict`` with its default settings (TTA on, default worker counts) on the
  nnU-Net 2.6.0 model of benchmarks/nnunet_anchor.py. Each tool runs as a separate process
  under ``/usr/bin/time`` (wall time incl. start-up, peak RSS of the largest process),
  interleaved round by round so both see the same machine load. Dice: mean over cases of
  the mean foreground-class Dice.
* ``monai``: the same preprocessed volumes (the first 12 validation cases, 2 runs each; the CT 4 runs)
  and the same network weights through medseg's ``sliding_window_logits`` and MONAI's
  ``sliding_window_inference`` (same roi, overlap 0.5, Gaussian mode, 4 tiles per batch,
  no TTA), alternating who goes first; also the example CT resampled to 128x128x96 with a
  12-class network of the same widths and a 64^3 patch (18 overlapping tiles). Each pair
  is measured with medseg in fp32 (same arithmetic as MONAI) and with medseg's bf16
  autocast (MONAI in fp32: MONAI's inferer has no precision option of its own). medseg's
  default precision "auto" is bf16 on CPUs with native bfloat16 (AMX/AVX512-BF16; this
  machine), so the bf16 pair is what a user gets by default here.
* ``bigct``: the TotalSegmentator example CT resampled to 512x512x300 (written to /tmp,
  never to the repo), predicted by ``medseg predict`` with a 12-class network (untrained
  weights: time and memory do not depend on them) planned at 3 mm like TotalSegmentator's
  fast model. Reported: wall time and peak RSS (goal <= 4 GB). No nnU-Net anchor: there is
  no nnU-Net model with 10+ classes here, and the 3-class hippocampus model at 1 mm would
  need thousands of tiles on this volume (hours on 2 CPU cores).

Latest results (2 cores, idle machine, --rounds 2): hippocampus, nnU-Net default 3.52 s/case
(Dice 0.840); medseg PyTorch with TTA 0.60 s (5.9x, Dice 0.866), without TTA 0.19 s (18.5x,
0.864), bf16 0.11 s (31x), ONNX 0.25 s (13.9x), static int8 0.20 s (17.5x, 0.864). MONAI: fp32
0.91-0.97x (the network is > 90 % of the time for both), bf16 2.5-4.0x. Big CT (earlier run, load
3-8): 54 s, 2.2 GB peak RSS.

The load average at start and end is in the JSON: compare only ratios measured in the same
run, on a machine that runs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, SHARED, machine, write_result  # noqa: E402

MODEL = REPO / "benchmarks" / "work" / "hippocampus" / "model"
NNUNET_WORK = REPO / "benchmarks" / "work" / "nnunet"
NNUNET_VENV = REPO / "benchmarks" / "work" / "nnunet_venv"
NNUNET_INPUT = NNUNET_WORK / "predict" / "input"  # the validation cases as case_0000.nii.gz
SCRATCH = Path("/tmp/medseg_inference_benchmark")
MEDSEG = [str(REPO / ".venv" / "bin" / "medseg"), "--quiet", "--device", "cpu"]
CONFIGS = {
    # fp32 named explicitly: medseg's default precision "auto" is bf16 on CPUs with AMX.
    "medseg_torch_tta": ["--backend", "torch", "--precision", "fp32", "--tta"],
    "medseg_torch": ["--backend", "torch", "--precision", "fp32"],
    "medseg_torch_bf16": ["--backend", "torch", "--precision", "bf16"],
    "medseg_torch_bf16_tta": ["--backend", "torch", "--precision", "bf16", "--tta"],
    "medseg_onnx": ["--backend", "onnx"],
    "medseg_onnx_int8_dynamic": ["--backend", "onnx-int8"],
    "medseg_onnx_int8_static": ["--backend", "onnx-int8-static"],
}


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time: wall seconds and peak RSS (MiB) of its largest process."""
    stats = SCRATCH / "time.txt"
    full = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd]
    t = time.perf_counter()
    proc = subprocess.run(full, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    _, rss_kb = stats.read_text().split()[-2:]
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(int(rss_kb) / 1024, 1)}


def dice_of_folder(pred_dir: Path, case_ids: list[str]) -> dict:
    from medseg.imaging import dice_per_class
    from medseg.io import read_image

    labels = SHARED / "Task04_Hippocampus" / "labelsTr"
    per_case = []
    for cid in case_ids:
        pred = read_image(pred_dir / f"{cid}.nii.gz").array
        ref = read_image(labels / f"{cid}.nii.gz").array
        # classes 1 and 2; a class absent from both maps counts as 1.0 here
        per_case.append(float(np.mean(dice_per_class(pred, ref, 3, empty=1.0))))
    return {"dice_mean": float(np.mean(per_case)), "cases": len(per_case)}


def nnunet_command(out: Path) -> tuple[list[str], dict]:
    from nnunet_anchor import PLANS, TRAINER

    env = dict(
        os.environ,
        nnUNet_raw=str(NNUNET_WORK / "nnUNet_raw"),
        nnUNet_preprocessed=str(NNUNET_WORK / "nnUNet_preprocessed"),
        nnUNet_results=str(NNUNET_WORK / "nnUNet_results"),
    )
    cmd = [
        str(NNUNET_VENV / "bin" / "nnUNetv2_predict"),
        *f"-d 4 -c 3d_fullres -f 0 -tr {TRAINER} -p {PLANS} -chk checkpoint_final.pth".split(),
        *("-device", "cpu", "-i", str(NNUNET_INPUT), "-o", str(out)),
    ]
    return cmd, env


def ensure_export() -> dict:
    from medseg.export import export_model

    report = MODEL / "export" / "export.json"
    needed = ["fold_0.onnx", "fold_0_int8_dynamic.onnx", "fold_0_int8_static.onnx"]
    if not all((MODEL / "export" / n).exists() for n in needed):
        export_model(MODEL, int8=("dynamic", "static"), overwrite=True)
    return json.loads(report.read_text())


def part_hippocampus(rounds: int) -> dict:
    val = json.loads((REPO / "benchmarks" / "splits" / "hippocampus.json").read_text())["val"]
    export = ensure_export()
    runs: dict[str, list[dict]] = {name: [] for name in ["nnunet_default", *CONFIGS]}
    order = ["nnunet_default", *CONFIGS]
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            out = SCRATCH / "hippocampus" / f"{name}_{r}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "nnunet_default":
                cmd, env = nnunet_command(out)
            else:
                cmd = [*MEDSEG, "predict", str(MODEL), str(NNUNET_INPUT), "-o", str(out)]
                cmd, env = cmd + CONFIGS[name], None
            result = timed(cmd, env)
            result["load_average_after"] = os.getloadavg()
            if r == 0:
                result.update(dice_of_folder(out, val))
            runs[name].append(result)
            print(name, r, result, flush=True)
    summary = {}
    for name, results in runs.items():
        wall = statistics.median(x["wall_s"] for x in results)
        summary[name] = {
            "wall_s_median": wall,
            "seconds_per_case": round(wall / len(val), 3),
            "peak_rss_mib_max": max(x["peak_rss_mib"] for x in results),
            "dice_mean": results[0]["dice_mean"],
            "runs": results,
        }
    nn = summary["nnunet_default"]["seconds_per_case"]
    ref_dice = summary["medseg_torch_tta"]["dice_mean"]
    for name in CONFIGS:
        s = summary[name]
        s["speedup_vs_nnunet_default"] = round(nn / s["seconds_per_case"], 2)
        s["dice_minus_medseg_torch_tta"] = round(s["dice_mean"] - ref_dice, 4)
        s["goal_5x_and_dice_within_0.005"] = bool(
            s["speedup_vs_nnunet_default"] >= 5 and abs(s["dice_minus_medseg_torch_tta"]) <= 0.005
        )
    summary["export_checks"] = {
        k: {m: v[m] for m in ("max_abs_logit_diff", "argmax_agreement")}
        for k, v in export["checks"].items()
    }
    summary["cases"] = len(val)
    return summary


def _monai_pair(
    model, data, patch, classes, repeats: int, *, bf16: bool = False
) -> tuple[list[float], list[float]]:
    import torch
    from monai.inferers import sliding_window_inference

    from medseg.models.sliding_window import sliding_window_logits

    ours, theirs = [], []
    x = torch.from_numpy(np.ascontiguousarray(data))
    for i in range(repeats):
        for who in ("medseg", "monai") if i % 2 == 0 else ("monai", "medseg"):
            t = time.perf_counter()
            with torch.no_grad():
                if who == "medseg":
                    sliding_window_logits(
                        model,
                        x,
                        patch_size=patch,
                        num_classes=classes,
                        tile_batch_size=4,
                        cpu_bf16=bf16,
                    )
                else:
                    sliding_window_inference(
                        x[None],
                        roi_size=patch,
                        sw_batch_size=4,
                        predictor=model,
                        overlap=0.5,
                        mode="gaussian",
                        sigma_scale=0.125,
                    )
            (ours if who == "medseg" else theirs).append(time.perf_counter() - t)
    return ours, theirs


def part_monai(max_cases: int = 12) -> dict:
    import torch

    from medseg.inference.predictor import Predictor
    from medseg.io import read_image
    from medseg.model_folder import build_network
    from medseg.runtime import memory_format, native_cpu_bf16

    val = json.loads((REPO / "benchmarks" / "splits" / "hippocampus.json").read_text())["val"]
    predictor = Predictor(MODEL, device="cpu")
    plan, model = predictor.plan, predictor.models[0]
    # bf16 is timed only where the CPU computes it natively: elsewhere PyTorch emulates it
    # (many times slower) and medseg's default precision is fp32 anyway.
    native_bf16 = native_cpu_bf16()
    ours, theirs, ours_bf16, theirs_bf16 = [], [], [], []
    for cid in val[:max_cases]:
        # the shared file itself: this part needs no nnU-Net work folder
        image = read_image(SHARED / "Task04_Hippocampus" / "imagesTr" / f"{cid}.nii.gz")
        data, _ = predictor.prepare([image])
        a, b = _monai_pair(model, data, plan.patch_size, plan.num_classes, 2)
        ours += a
        theirs += b
        if native_bf16:
            a, b = _monai_pair(model, data, plan.patch_size, plan.num_classes, 2, bf16=True)
            ours_bf16 += a
            theirs_bf16 += b
    result = {
        "hippocampus": {
            "cases": len(val[:max_cases]),
            "medseg_median_s": statistics.median(ours),
            "monai_median_s": statistics.median(theirs),
        },
    }
    if native_bf16:
        result["hippocampus_medseg_bf16_vs_monai_fp32"] = {
            "cases": len(val[:max_cases]),
            "medseg_median_s": statistics.median(ours_bf16),
            "monai_median_s": statistics.median(theirs_bf16),
        }
    # a larger volume: CT at 1.5 mm-ish, 12-class network of the same widths, patch 64^3
    from dataclasses import replace

    from medseg.preprocessing.preprocess import resample_channels

    ct = read_image(SHARED / "TotalSegmentator_example_CT" / "imagesTr" / "example_ct.nii.gz")
    data = resample_channels(ct.array[None].astype(np.float32), (128, 128, 96), order=1)
    data = (data - data.mean()) / data.std()
    big_plan = replace(plan, labels=tuple((c, f"c{c}") for c in range(12)), patch_size=(64, 64, 64))
    torch.manual_seed(0)
    net = build_network(big_plan, deep_supervision=False).eval().to(memory_format=memory_format(3))
    a, b = _monai_pair(net, data, big_plan.patch_size, 12, 4)
    result["ct_128x128x96_12_classes"] = {
        "medseg_median_s": statistics.median(a),
        "monai_median_s": statistics.median(b),
    }
    if native_bf16:
        a, b = _monai_pair(net, data, big_plan.patch_size, 12, 4, bf16=True)
        result["ct_128x128x96_12_classes_medseg_bf16_vs_monai_fp32"] = {
            "medseg_median_s": statistics.median(a),
            "monai_median_s": statistics.median(b),
        }
    for r in result.values():
        r["speedup_medseg_over_monai"] = round(r["monai_median_s"] / r["medseg_median_s"], 3)
        r["goal_1.5x_met"] = r["speedup_medseg_over_monai"] >= 1.5
    # What `medseg predict` runs without --precision on this machine ("auto").
    result["medseg_default_precision"] = predictor.precision
    return result


def part_bigct() -> dict:
    import torch

    from medseg.io import Image, read_image, write_image
    from medseg.model_folder import build_network, has_weights, write_weights
    from medseg.planning.plan import read_plan
    from medseg.preprocessing.preprocess import resample_channels

    folder = SCRATCH / "bigct"
    image_path = folder / "input" / "ct_512x512x300.nii.gz"
    if not image_path.exists():
        ct = read_image(SHARED / "TotalSegmentator_example_CT" / "imagesTr" / "example_ct.nii.gz")
        shape = (512, 512, 300)
        big = resample_channels(ct.array[None].astype(np.float32), shape, order=1)[0]
        spacing = tuple(s * n / m for s, n, m in zip(ct.spacing, ct.shape, shape))
        write_image(
            Image(np.round(big).astype(np.int16), spacing, ct.origin, ct.direction), image_path
        )
    model_dir = REPO / "benchmarks" / "work" / "bigct_model"
    if not has_weights(model_dir / "fold_0"):
        plan = json.loads((MODEL / "plan.json").read_text())
        plan.update(
            dataset_name="bigct",
            channel_names=["CT"],
            labels=[[c, f"class{c}"] for c in range(12)],
            target_spacing=[3.0, 3.0, 3.0],
            normalization=[
                {
                    "scheme": "ct",
                    "clip_low": -1000.0,
                    "clip_high": 1000.0,
                    "mean": 0.0,
                    "std": 300.0,
                }
            ],
            patch_size=[64, 64, 64],
            crop_to_nonzero=False,
        )
        (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
        (model_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        torch.manual_seed(0)
        net = build_network(read_plan(model_dir), deep_supervision=False)
        write_weights(model_dir / "fold_0", "best", net.state_dict(), metadata={"network": "unet"})
    out = folder / "output"
    shutil.rmtree(out, ignore_errors=True)
    result = timed([*MEDSEG, "predict", str(model_dir), str(image_path.parent), "-o", str(out)])
    label = read_image(out / "ct_512x512x300.nii.gz")
    result.update(
        shape=list(label.shape),
        classes=12,
        classes_present=int(len(np.unique(label.array))),
        goal_peak_rss_le_4gb=result["peak_rss_mib"] <= 4096,
        nnunet_anchor="not run: no nnU-Net model with 10+ classes; see the script's docstring",
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="hippocampus,monai,bigct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    data: dict = {"benchmark": "inference", "machine": machine()}
    data["load_average_start"] = os.getloadavg()
    parts = args.parts.split(",")
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    for part in ("hippocampus", "monai", "bigct"):
        if part in parts:
            t = time.perf_counter()
            data[part] = {"hippocampus": part_hippocampus, "monai": part_monai}.get(
                part, part_bigct
            )(*([args.rounds] if part == "hippocampus" else []))
            data[part]["part_seconds"] = round(time.perf_counter() - t, 1)
            data[part]["load_average_end"] = os.getloadavg()
            data[part]["machine"] = {k: data["machine"][k] for k in ("cpu", "date", "git_commit")}
        elif part in previous:
            # kept from an earlier run, with its own load averages and machine
            data[part] = previous[part]
            data[part].setdefault(
                "machine", {k: previous["machine"].get(k) for k in ("cpu", "date", "git_commit")}
            )
        write_result(data, args.out)
    data["load_average_end"] = os.getloadavg()
    data["note"] = (
        "compare ratios within a part; see the load averages for other jobs on the machine."
    )
    write_result(data, args.out)
    print(json.dumps({k: v for k, v in data.items() if k != "machine"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
