"""Checking a dataset folder before training: every problem at once, each naming its file.

:func:`check_dataset` loads the folder with :func:`medseg.io.dataset.load_dataset`,
then reads every image and label and lists what is wrong: missing or unpaired
files, unreadable or truncated files, image/label geometry that disagrees,
channels that disagree, label values that are not integers or not declared,
NaN/inf voxels, constant or empty images and images of the wrong dimensionality.
It never stops at the first problem; only a ``dataset.json`` that cannot be
used ends the check early, with that one error.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.dataset import CaseSpec, DatasetSpec, load_dataset
from medseg.io.files import image_suffix, read_image_channels, strip_suffix
from medseg.io.image import Image

ERROR = "error"
WARNING = "warning"

# Geometry tolerances between an image and its label (or between channels):
# loose enough for float32 header rounding, tight enough to catch real shifts.
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3
ORIGIN_RTOL = 1e-3  # of |origin|, at least 1e-3 mm ...
ORIGIN_MAX_VOXELS = 0.05  # ... but never more than this fraction of the smallest spacing

ProgressCallback = Callable[[int, int], None]
CHANNEL_GRID = "channel_grid"
COREGISTER_HINT = "; `medseg preprocess --coregister` resamples it onto channel 0's grid"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (or with ``dataset.json``)."""

    severity: str  # "error" | "warning"
    path: str
    message: str
    # What kind of problem, where a later step can act on it: CHANNEL_GRID (a channel not on
    # channel 0's grid, which `medseg preprocess --coregister` resamples), else "".
    kind: str = ""

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.path}: {self.message}"


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_dataset` found."""

    root: str
    problems: tuple[Problem, ...]
    num_cases: int  # training cases (those with labels)
    num_test_cases: int = 0

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == ERROR)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == WARNING)

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"{self.root}: {verdict}: {self.num_cases} training case(s), {self.num_test_cases} test case(s), "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )

    def format(self) -> str:
        """All problems, one per line, then the summary line."""
        return "\n".join([*(str(p) for p in self.problems), self.summary()])


def _error(path: str | os.PathLike, message: str) -> Problem:
    return Problem(ERROR, str(path), message)


def _warning(path: str | os.PathLike, message: str) -> Problem:
    return Problem(WARNING, str(path), message)


def _strip_path(message: str, path: str | os.PathLike) -> str:
    """``"<path>: reason"`` (the MedsegError style) without the path, which the Problem holds."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _fmt_values(values: Iterable, limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# ----------------------------------------------------------------------------- reading


@dataclass
class _Read:
    """One file read for checking: its channels, or a problem saying why not."""

    channels: list[Image] = field(default_factory=list)
    problem: Problem | None = None
    nonfinite: tuple[int, int] = (0, 0)  # NaN and infinite values stored in the file


def _nifti_nonfinite(path: Path) -> tuple[int, int]:
    """NaN and infinite values in a float NIfTI file.

    ITK's NIfTI reader (nifti1_io) silently turns them into 0, so they are
    counted from the file with nibabel.
    """
    if image_suffix(path) not in (".nii", ".nii.gz"):
        return 0, 0
    try:
        import nibabel as nib

        image = nib.load(str(path))
        if image.get_data_dtype().kind != "f":
            return 0, 0
        data = np.asanyarray(image.dataobj)
    except Exception:
        return 0, 0
    n_nan = int(np.count_nonzero(np.isnan(data)))
    return n_nan, int(np.count_nonzero(np.isinf(data)))


def _zero_size_nifti(path: Path) -> tuple[int, ...] | None:
    """The shape of a NIfTI whose header declares an empty axis (ITK refuses to read those)."""
    if image_suffix(path) not in (".nii", ".nii.gz"):
        return None
    try:
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(path)).header.get_data_shape())
    except Exception:
        return None
    return shape if 0 in shape else None


def _file_dimension(path: str | os.PathLike) -> int:
    """The dimension in an image file's header (4 for a 4D volume), 0 if unreadable."""
    if Path(path).is_dir():
        return 3
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 0
    return reader.GetDimension()


def _read_file(path: str | os.PathLike) -> _Read:
    """Read every voxel of a file (the header alone would miss truncation and bad values)."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            return _Read(problem=_error(path, "empty file (0 bytes)"))
    except OSError as exc:
        return _Read(problem=_error(path, f"cannot open ({exc.strerror})"))
    try:
        channels = read_image_channels(path)
    except MedsegError as exc:
        if path.is_dir() or _file_dimension(path):  # the header reads: keep the reader's reason
            return _Read(problem=_error(path, _strip_path(str(exc), path)))
        shape = _zero_size_nifti(path)
        if shape is not None:
            return _Read(problem=_error(path, f"zero-size image (shape {shape})"))
        return _Read(
            problem=_error(path, "not a readable image (corrupt, or not the format its name says)")
        )
    except (RuntimeError, ValueError) as exc:  # geometry that Image refuses, e.g. zero spacing
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        return _Read(problem=_error(path, f"cannot use image ({reason})"))
    if not any(c.array.dtype.kind == "f" for c in channels):  # integer voxels cannot be NaN
        return _Read(channels)
    return _Read(channels, nonfinite=_nifti_nonfinite(path))


# ----------------------------------------------------------------------------- per-file checks


def _origin_tolerance(origin: tuple[float, ...], spacing: tuple[float, ...]) -> np.ndarray:
    relative = ORIGIN_RTOL * np.maximum(np.abs(np.asarray(origin)), 1.0)
    return np.minimum(relative, ORIGIN_MAX_VOXELS * min(spacing))


def _geometry_problems(image: Image, other: Image, path: str, what: str, ref: str) -> list[Problem]:
    """Shape, spacing, origin and direction of ``other`` (file ``path``) against ``image`` (file ``ref``)."""
    if other.ndim != image.ndim:
        return [_error(path, f"{what} is {other.ndim}D but the image is {image.ndim}D ({ref})")]
    problems = []
    if other.shape != image.shape:
        problems.append(
            _error(
                path, f"{what} shape {other.shape} differs from image shape {image.shape} ({ref})"
            )
        )
    if not np.allclose(other.spacing, image.spacing, rtol=SPACING_RTOL, atol=0):
        problems.append(
            _error(
                path,
                f"{what} spacing {_fmt(other.spacing)} differs from image spacing {_fmt(image.spacing)} ({ref})",
            )
        )
    delta = np.abs(np.subtract(other.origin, image.origin))
    if np.any(delta > _origin_tolerance(image.origin, image.spacing)):
        problems.append(
            _error(
                path,
                f"{what} origin {_fmt(other.origin)} differs from image origin {_fmt(image.origin)} ({ref})",
            )
        )
    if not np.allclose(other.direction, image.direction, rtol=0, atol=DIRECTION_ATOL):
        problems.append(
            _error(
                path,
                f"{what} direction {_fmt(other.direction)} differs from image direction {_fmt(image.direction)} ({ref})",
            )
        )
    return problems


def _nonfinite_problem(path: str | os.PathLike, what: str, n_nan: int, n_inf: int) -> Problem:
    return _error(path, f"{what} has {n_nan} NaN and {n_inf} infinite voxel(s)")


def _image_value_problems(image: Image, path: str, what: str) -> list[Problem]:
    array = image.array
    if array.size == 0:
        return [_error(path, f"zero-size {what} (shape {image.shape})")]
    problems = []
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        bad = int(array.size - np.count_nonzero(finite))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(array)))
            problems.append(_nonfinite_problem(path, what, n_nan, bad - n_nan))
            array = array[finite]
            if array.size == 0:
                return problems
    low, high = array.min(), array.max()
    if low == high:
        value = "zero" if low == 0 else f"{low.item():g}"
        problems.append(_warning(path, f"constant {what}: every voxel is {value}"))
    return problems


def _label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array (fast for small unsigned types)."""
    if array.dtype in (np.uint8, np.uint16, np.bool_):
        return np.flatnonzero(np.bincount(array.ravel().astype(np.intp, copy=False)))
    return np.unique(array)


def _label_problems(label: Image, path: str) -> tuple[list[Problem], set[int] | None]:
    """Non-integer values of a label map; its distinct integer values (None when unusable)."""
    array = label.array
    if array.size == 0:
        return [_error(path, f"zero-size label (shape {label.shape})")], None
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            return [_error(path, "label has NaN or infinite values; labels must be integers")], None
        fractional = array != np.rint(array)
        if fractional.any():
            examples = np.unique(array[fractional])[:5]
            return [
                _error(
                    path,
                    f"label has non-integer values (e.g. {_fmt_values(f'{v:g}' for v in examples)}); labels must be integers",
                )
            ], None
        values = np.unique(array).astype(np.int64)
    elif array.dtype.kind in "iub":
        values = _label_values(array)
    else:
        return [_error(path, f"label has {array.dtype} values; labels must be integers")], None
    return [], {int(v) for v in values}


@dataclass
class _CaseResult:
    problems: list[Problem] = field(default_factory=list)
    image_path: str = ""
    spatial_ndim: int | None = None
    num_channels: int | None = None
    label_path: str = ""
    label_values: set[int] | None = None


def _check_case(
    spec: DatasetSpec, case: CaseSpec, *, listed: bool, with_label: bool, declared: set[int] | None
) -> _CaseResult:
    result = _CaseResult(image_path=case.images[0] if case.images else "")
    problems = result.problems
    multi_file = len(case.images) > 1

    # Images: one file per channel (nnU-Net), or one file holding all channels.
    channels: list[tuple[str, Image]] = []
    any_missing = False
    for index, path in enumerate(case.images):
        if not Path(path).exists():
            any_missing = True
            if listed:
                problems.append(
                    _error(path, f"listed in dataset.json (case {case.case_id}) but missing")
                )
            elif multi_file:
                problems.append(_error(path, f"missing channel {index} of case {case.case_id}"))
            else:
                problems.append(_error(path, f"image of case {case.case_id} is missing"))
            continue
        read = _read_file(path)
        if read.problem is not None:
            problems.append(read.problem)
            any_missing = True
            continue
        what = "image" if len(read.channels) == 1 else "channel"
        if any(read.nonfinite):
            problems.append(_nonfinite_problem(path, what, *read.nonfinite))
        for channel in read.channels:
            channels.append((path, channel))
            problems.extend(_image_value_problems(channel, path, what))

    if channels:
        ref_path, ref = channels[0]
        result.spatial_ndim = ref.ndim
        result.image_path = ref_path
        result.num_channels = len(channels)
        for index, (path, channel) in enumerate(channels[1:], start=1):
            found = _geometry_problems(ref, channel, path, f"channel {index}", ref_path)
            if channel.ndim == ref.ndim:  # another grid of the same space: co-registration fixes it
                found = [
                    replace(p, message=p.message + COREGISTER_HINT, kind=CHANNEL_GRID)
                    for p in found
                ]
            problems.extend(found)
        if not any_missing and spec.layout != "plain2d" and len(channels) != spec.num_channels:
            if spec.num_channels == 1 and _file_dimension(ref_path) == 4:
                message = f"4D image ({len(channels)} volumes) where a {ref.ndim}D image is expected (1 channel declared)"
            else:
                message = (
                    f"has {len(channels)} channel(s), dataset.json declares {spec.num_channels}"
                )
            problems.append(_error(ref_path, message))

    if not with_label:
        return result

    # Label.
    if case.label is None:
        problems.append(
            _error(
                result.image_path or spec.root,
                f"case {case.case_id} has no label listed in dataset.json",
            )
        )
        return result
    label_path = case.label
    result.label_path = label_path
    if not Path(label_path).exists():
        if listed:
            problems.append(
                _error(label_path, f"listed in dataset.json (case {case.case_id}) but missing")
            )
        else:
            problems.append(_error(result.image_path, f"image without label (no {label_path})"))
        return result
    read = _read_file(label_path)
    if read.problem is not None:
        problems.append(read.problem)
        return result
    if len(read.channels) != 1:
        kind = "4D" if _file_dimension(label_path) == 4 else "multi-component (colour)"
        problems.append(
            _error(
                label_path,
                f"{kind} label with {len(read.channels)} channels; a label is one integer map",
            )
        )
        return result
    if any(read.nonfinite):
        problems.append(
            _error(label_path, "label has NaN or infinite values; labels must be integers")
        )
        return result
    label = read.channels[0]
    if channels:
        problems.extend(
            _geometry_problems(channels[0][1], label, label_path, "label", channels[0][0])
        )
    value_problems, values = _label_problems(label, label_path)
    problems.extend(value_problems)
    result.label_values = values
    if values is not None:
        if declared is not None:
            undeclared = sorted(values - declared)
            if undeclared:
                problems.append(
                    _error(
                        label_path,
                        f"label values {_fmt_values(undeclared)} are not declared in dataset.json labels "
                        f"({_fmt_values(sorted(declared))})",
                    )
                )
        if values <= {0}:
            problems.append(_warning(label_path, "label is all background (0)"))
    return result


# ----------------------------------------------------------------------------- dataset-level checks


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if not f.name.startswith(".") and f.is_file())


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _structure_problems(spec: DatasetSpec, meta: dict | None) -> tuple[list[Problem], set[str]]:
    """Problems with the folder as a whole; the case ids listed in an MSD dataset.json."""
    root = Path(spec.root)
    problems: list[Problem] = []
    listed: set[str] = set()
    case_labels = {os.path.normpath(c.label) for c in spec.cases if c.label}

    if spec.layout == "plain2d":
        images_dir = root / "images"
        masks_dir = next(root / n for n in ("masks", "labels") if (root / n).is_dir())
        for f in _visible_files(masks_dir):
            if image_suffix(f) and os.path.normpath(f) not in case_labels:
                problems.append(
                    _error(f, f"mask without image (no {images_dir.name}/{strip_suffix(f)}.*)")
                )
        for f in _visible_files(images_dir):
            if not image_suffix(f):
                problems.append(_warning(f, "ignored: not an image file"))
        return problems, listed

    meta_path = root / "dataset.json"
    meta = meta or {}
    training = meta.get("training")
    if spec.layout == "msd" and isinstance(training, list):
        seen: Counter[str] = Counter()
        for entry in training:
            if not isinstance(entry, dict) or not entry.get("image"):
                problems.append(
                    _error(meta_path, f"training entry without an 'image': {entry!r}"[:200])
                )
                continue
            seen[strip_suffix(str(entry["image"]))] += 1
        listed = set(seen)
        for case_id, count in seen.items():
            if count > 1:
                problems.append(
                    _warning(meta_path, f"case {case_id} is listed {count} times in 'training'")
                )
        for case in spec.cases:
            if case.case_id not in listed:
                problems.append(
                    _warning(
                        case.images[0],
                        f"case {case.case_id} is not listed in dataset.json 'training'",
                    )
                )
    num_training = meta.get("numTraining")
    if isinstance(num_training, int) and num_training != len(spec.cases):
        problems.append(
            _warning(
                meta_path,
                f"numTraining is {num_training} but {len(spec.cases)} training case(s) were found",
            )
        )

    ending = spec.file_ending
    for folder in (root / "imagesTr", root / "labelsTr", root / "imagesTs"):
        for f in _visible_files(folder):
            if not f.name.endswith(ending):
                problems.append(
                    _warning(f, f"ignored: does not end with the dataset's file ending {ending}")
                )
            elif folder.name == "labelsTr" and os.path.normpath(f) not in case_labels:
                problems.append(
                    _error(f, f"label without image (no image for case {f.name[: -len(ending)]})")
                )
    if not (root / "imagesTr").is_dir():
        problems.append(_error(root / "imagesTr", "folder missing"))
    if not (root / "labelsTr").is_dir():
        problems.append(_error(root / "labelsTr", "folder missing"))
    elif not spec.cases:
        problems.append(_error(root / "imagesTr", "no training cases"))
    return problems, listed


def _dimension_problems(results: list[_CaseResult]) -> list[Problem]:
    dims = Counter(r.spatial_ndim for r in results if r.spatial_ndim is not None)
    if len(dims) < 2:
        return []
    majority = max(sorted(dims), key=lambda d: dims[d])
    return [
        _error(
            r.image_path,
            f"{r.spatial_ndim}D image in a {majority}D dataset ({dims[majority]} of {sum(dims.values())} images are {majority}D)",
        )
        for r in results
        if r.spatial_ndim is not None and r.spatial_ndim != majority
    ]


def _plain2d_problems(results: list[_CaseResult]) -> list[Problem]:
    """Plain 2D masks are 0/255 or label ids 0..N, the same convention throughout."""
    problems = []
    kinds: dict[str, str] = {}
    for r in results:
        if r.label_values is None:
            continue
        values = r.label_values
        negative = sorted(v for v in values if v < 0)
        if negative:
            problems.append(
                _error(r.label_path, f"mask has negative values {_fmt_values(negative)}")
            )
        elif 255 in values and values - {0, 255}:
            problems.append(
                _error(
                    r.label_path,
                    f"mask mixes 255 with values {_fmt_values(sorted(values - {0, 255}))}: masks must be 0/255 or label ids 0..N",
                )
            )
        elif 255 in values:
            kinds[r.label_path] = "0/255"
        elif values - {0}:
            kinds[r.label_path] = "label ids"
    counts = Counter(kinds.values())
    if len(counts) == 2:
        majority = "0/255" if counts["0/255"] >= counts["label ids"] else "label ids"
        for path, kind in kinds.items():
            if kind != majority:
                problems.append(
                    _error(
                        path,
                        f"mask uses {kind} while {counts[majority]} other mask(s) use {majority}",
                    )
                )
    channel_counts = Counter(r.num_channels for r in results if r.num_channels is not None)
    if len(channel_counts) > 1:
        majority_n = max(sorted(channel_counts), key=lambda n: channel_counts[n])
        for r in results:
            if r.num_channels is not None and r.num_channels != majority_n:
                problems.append(
                    _error(
                        r.image_path,
                        f"has {r.num_channels} channel(s) while most images have {majority_n}",
                    )
                )
    return problems


# ----------------------------------------------------------------------------- entry point


def _load_meta(root: Path) -> tuple[dict | None, Problem | None]:
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        return None, None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return None, _error(meta_path, f"invalid JSON ({exc.msg} at line {exc.lineno})")
    except (OSError, UnicodeDecodeError) as exc:
        return None, _error(meta_path, f"cannot read ({exc})"[:300])
    if not isinstance(meta, dict):
        return None, _error(meta_path, "must hold a JSON object")
    return meta, None


def check_dataset(
    root: str | os.PathLike,
    *,
    workers: int = 2,
    progress: ProgressCallback | None = None,
) -> CheckReport:
    """Check a dataset folder (MSD, nnU-Net v2 or plain 2D layout) and list every problem.

    ``progress(done, total)`` is called after each case. Cases are read by
    ``workers`` threads (SimpleITK releases the GIL while reading).
    """
    root = Path(root)
    meta, problem = _load_meta(root)
    if problem is not None:
        return CheckReport(str(root), (problem,), 0)
    try:
        spec = load_dataset(root)
    except MedsegError as exc:
        message = str(exc)
        path, sep, rest = message.partition(": ")
        if not sep:
            path, rest = str(root), message
        return CheckReport(str(root), (_error(path, rest),), 0)
    except (
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
    ) as exc:  # malformed dataset.json entries
        return CheckReport(
            str(root),
            (
                _error(
                    root / "dataset.json", f"cannot use dataset.json ({type(exc).__name__}: {exc})"
                ),
            ),
            0,
        )

    problems, listed = _structure_problems(spec, meta)
    declared = None if spec.layout == "plain2d" else {v for v, _ in spec.labels}
    jobs = [(case, True) for case in spec.cases] + [(case, False) for case in spec.test_cases]

    def work(job: tuple[CaseSpec, bool]) -> _CaseResult:
        case, with_label = job
        return _check_case(
            spec,
            case,
            listed=case.case_id in listed and with_label,
            with_label=with_label,
            declared=declared,
        )

    results: list[_CaseResult] = []
    total = len(jobs)
    if workers > 1 and total > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(work, jobs):
                results.append(result)
                if progress is not None:
                    progress(len(results), total)
    else:
        for job in jobs:
            results.append(work(job))
            if progress is not None:
                progress(len(results), total)

    for result in results:
        problems.extend(result.problems)
    problems.extend(_dimension_problems(results))
    if spec.layout == "plain2d":
        problems.extend(_plain2d_problems(results[: len(spec.cases)]))
    return CheckReport(str(root), tuple(problems), len(spec.cases), len(spec.test_cases))


def require_clean(dataset: str | os.PathLike, *, allow_channel_grids: bool = False) -> DatasetSpec:
    """The dataset folder's spec, after :func:`check_dataset` found no error.

    ``allow_channel_grids`` ignores channels that are not on channel 0's grid (for
    co-registration, which resamples them).

    Raises
    ------
    MedsegError
        Naming the first problem (and how many more there are).
    """
    report = check_dataset(dataset)
    errors = [e for e in report.errors if not (allow_channel_grids and e.kind == CHANNEL_GRID)]
    if errors:
        first = errors[0]
        more = (
            f" (and {len(errors) - 1} more; run `medseg check {dataset}`)"
            if len(errors) > 1
            else ""
        )
        raise MedsegError(f"{first.path}: {first.message}{more}")
    return load_dataset(dataset)
