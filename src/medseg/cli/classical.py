"""Commands of the classical group: ``medseg classical METHOD`` and ``medseg filter FILTER``."""

from __future__ import annotations

import argparse
import json

from medseg import api
from medseg.classical import METHODS
from medseg.classical.batch import CASTS
from medseg.filters import FILTERS
from medseg.settings import Settings


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE (got {text!r})")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value  # a plain word, e.g. method=otsu


def _seed(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes X,Y[,Z] numbers (got {text!r})") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file or a folder of image files")
    p.add_argument("-o", "--output", required=True, help="output file, or folder for a folder")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="KEY=VALUE",
        help="an option of the method (JSON value), e.g. -p classes=3 -p window_mm=[15,15]",
    )
    p.add_argument("--overwrite", action="store_true")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this group's sub-commands to the medseg parser."""
    p = sub.add_parser(
        "classical",
        help="classical segmentation (thresholds, region growing, FCM, watershed, level sets)",
        description="Segment with a classical method; options go as -p KEY=VALUE "
        "(see docs/classical.md and the medseg.classical functions).",
    )
    p.add_argument("method", choices=list(METHODS))
    _common(p)
    p.add_argument(
        "--seed", action="append", type=_seed, help="region-growing seed X,Y[,Z] (repeatable)"
    )
    p.add_argument("--seed-mm", action="store_true", help="seeds are world (LPS) mm, not voxels")
    p.add_argument("--mask", help="restrict the method to this mask image")
    p.add_argument("--markers", help="watershed marker label image")
    p.add_argument("--init", help="initial mask for the active contours")
    p.set_defaults(handler=run_classical)

    f = sub.add_parser(
        "filter",
        help="image filters: denoising, N4, CLAHE, histogram matching, CT windows",
        description="Filter images; options go as -p KEY=VALUE (see docs/classical.md).",
    )
    f.add_argument("filter", choices=list(FILTERS))
    _common(f)
    f.add_argument("--reference", help="reference image of histogram_match")
    f.add_argument("--preset", help="CT window preset: brain, lung, abdomen, bone, ...")
    f.add_argument("--mask", help="N4 fitting mask / normalization statistics mask")
    f.add_argument(
        "--cast",
        choices=CASTS,
        help="round and cast the output (PNG needs integers)",
    )
    f.set_defaults(handler=run_filter)


def run_classical(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    options = dict(args.param)
    if args.seed:
        options["seeds"] = args.seed
        if args.seed_mm:
            options["seed_units"] = "mm"
    for key in ("mask", "markers", "init"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    written = api.segment_classical(
        args.method,
        args.input,
        args.output,
        options=options,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    print(f"{len(written)} segmentation(s) written to {args.output}")
    return 0


def run_filter(args: argparse.Namespace, settings: Settings, show_progress: bool) -> int:
    options = dict(args.param)
    for key in ("reference", "preset", "mask"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    written = api.filter_images(
        args.filter,
        args.input,
        args.output,
        options=options,
        output_dtype=args.cast,
        overwrite=args.overwrite,
        show_progress=show_progress,
    )
    print(f"{len(written)} filtered image(s) written to {args.output}")
    return 0
