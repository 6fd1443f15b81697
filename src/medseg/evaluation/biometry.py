"""Biometry: the clinical measurements of a segmentation, with their units.

- Volume per label in mL (3D) or area in mm^2 (2D): voxel count x voxel size from the spacing.
- Fetal head (2D): an ellipse fitted to the outline of the largest head component, its
  circumference by Ramanujan's second approximation (HC), the biparietal (BPD: minor axis)
  and occipito-frontal (OFD: major axis) diameters in mm. The fit uses the boundary, not
  the mask's moments: where the image border cuts the head, the moments of the cut mask
  describe a smaller ellipse, while the visible outline still lies on the true one. Outline
  points on the image border (the cut itself) are left out of the fit.
- Agreement with reference values (HC18 challenge style): absolute and signed errors in mm,
  their mean, median and standard deviation, and Bland-Altman limits of agreement.
- Readers for the HC18 CSV files (pixel size and reference HC per image).
- :func:`measure_folder`: a file or folder of segmentations to ``measurements.csv``,
  ``summary.json`` and a self-contained ``report.html`` (fitted ellipses over the images or
  the masks, and a Bland-Altman plot against the reference).

A PNG (or JPEG, BMP, TIFF) stores no pixel size: a measurement in mm from such a file needs
the pixel size from a CSV or an explicit value, and is refused without one. NIfTI, NRRD and
MHA files carry their spacing in the header.

Ellipse coordinates follow the HC18 challenge: ``center_x_mm`` along the image's x axis
(columns of a PNG) and ``center_y_mm`` along y (rows), in mm from the centre of the first
pixel; ``angle_rad`` is the direction of the major axis, from +x towards +y, in [0, pi).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import EllipseModel, find_contours

from medseg.errors import MedsegError
from medseg.evaluation.report import display_window
from medseg.imaging.atomic import write_bytes_atomic
from medseg.imaging.components import keep_largest_component
from medseg.imaging.morphology import fill_holes
from medseg.io.files import image_suffix, read_image, strip_suffix
from medseg.io.image import Image
from medseg.progress import progress
from medseg.serialization import from_jsonable, to_jsonable, write_json_atomic

MEASUREMENTS_FILE = "measurements.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
# File formats whose header holds no pixel size (ITK reports 1 x 1, or a DPI-derived guess).
NO_PIXEL_SIZE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_OUTLINE_POINTS = 10  # fewer outline points off the border than this: no ellipse fitted
HEAD_FIELDS = (
    "hc_mm",
    "bpd_mm",
    "ofd_mm",
    "center_x_mm",
    "center_y_mm",
    "semi_axis_a_mm",
    "semi_axis_b_mm",
    "angle_rad",
    "fit_rms_mm",
    "outline_points",
    "border_points_excluded",
)
OUTLINE_COLOUR = "#22dd22"  # green: the outline points used by the fit
BORDER_COLOUR = "#ffaa00"  # orange: outline points on the image border (left out)
ELLIPSE_COLOUR = "#ff2020"  # red: the fitted ellipse and its axes
_ELLIPSE_SAMPLES = 3600  # points on the fitted ellipse for the RMS outline distance
REPORT_OVERLAY_DPI = 64  # one overlay per case: ~60 KB each in report.html


# --- volumes and areas ---


def _label_array(array: np.ndarray, what: str) -> np.ndarray:
    """Integer label map: booleans and integer-valued floats accepted, 0/255 masks made 0/1."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise MedsegError(f"{what}: label values must be integers")
        array = rounded.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise MedsegError(f"{what}: label maps need integer values, got dtype {array.dtype}")
    values = np.unique(array)
    if 255 in values and set(values.tolist()) <= {0, 255}:
        array = (array == 255).astype(np.uint8)
    return array


def _column_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "label"


def label_volumes_ml(
    label_image: Image, labels: Mapping[int, str] | Iterable[int] | None = None
) -> dict[str, float]:
    """Volume (3D, mL) or area (2D, mm^2) of each label: voxel count x voxel size.

    Parameters
    ----------
    label_image
        An integer label map; its spacing (mm) gives the voxel size. A 0/255 mask counts
        as label 1.
    labels
        The labels to measure, as values or ``{value: name}`` (names appear in the keys);
        by default every value present except 0. A listed label that is absent measures 0.

    Returns
    -------
    dict
        ``{"volume_ml_<name>": mL}`` for a 3D image, ``{"area_mm2_<name>": mm^2}`` for a
        2D one, in label order; ``<name>`` is the label's name or value.
    """
    array = _label_array(np.asarray(label_image.array), "label map")
    if labels is None:
        values = [int(v) for v in np.unique(array) if v != 0]
        names = {v: str(v) for v in values}
    elif isinstance(labels, Mapping):
        names = {int(v): str(n) for v, n in labels.items() if int(v) != 0}
    else:
        names = {int(v): str(v) for v in labels if int(v) != 0}
    counts = np.bincount(array.ravel().clip(min=0).astype(np.int64))
    voxel = float(np.prod(label_image.spacing))
    three_d = label_image.ndim == 3
    out = {}
    for value in sorted(names):
        count = int(counts[value]) if 0 <= value < counts.size else 0
        key = f"{'volume_ml' if three_d else 'area_mm2'}_{_column_name(names[value])}"
        out[key] = count * voxel / (1000.0 if three_d else 1.0)
    return out


