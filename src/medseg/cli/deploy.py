"""Commands of the deploy group: ``medseg export``, ``medseg prune``, ``medseg postprocess`` and the fast-inference
options of ``medseg predict`` (backend, TTA axes, workers, uncertainty, recorded postprocessing)."""

from __future__ import annotations

import argparse
import sys

from medseg import api
from medseg.cli.common import (
    check_measure_inputs,
    measure_predictions,
    parse_folds,
    predict_option_group,
    print_json,
    trained_folds,
)
from medseg.export import FORMATS, INT8_MODES
from medseg.inference.predictor import BACKENDS
from medseg.io.sanity import NAN_POLICIES
from medseg.runtime import PRECISIONS
from medseg.settings import Settings


def _axes(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tta-axes takes spatial axes like 0,1,2 (got {value!r})"
        ) from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``postprocess``, and extend ``predict`` with the deploy options."""
    p = sub.add_parser("export", help="export a trained model to ONNX (fp32/int8) or TorchScript")
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument(
        "--int8",
        nargs="?",
        const="dynamic",
        choices=[*INT8_MODES, "both"],
        help="also write int8 ONNX: dynamic (default), static (calibrated on training patches) or both",
    )
    p.add_argument(
        "--folds", type=parse_folds, help="folds to export, e.g. 0,1 (default: all trained)"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_export)

    p = sub.add_parser(
        "prune", help="structured channel pruning of a trained U-Net into a new model folder"
    )
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument("-o", "--output", required=True, help="folder of the pruned model")
    p.add_argument(
        "--keep", type=float, default=0.5, help="fraction of each stage's channels kept (0..1]"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_prune)

    p = sub.add_parser(
        "postprocess",
        help="choose postprocessing on the validation folds and record it in the model folder",
    )
    p.add_argument("model", help="model folder (or a work folder holding model/)")
    p.add_argument(
        "--folds",
        type=parse_folds,
        help="folds whose validation cases are used (default: all trained)",
    )
    p.add_argument(
        "--tta", action="store_true", help="mirroring TTA for the validation predictions"
    )
    p.add_argument("--max-cases", type=int, help="at most this many validation cases per fold")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_postprocess)

    g = predict_option_group(sub, "fast inference")
    if g is not None:
        g.add_argument(
            "--backend",
            choices=BACKENDS,
            default="torch",
            help="run the network with PyTorch or an exported ONNX model (onnxruntime)",
        )
        g.add_argument(
            "--tta-axes", type=_axes, help="mirror only these spatial axes, e.g. 0,1 (implies TTA)"
        )
        g.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="bf16: bfloat16 autocast on CPU (PyTorch backend; fast with AMX/AVX512-BF16);"
            " auto: bf16 where the CPU has it natively, else fp32",
        )
        g.add_argument(
            "--workers", type=int, default=2, help="reader threads that prepare cases ahead"
        )
        g.add_argument(
            "--uncertainty", action="store_true", help="also write <case>_entropy.nii.gz maps"
        )
        g.add_argument(
            "--no-postprocess",
            action="store_true",
            help="ignore the model folder's postprocessing.json",
        )
        g.add_argument(
            "--nan-policy",
            choices=NAN_POLICIES,
            default="refuse",
            help="NaN or infinite input voxels: refuse the case (default) or set them to 0 "
            "with a warning naming the file and the voxel count",
        )
        sub.choices["predict"].set_defaults(handler=run_predict)


def run_export(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    int8 = {"dynamic": ("dynamic",), "static": ("static",), "both": ("dynamic", "static")}.get(
        args.int8 or "", ()
    )
    report = api.export(
        args.model,
        fmt=args.format,
        int8=int8,
        folds=trained_folds(args.folds),
        overwrite=args.overwrite,
    )
    print_json(report)
    return 0


def run_prune(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    report = api.prune(args.model, args.output, keep=args.keep, overwrite=args.overwrite)
    print_json(report)
    return 0


def run_postprocess(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    config = api.select_postprocessing(
        args.model,
        folds=trained_folds(args.folds),
        mirror=args.tta,
        max_cases=args.max_cases,
        device=settings.device,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    print_json(config.to_json())
    return 0


def run_predict(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    check_measure_inputs(args)  # no pixel size for a PNG: refused before any prediction
    results = api.predict(
        args.model,
        args.input,
        args.output,
        folds=trained_folds(args.folds),
        mirror=args.tta,
        mirror_axes=args.tta_axes,
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
        overwrite=args.overwrite,
        device=settings.device,
        backend=args.backend,
        num_workers=args.workers,
        uncertainty=args.uncertainty,
        postprocess=not args.no_postprocess,
        precision=args.precision,
        show_progress=show_progress,
        nan_policy=args.nan_policy,
        missing=args.missing or (),
        engine=getattr(args, "engine", None),
        address=getattr(args, "address", None),
        # trust options (added by cli/trust.py, issue 20)
        probabilities=getattr(args, "probabilities", None),
        mc_samples=getattr(args, "mc_dropout", 0),
        qc=getattr(args, "qc", False),
        calibrated=not getattr(args, "no_calibration", False),
    )
    print(f"{len(results)} case(s) predicted into {args.output}", file=sys.stderr)
    measure_predictions(args, show_progress)
    return 0