# --- the fetal head ---


def ramanujan_circumference(a: float, b: float) -> float:
    """Perimeter of an ellipse with semi-axes ``a`` and ``b`` (Ramanujan's second approximation).

    ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))`` with ``h = ((a - b) / (a + b))^2``; its
    relative error is below 1e-9 for the eccentricities of fetal heads.
    """
    if a + b <= 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + math.sqrt(4.0 - 3.0 * h)))


@dataclass(frozen=True)
class HeadMeasurement:
    """A fetal head: the ellipse fitted to its outline, and HC, BPD and OFD, all in mm.

    Attributes
    ----------
    center_x_mm, center_y_mm
        The ellipse centre along the image's x and y axes, from the first pixel's centre.
    semi_axis_a_mm, semi_axis_b_mm
        Major and minor semi-axes (``a >= b``).
    angle_rad
        Direction of the major axis, from +x towards +y, in [0, pi).
    hc_mm
        Head circumference: the ellipse's perimeter (Ramanujan's second approximation).
    bpd_mm, ofd_mm
        Biparietal (minor axis, ``2b``) and occipito-frontal (major axis, ``2a``) diameters.
    pixel_size_mm
        The spacing used, ``(x, y)``.
    outline_points, border_points_excluded
        Outline points used by the fit, and those left out because they lie on the image
        border (non-zero when the border cuts the head).
    fit_rms_mm
        Root mean square distance of the used outline points to the fitted ellipse.
    """

    center_x_mm: float
    center_y_mm: float
    semi_axis_a_mm: float
    semi_axis_b_mm: float
    angle_rad: float
    hc_mm: float
    bpd_mm: float
    ofd_mm: float
    pixel_size_mm: tuple[float, float]
    outline_points: int
    border_points_excluded: int
    fit_rms_mm: float

    def to_json(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_json(cls, data: dict) -> HeadMeasurement:
        return from_jsonable(cls, data)

    def row(self) -> dict[str, float | int]:
        """The values of :data:`HEAD_FIELDS`, for a CSV row."""
        return {name: getattr(self, name) for name in HEAD_FIELDS}


def _head_mask(mask: Image, label: int | None) -> np.ndarray:
    if mask.ndim != 2:
        raise MedsegError(f"head measurement needs a 2D image, got shape {mask.shape}")
    array = _label_array(np.asarray(mask.array), "head mask")
    foreground = array == label if label is not None else array > 0
    if not foreground.any():
        return foreground
    largest = keep_largest_component(foreground.astype(np.uint8))
    return fill_holes(largest).astype(bool)


def head_outline(mask: Image, *, label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The outline of the largest head component, as ``(x, y)`` points in mm.

    The outline is the 0.5 iso-line of the component (holes filled) between pixel centres
    (:func:`skimage.measure.find_contours` on the zero-padded mask), so a cut by the image
    border closes along the border.

    Parameters
    ----------
    mask
        A 2D label map; its spacing gives the pixel size.
    label
        The head's label; by default every non-zero value.

    Returns
    -------
    tuple of numpy.ndarray
        ``(used, border)``: ``(N, 2)`` arrays of the outline points strictly inside the
        image, and of those on the image border (where the border cuts the head), both in
        mm from the first pixel's centre. Empty for an empty mask.
    """
    head = _head_mask(mask, label)
    if not head.any():
        return np.zeros((0, 2)), np.zeros((0, 2))
    contours = find_contours(np.pad(head, 1).astype(np.float32), 0.5)
    points = np.concatenate([c[:-1] if np.array_equal(c[0], c[-1]) else c for c in contours])
    points -= 1.0  # back to the unpadded pixel indices
    nx, ny = head.shape
    inside = (
        (points[:, 0] > 0) & (points[:, 0] < nx - 1) & (points[:, 1] > 0) & (points[:, 1] < ny - 1)
    )
    scale = np.asarray(mask.spacing, dtype=float)
    return points[inside] * scale, points[~inside] * scale


def _fit_ellipse(points: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """``(xc, yc, a, b, theta)`` with ``a >= b`` and theta in [0, pi), or None if the fit fails."""
    from_estimate = getattr(EllipseModel, "from_estimate", None)  # scikit-image >= 0.26
    # a circle's conic has no axis direction: scikit-image divides 0 by 0 there, harmlessly
    with np.errstate(divide="ignore", invalid="ignore"):
        if from_estimate is not None:
            model = from_estimate(points)
            if not model:
                return None
            (xc, yc), (a, b), theta = model.center, model.axis_lengths, model.theta
        else:
            model = EllipseModel()
            if not model.estimate(points):
                return None
            xc, yc, a, b, theta = model.params
    a, b = abs(float(a)), abs(float(b))
    theta = float(theta) if math.isfinite(theta) else 0.0  # a circle: any direction
    if not all(math.isfinite(v) for v in (xc, yc, a, b, theta)) or min(a, b) <= 0:
        return None
    if a < b:
        a, b, theta = b, a, theta + math.pi / 2
    return float(xc), float(yc), a, b, float(theta) % math.pi


def _ellipse_points(xc: float, yc: float, a: float, b: float, theta: float, n: int) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    c, s = math.cos(theta), math.sin(theta)
    x = xc + a * c * np.cos(t) - b * s * np.sin(t)
    y = yc + a * s * np.cos(t) + b * c * np.sin(t)
    return np.stack([x, y], axis=1)


def measure_head(mask: Image, *, label: int | None = None) -> HeadMeasurement | None:
    """Fit an ellipse to the head's outline and measure HC, BPD and OFD in mm.

    Parameters
    ----------
    mask
        A 2D label map of the head; its spacing is the pixel size in mm (set it from the
        pixel size CSV for a PNG, see :func:`with_pixel_size`).
    label
        The head's label; by default every non-zero value. Only the largest connected
        component counts, with its holes filled.

    Returns
    -------
    HeadMeasurement or None
        None when there is no head to measure: an empty mask, fewer than
        :data:`MIN_OUTLINE_POINTS` outline points off the image border, or a degenerate fit.

    Notes
    -----
    The ellipse is the direct least-squares fit of Halir and Flusser
    (:class:`skimage.measure.EllipseModel`) to the outline points in mm, so an anisotropic
    pixel is handled exactly.
    """
    used, border = head_outline(mask, label=label)
    if len(used) < MIN_OUTLINE_POINTS:
        return None
    fit = _fit_ellipse(used)
    if fit is None:
        return None
    xc, yc, a, b, theta = fit
    distances, _ = cKDTree(_ellipse_points(xc, yc, a, b, theta, _ELLIPSE_SAMPLES)).query(used)
    return HeadMeasurement(
        center_x_mm=xc,
        center_y_mm=yc,
        semi_axis_a_mm=a,
        semi_axis_b_mm=b,
        angle_rad=theta,
        hc_mm=ramanujan_circumference(a, b),
        bpd_mm=2.0 * b,
        ofd_mm=2.0 * a,
        pixel_size_mm=(float(mask.spacing[0]), float(mask.spacing[1])),
        outline_points=len(used),
        border_points_excluded=len(border),
        fit_rms_mm=float(np.sqrt(np.mean(distances**2))),
    )


# --- reference values ---


def _statistics(values: Sequence[float]) -> dict[str, float | None]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "min": None, "max": None}
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def compare_to_reference(
    measured: Mapping[str, float], reference: Mapping[str, float]
) -> dict[str, Any]:
    """Agreement of measured values with reference values (in mm), as HC18 reports it.

    Parameters
    ----------
    measured, reference
        Values per case. Case names match with or without an image suffix, ``_HC`` or
        ``_Annotation`` (see :func:`match_case`). Measured values that are None or NaN (no
        head found) are listed as ``not_measured``.

    Returns
    -------
    dict
        ``n``; ``cases``: per case ``measured_mm``, ``reference_mm``, ``error_mm``
        (measured - reference) and ``absolute_error_mm``; ``mean_absolute_error_mm``,
        ``median_absolute_error_mm``, ``std_absolute_error_mm``; ``mean_error_mm`` and
        ``bland_altman``: ``mean_difference_mm`` (the bias), ``std_difference_mm`` and the
        95 % limits of agreement ``loa_low_mm`` / ``loa_high_mm`` (bias -+ 1.96 SD);
        ``not_measured``, ``no_reference`` (measured cases without a reference) and
        ``missing`` (reference cases not measured). Standard deviations use ``ddof=1``
        (0 for one case); statistics of no case are None.
    """
    index = _CaseIndex(reference)
    cases: dict[str, dict[str, float]] = {}
    not_measured, no_reference, matched_keys = [], [], set()
    for case_id, value in measured.items():
        key = index.find(case_id)
        if key is None:
            no_reference.append(case_id)
            continue
        matched_keys.add(key)
        if value is None or not math.isfinite(float(value)):
            not_measured.append(case_id)
            continue
        ref = float(reference[key])
        error = float(value) - ref
        cases[case_id] = {
            "measured_mm": float(value),
            "reference_mm": ref,
            "error_mm": error,
            "absolute_error_mm": abs(error),
        }
    errors = np.asarray([c["error_mm"] for c in cases.values()], dtype=float)
    absolute = np.abs(errors)
    n = int(errors.size)
    sd = float(errors.std(ddof=1)) if n > 1 else 0.0
    bias = float(errors.mean()) if n else None
    return {
        "n": n,
        "mean_absolute_error_mm": float(absolute.mean()) if n else None,
        "median_absolute_error_mm": float(np.median(absolute)) if n else None,
        "std_absolute_error_mm": (float(absolute.std(ddof=1)) if n > 1 else 0.0) if n else None,
        "mean_error_mm": bias,
        "bland_altman": {
            "mean_difference_mm": bias,
            "std_difference_mm": sd if n else None,
            "loa_low_mm": bias - 1.96 * sd if n else None,
            "loa_high_mm": bias + 1.96 * sd if n else None,
        },
        "cases": cases,
        "not_measured": not_measured,
        "no_reference": no_reference,
        "missing": sorted(k for k in reference if k not in matched_keys),
    }


# --- case names and the HC18 CSV files ---


def case_key(name: str) -> str:
    """A case name for matching: no image suffix, no ``_Annotation`` tail, lower case.

    ``"000_HC.png"``, ``"000_HC"`` and ``"000_HC_Annotation.png"`` all give ``"000_hc"``.
    """
    stem = strip_suffix(name) if image_suffix(name) else name
    stem = re.sub(r"_annotation$", "", stem, flags=re.IGNORECASE)
    return stem.lower()


def _without_hc(key: str) -> str:
    return key[: -len("_hc")] if key.endswith("_hc") else key


class _CaseIndex:
    """Find a table's key for a case name: exact (:func:`case_key`), else without ``_HC``.

    HC18 names a patient's second image ``010_2HC``; ``_2HC`` is not dropped, so ``010``
    matches ``010_HC`` only. A name that matches several keys matches none.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self.exact: dict[str, list[str]] = {}
        self.loose: dict[str, list[str]] = {}
        for key in keys:
            normal = case_key(key)
            self.exact.setdefault(normal, []).append(key)
            self.loose.setdefault(_without_hc(normal), []).append(key)

    def find(self, name: str) -> str | None:
        normal = case_key(name)
        for table, probe in ((self.exact, normal), (self.loose, _without_hc(normal))):
            found = table.get(probe, [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                return None
        return None


def match_case(name: str, keys: Iterable[str]) -> str | None:
    """The one key of ``keys`` naming the same case as ``name`` (see :func:`case_key`), or None.

    Names match exactly after :func:`case_key`, else with a trailing ``_HC`` removed from
    both (``000.png`` matches ``000_HC.png``; ``010_2HC`` keeps its ``_2HC``).
    """
    return _CaseIndex(keys).find(name)


def _normal_header(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_PIXEL_SIZE_HEADERS = ("pixelsizemm", "pixelsize", "pixelspacingmm", "pixelspacing")
_HC_HEADERS = ("headcircumferencemm", "headcircumference", "hcmm", "hc")


def _read_case_column(
    path: str | os.PathLike, headers: Sequence[str], what: str
) -> dict[str, float]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MedsegError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsegError(f"{path}: cannot read CSV ({exc})") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows:
        raise MedsegError(f"{path}: empty CSV")
    header = [_normal_header(h) for h in rows[0]]
    column = next((header.index(h) for h in headers if h in header), None)
    if column is None or column == 0:
        raise MedsegError(
            f"{path}: no {what} column (expected a header like 'filename,{what}'; "
            f"found {', '.join(rows[0])})"
        )
    values: dict[str, float] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= column:
            raise MedsegError(f"{path}:{line}: expected {column + 1} columns, found {len(row)}")
        name = row[0].strip()
        try:
            value = float(row[column])
        except ValueError:
            raise MedsegError(f"{path}:{line}: {what} {row[column]!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise MedsegError(f"{path}:{line}: {what} must be positive, got {row[column]!r}")
        if name in values:
            raise MedsegError(f"{path}:{line}: case {name} is listed twice")
        values[name] = value
    if not values:
        raise MedsegError(f"{path}: no rows")
    return values


def read_pixel_sizes(path: str | os.PathLike) -> dict[str, float]:
    """Pixel size (mm) per file name from a CSV.

    Accepts HC18's ``filename,pixel size(mm),head circumference (mm)`` (and its test-set
    ``filename,pixel size(mm)``) and ``filename,pixel_size_mm``: the first column names
    the file, the pixel size column is found by its header. Keys are the names as
    written; look them up with :func:`match_case`.
    """
    return _read_case_column(path, _PIXEL_SIZE_HEADERS, "pixel size")


def read_reference_hc(path: str | os.PathLike) -> dict[str, float]:
    """Reference head circumference (mm) per file name from HC18's CSV (see :func:`read_pixel_sizes`)."""
    return _read_case_column(path, _HC_HEADERS, "head circumference")


def has_pixel_size_in_file(path: str | os.PathLike) -> bool:
    """False for formats that store no pixel size (PNG, JPEG, BMP, TIFF)."""
    return image_suffix(path) not in NO_PIXEL_SIZE_SUFFIXES


def with_pixel_size(image: Image, pixel_size_mm: float) -> Image:
    """The same 2D image with an isotropic pixel size (mm) as its spacing."""
    if image.ndim != 2:
        raise MedsegError(f"a pixel size applies to 2D images, got shape {image.shape}")
    return Image(image.array, (pixel_size_mm, pixel_size_mm), image.origin, image.direction)


# --- a folder of segmentations ---


@dataclass(frozen=True)
class CaseBiometry:
    """The measurements of one segmentation file."""

    case_id: str
    file: str
    spacing_mm: tuple[float, ...]
    spacing_source: str  # "header", "--pixel-size" or the CSV's path
    measures: dict[str, float] = field(default_factory=dict)  # label_volumes_ml's keys
    head: HeadMeasurement | None = None

    def row(self) -> dict[str, Any]:
        """A flat row for ``measurements.csv``."""
        row: dict[str, Any] = {
            "case": self.case_id,
            "file": self.file,
            "spacing_mm": "x".join(f"{s:g}" for s in self.spacing_mm),
            "spacing_source": self.spacing_source,
            **self.measures,
        }
        if self.head is not None:
            row.update(self.head.row())
        return row


@dataclass(frozen=True)
class BiometryReport:
    """Per-case measurements and their summary (what ``summary.json`` holds)."""

    cases: tuple[CaseBiometry, ...]
    summary: dict

    def to_json(self) -> dict:
        """The summary with the per-case measurements under ``"cases"`` (``summary.json``)."""
        return to_jsonable({**self.summary, "cases": self.cases})

    @classmethod
    def from_json(cls, data: dict) -> BiometryReport:
        summary = {k: v for k, v in data.items() if k != "cases"}
        cases = tuple(from_jsonable(CaseBiometry, c) for c in data.get("cases", []))
        return cls(cases=cases, summary=summary)


def list_segmentations(path: str | os.PathLike) -> dict[str, Path]:
    """Segmentation files by case id: one file, or the image files of a folder."""
    path = Path(path)
    if path.is_file():
        if not image_suffix(path):
            raise MedsegError(f"{path}: not an image file")
        return {strip_suffix(path): path}
    if not path.is_dir():
        raise MedsegError(f"{path}: file or folder not found")
    cases: dict[str, Path] = {}
    for item in sorted(path.iterdir()):
        if item.name.startswith(".") or not item.is_file() or not image_suffix(item):
            continue
        case_id = strip_suffix(item)
        if case_id in cases:
            raise MedsegError(
                f"{path}: two files for case {case_id}: {cases[case_id].name} and {item.name}"
            )
        cases[case_id] = item
    if not cases:
        raise MedsegError(f"{path}: no segmentation files (NIfTI, NRRD, MHA, PNG...)")
    return cases


def _pixel_size_for(
    case_id: str,
    path: Path,
    *,
    pixel_size: float | None,
    table: Mapping[str, float] | None,
    table_index: _CaseIndex | None,
    table_path: str | None,
) -> tuple[float | None, str]:
    """The explicit pixel size of a case and its source, or ``(None, "header")``."""
    if pixel_size is not None:
        return pixel_size, "--pixel-size"
    if table is not None and table_index is not None:
        key = table_index.find(case_id)
        if key is not None:
            return table[key], str(table_path)
    if not has_pixel_size_in_file(path):
        where = (
            f"no row for case {case_id} in {table_path}"
            if table is not None
            else "give --pixel-size MM or --pixel-size-csv CSV"
        )
        raise MedsegError(
            f"{path}: a {image_suffix(path)} file holds no pixel size, so no measurement in mm ({where})"
        )
    return None, "header"


def pixel_sizes_for(
    files: Mapping[str, Path],
    *,
    pixel_size: float | None = None,
    pixel_size_csv: str | os.PathLike | None = None,
    reference_csv: str | os.PathLike | None = None,
) -> dict[str, tuple[float | None, str]]:
    """The pixel size (mm) of every case and where it comes from, checked before any work.

    ``pixel_size`` applies to every case; else a row of ``pixel_size_csv`` (or of
    ``reference_csv`` when it has pixel sizes) names it; else the file's own header,
    ``(None, "header")``. A format without a pixel size (PNG...) and no explicit value is
    refused with a one-line :class:`MedsegError` naming the file: no millimetres without it.
    """
    if pixel_size is not None and pixel_size_csv is not None:
        raise MedsegError("give either --pixel-size or --pixel-size-csv, not both")
    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        raise MedsegError(f"--pixel-size must be a positive number of mm, got {pixel_size}")
    table, table_path = None, None
    if pixel_size_csv is not None:
        table, table_path = read_pixel_sizes(pixel_size_csv), str(pixel_size_csv)
    elif pixel_size is None and reference_csv is not None:
        try:
            table, table_path = read_pixel_sizes(reference_csv), str(reference_csv)
        except MedsegError:  # a reference CSV without pixel sizes: the files must have them
            table = None
    table_index = _CaseIndex(table) if table is not None else None
    return {
        case_id: _pixel_size_for(
            case_id,
            path,
            pixel_size=pixel_size,
            table=table,
            table_index=table_index,
            table_path=table_path,
        )
        for case_id, path in files.items()
    }


def _format_csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def measurements_csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``measurements.csv``: one row per case, the union of the rows' columns in order."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_csv_value(row.get(c)) for c in columns])
    return buffer.getvalue()


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]}: already exists (use --overwrite to replace it)")


def _summary(
    cases: Sequence[CaseBiometry], comparison: dict | None, inputs: dict, warnings: list[str]
) -> dict:
    measure_names: list[str] = []
    for case in cases:
        measure_names += [m for m in case.measures if m not in measure_names]
    summary: dict[str, Any] = {
        "n_cases": len(cases),
        "inputs": inputs,
        "measures": {
            m: _statistics([c.measures.get(m, math.nan) for c in cases]) for m in measure_names
        },
    }
    if inputs.get("head"):
        heads = [c.head for c in cases if c.head is not None]
        summary["head"] = {
            "n_measured": len(heads),
            "not_measured": [c.case_id for c in cases if c.head is None],
            **{
                m: _statistics([getattr(h, m) for h in heads])
                for m in ("hc_mm", "bpd_mm", "ofd_mm")
            },
        }
    if comparison is not None:
        summary["reference_hc"] = comparison
    summary["warnings"] = warnings
    return summary


def measure_folder(
    segmentations: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    head: bool = False,
    head_label: int | None = None,
    labels: Mapping[int, str] | Iterable[int] | None = None,
    pixel_size: float | None = None,
    pixel_size_csv: str | os.PathLike | None = None,
    reference_csv: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> BiometryReport:
    """Measure every segmentation of a file or folder; optionally write the outputs.

    Parameters
    ----------
    segmentations
        A label map file, or a folder of them (one case per file, named by the file without
        its image suffix).
    output_dir
        Where to write ``measurements.csv``, ``summary.json`` and ``report.html``; none
        of them may exist unless ``overwrite``. Nothing is written when None.
    head
        Also fit the fetal head ellipse (2D images only) and measure HC, BPD and OFD.
    head_label
        The head's label (default: every non-zero value).
    labels
        Labels to measure volumes or areas of (see :func:`label_volumes_ml`).
    pixel_size
        Pixel size in mm for every 2D image (replacing the header's).
    pixel_size_csv
        A CSV of pixel sizes per file (see :func:`read_pixel_sizes`); exclusive with
        ``pixel_size``. A 2D image listed there gets that pixel size.
    reference_csv
        HC18's CSV of reference head circumferences: adds the comparison (and implies
        ``head``). Its pixel sizes are used when no other pixel size is given.
    images_dir
        The images, matched to the cases by name (also with an nnU-Net ``_0000`` channel
        suffix), to draw the report's overlays on; without it they are drawn on the masks.
    overwrite
        Replace existing outputs.
    show_progress
        A progress bar on stderr.

    Returns
    -------
    BiometryReport
        Per-case measurements and the summary (with ``reference_hc``: see
        :func:`compare_to_reference`).

    Raises
    ------
    MedsegError
        A PNG (or other format without a pixel size) with no pixel size given, a 3D image
        with ``head`` or with a pixel size, an unreadable file or CSV, an image whose shape
        differs from its mask, or an existing output without ``overwrite``.
    """
    head = head or reference_csv is not None
    files = list_segmentations(segmentations)
    outputs = []
    if output_dir is not None:
        output_dir = Path(output_dir)
        outputs = [output_dir / n for n in (MEASUREMENTS_FILE, SUMMARY_FILE, REPORT_FILE)]
        _refuse_existing(outputs, overwrite)

    reference = read_reference_hc(reference_csv) if reference_csv is not None else None
    explicit = pixel_sizes_for(
        files, pixel_size=pixel_size, pixel_size_csv=pixel_size_csv, reference_csv=reference_csv
    )
    images = _match_images(images_dir, files) if images_dir is not None else {}

    cases: list[CaseBiometry] = []
    overlays: list[tuple[str, bytes]] = []
    for case_id, path in progress(
        files.items(), total=len(files), desc="measure", enabled=show_progress
    ):
        mask = read_image(path)
        size, source = explicit[case_id]
        if size is not None:
            if mask.ndim != 2:
                raise MedsegError(
                    f"{path}: a 3D image has its spacing in the header; a pixel size applies to 2D images"
                )
            mask = with_pixel_size(mask, size)
        if head and mask.ndim != 2:
            raise MedsegError(
                f"{path}: the head measurement needs a 2D image, got shape {mask.shape}"
            )
        measurement = measure_head(mask, label=head_label) if head else None
        cases.append(
            CaseBiometry(
                case_id=case_id,
                file=path.name,
                spacing_mm=tuple(float(s) for s in mask.spacing),
                spacing_source=source,
                measures=label_volumes_ml(mask, labels),
                head=measurement,
            )
        )
        if head and output_dir is not None:
            image = None
            if case_id in images:
                image = read_image(images[case_id])
                if image.shape != mask.shape:
                    raise MedsegError(
                        f"{images[case_id]}: image shape {image.shape} differs from its mask's {mask.shape}"
                    )
            overlays.append(
                (
                    case_id,
                    render_head_overlay_png(
                        mask, measurement, image=image, title=case_id, dpi=REPORT_OVERLAY_DPI
                    ),
                )
            )

    warnings = []
    missing_heads = [c.case_id for c in cases if head and c.head is None]
    if missing_heads:
        warnings.append(
            f"no head found in {len(missing_heads)} case(s): {', '.join(missing_heads[:20])}"
        )
    if images_dir is not None:
        without = [c for c in files if c not in images]
        if without:
            warnings.append(
                f"no image for {len(without)} case(s) in {images_dir}: {', '.join(without[:20])}"
            )
    comparison = None
    if reference is not None:
        comparison = compare_to_reference(
            {c.case_id: (c.head.hc_mm if c.head is not None else math.nan) for c in cases},
            reference,
        )
        if comparison["no_reference"]:
            warnings.append(
                f"no reference HC for {len(comparison['no_reference'])} case(s) in {reference_csv}: "
                + ", ".join(comparison["no_reference"][:20])
            )
    inputs = {
        "segmentations": str(segmentations),
        "head": head,
        "pixel_size_mm": pixel_size,
        "pixel_size_csv": next(
            (src for _, src in explicit.values() if src not in ("header", "--pixel-size")), None
        ),
        "reference_csv": None if reference_csv is None else str(reference_csv),
        "images": None if images_dir is None else str(images_dir),
    }
    summary = _summary(cases, comparison, inputs, warnings)
    report = BiometryReport(cases=tuple(cases), summary=summary)
    if output_dir is not None:
        rows = [c.row() for c in cases]
        if comparison is not None:
            for row in rows:
                matched = comparison["cases"].get(row["case"])
                if matched is not None:
                    row["reference_hc_mm"] = matched["reference_mm"]
                    row["hc_error_mm"] = matched["error_mm"]
                    row["hc_absolute_error_mm"] = matched["absolute_error_mm"]
        output_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(measurements_csv_text(rows).encode("utf-8"), outputs[0])
        write_json_atomic(report.to_json(), outputs[1])
        write_biometry_report(report, outputs[2], rows=rows, overlays=overlays)
    return report


def _match_images(images_dir: str | os.PathLike, files: Mapping[str, Path]) -> dict[str, Path]:
    folder = Path(images_dir)
    if not folder.is_dir():
        raise MedsegError(f"{folder}: images folder not found")
    found = {
        strip_suffix(p): p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and image_suffix(p)
    }
    index = _CaseIndex(found)
    channels = {re.sub(r"_0000$", "", k): k for k in found if k.endswith("_0000")}
    channel_index = _CaseIndex(channels)
    out = {}
    for case_id in files:
        key = index.find(case_id)
        if key is None:
            stripped = channel_index.find(case_id)
            key = None if stripped is None else channels[stripped]
        if key is not None:
            out[case_id] = found[key]
    return out


# --- figures and the HTML report ---


def _figure_png(figure: Any, dpi: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def render_head_overlay_png(
    mask: Image,
    measurement: HeadMeasurement | None,
    *,
    image: Image | None = None,
    label: int | None = None,
    title: str | None = None,
    dpi: int = 80,
) -> bytes:
    """PNG bytes of the fitted ellipse (red, with its axes) and the outline over the image.

    The outline points used by the fit are green, those on the image border (left out)
    orange; the ellipse is dashed so that the outline shows through. Without ``image`` the mask is drawn in grey. Axes are in mm, so an anisotropic
    pixel is shown to scale.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    sx, sy = (float(s) for s in mask.spacing)
    nx, ny = mask.shape
    if image is not None:
        grey = np.asarray(image.array, dtype=np.float32).T
        window = display_window(grey)
    else:
        grey = (_label_array(np.asarray(mask.array), "mask") > 0).astype(np.float32).T * 0.45
        window = (0.0, 1.0)
    figure = Figure(figsize=(5.0, 5.0 * min(1.2, max(0.45, ny * sy / (nx * sx))) + 0.5))
    axes = figure.add_subplot(1, 1, 1)
    extent = (-0.5 * sx, (nx - 0.5) * sx, (ny - 0.5) * sy, -0.5 * sy)
    axes.imshow(
        grey,
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        extent=extent,
        interpolation="antialiased",
    )
    used, border = head_outline(mask, label=label)
    if len(used):
        axes.plot(used[:, 0], used[:, 1], ".", color=OUTLINE_COLOUR, markersize=1.0, zorder=2)
    if len(border):
        axes.plot(border[:, 0], border[:, 1], ".", color=BORDER_COLOUR, markersize=2.5, zorder=2)
    if measurement is not None:
        m = measurement
        axes.add_patch(
            Ellipse(
                (m.center_x_mm, m.center_y_mm),
                2 * m.semi_axis_a_mm,
                2 * m.semi_axis_b_mm,
                angle=math.degrees(m.angle_rad),
                fill=False,
                color=ELLIPSE_COLOUR,
                linewidth=1.3,
                linestyle=(0, (4, 3)),  # dashed: the outline shows between the dashes
                zorder=3,
            )
        )
        c, s = math.cos(m.angle_rad), math.sin(m.angle_rad)
        for length, (dx, dy) in ((m.semi_axis_a_mm, (c, s)), (m.semi_axis_b_mm, (-s, c))):
            axes.plot(
                [m.center_x_mm - length * dx, m.center_x_mm + length * dx],
                [m.center_y_mm - length * dy, m.center_y_mm + length * dy],
                "--",
                color=ELLIPSE_COLOUR,
                linewidth=0.8,
            )
        text = f"HC {m.hc_mm:.1f} mm, BPD {m.bpd_mm:.1f} mm, OFD {m.ofd_mm:.1f} mm"
    else:
        text = "no head found"
    axes.set_xlim(extent[0], extent[1])
    axes.set_ylim(extent[2], extent[3])
    axes.set_xlabel(text, fontsize=8)
    axes.set_xticks([])
    axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return _figure_png(figure, dpi)


def bland_altman_hc_png(comparison: Mapping[str, Any], *, dpi: int = 80) -> bytes:
    """PNG bytes: measured against reference HC (left) and their Bland-Altman plot (right)."""
    from matplotlib.figure import Figure

    cases = comparison["cases"]
    measured = np.asarray([c["measured_mm"] for c in cases.values()], dtype=float)
    reference = np.asarray([c["reference_mm"] for c in cases.values()], dtype=float)
    figure = Figure(figsize=(9.0, 3.8))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    if measured.size:
        low, high = (
            float(min(measured.min(), reference.min())),
            float(max(measured.max(), reference.max())),
        )
        left.plot([low, high], [low, high], color="#555", linewidth=0.8)
        left.scatter(reference, measured, s=14, alpha=0.75, color="#1f5fa0")
        mean, diff = (measured + reference) / 2, measured - reference
        ba = comparison["bland_altman"]
        right.scatter(mean, diff, s=14, alpha=0.75, color="#1f5fa0")
        right.axhline(ba["mean_difference_mm"], color="#d62728", linewidth=1.2)
        for limit in (ba["loa_low_mm"], ba["loa_high_mm"]):
            right.axhline(limit, color="#d62728", linewidth=0.9, linestyle="--")
        right.axhline(0.0, color="#555", linewidth=0.6)
        right.set_title(
            f"bias {ba['mean_difference_mm']:+.2f} mm, limits "
            f"{ba['loa_low_mm']:+.2f} / {ba['loa_high_mm']:+.2f} mm",
            fontsize=9,
        )
    left.set_title(f"{measured.size} cases", fontsize=9)
    left.set_xlabel("reference HC (mm)", fontsize=8)
    left.set_ylabel("measured HC (mm)", fontsize=8)
    right.set_xlabel("mean of measured and reference HC (mm)", fontsize=8)
    right.set_ylabel("measured - reference (mm)", fontsize=8)
    for axes in (left, right):
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    return _figure_png(figure, dpi)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.scroll { overflow-x: auto; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figcaption { font-size: 0.85em; color: #444; }
img { max-width: 100%; }
.warning { color: #a04000; }
"""


def _comparison_html(comparison: Mapping[str, Any]) -> str:
    ba = comparison["bland_altman"]
    rows = [
        ("cases compared", comparison["n"]),
        ("mean absolute error (mm)", comparison["mean_absolute_error_mm"]),
        ("median absolute error (mm)", comparison["median_absolute_error_mm"]),
        ("SD of the absolute error (mm)", comparison["std_absolute_error_mm"]),
        ("mean difference, measured - reference (mm)", ba["mean_difference_mm"]),
        ("SD of the difference (mm)", ba["std_difference_mm"]),
        (
            "95% limits of agreement (mm)",
            f"{_number(ba['loa_low_mm'])} to {_number(ba['loa_high_mm'])}",
        ),
    ]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_number(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _cases_html(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns and c not in ("file", "spacing_source")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_number(row.get(c))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def write_biometry_report(
    report: BiometryReport,
    output_path: str | os.PathLike,
    *,
    rows: Sequence[Mapping[str, Any]],
    overlays: Sequence[tuple[str, bytes]] = (),
    title: str = "medseg biometry",
) -> Path:
    """Write the self-contained biometry report (HTML with embedded PNGs), atomically.

    Parameters
    ----------
    report
        The measurements and summary.
    output_path
        The HTML file.
    rows
        The per-case rows (as in ``measurements.csv``) for the table.
    overlays
        ``(case_id, png)`` per case, shown in order.
    title
        Page title.
    """
    summary = report.summary
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{summary['n_cases']} case(s) from {html.escape(str(summary['inputs']['segmentations']))}.",
    ]
    sources = sorted({c.spacing_source for c in report.cases})
    parts.append(f" Pixel size from: {html.escape(', '.join(sources))}.</p>")
    if summary.get("warnings"):
        parts.append(
            "<ul>"
            + "".join(f"<li class='warning'>{html.escape(w)}</li>" for w in summary["warnings"])
            + "</ul>"
        )
    comparison = summary.get("reference_hc")
    if comparison is not None:
        parts += [
            "<h2>Head circumference against the reference</h2>",
            "<p>Measured minus reference HC; solid line: mean difference (bias), dashed: 95%"
            " limits of agreement (bias &plusmn; 1.96 SD).</p>",
            _comparison_html(comparison),
            f"<img alt='Bland-Altman plot of HC' src='{_data_uri(bland_altman_hc_png(comparison))}'>",
        ]
    parts += ["<h2>Measurements</h2>", _cases_html(rows)]
    if overlays:
        parts += [
            "<h2>Fitted ellipses</h2>",
            "<p>Red: the ellipse fitted to the head outline, with its major (OFD) and minor"
            " (BPD) axes; green: the outline points used; orange: outline points on the image"
            " border, left out of the fit.</p>",
        ]
        for case_id, png in overlays:
            parts.append(
                f"<figure><img alt='{html.escape(case_id)}' src='{_data_uri(png)}'>"
                f"<figcaption>{html.escape(case_id)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    path = Path(output_path)
    write_bytes_atomic("\n".join(parts).encode("utf-8"), path)
    return path
