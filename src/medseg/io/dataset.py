"""Dataset folders: the MSD layout, the nnU-Net v2 layout and a plain 2D layout.

A :class:`DatasetSpec` lists the cases and their files; it is what every later
stage receives. It holds paths and metadata only, no pixels.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, MedsegError
from medseg.io.files import (
    _2D_SUFFIXES,
    image_suffix,
    read_image,
    read_image_channels,
    strip_suffix,
)
from medseg.io.image import Image

CT_NAMES = ("ct", "computed tomography")


@dataclass(frozen=True)
class CaseSpec:
    """One case: its image file(s) (one per channel, or one multi-channel file) and label."""

    case_id: str
    images: tuple[str, ...]
    label: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset folder holds. Round-trips to JSON with :meth:`to_json`."""

    root: str
    name: str
    layout: str  # "msd" | "nnunetv2" | "plain2d"
    channel_names: tuple[str, ...]
    labels: tuple[tuple[int, str], ...]  # (value, name), background included
    cases: tuple[CaseSpec, ...]
    test_cases: tuple[CaseSpec, ...] = ()
    file_ending: str = ".nii.gz"
    binary_masks_255: bool = False  # plain 2D masks stored as 0/255
    extra: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Classes the network predicts: the largest label value + 1."""
        return max(v for v, _ in self.labels) + 1

    @property
    def label_names(self) -> dict[int, str]:
        return dict(self.labels)

    @property
    def is_ct(self) -> tuple[bool, ...]:
        return tuple(name.strip().lower() in CT_NAMES for name in self.channel_names)

    def case(self, case_id: str) -> CaseSpec:
        for case in self.cases + self.test_cases:
            if case.case_id == case_id:
                return case
        raise DatasetError(f"{self.root}: no case {case_id!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DatasetSpec:
        data = dict(data)
        data["channel_names"] = tuple(data["channel_names"])
        data["labels"] = tuple((int(v), str(n)) for v, n in data["labels"])
        for key in ("cases", "test_cases"):
            data[key] = tuple(
                CaseSpec(c["case_id"], tuple(c["images"]), c.get("label"))
                for c in data.get(key, ())
            )
        return cls(**data)


def read_case_image(spec: DatasetSpec, case: CaseSpec) -> list[Image]:
    """The channels of one case, in ``spec.channel_names`` order."""
    channels: list[Image] = []
    for path in case.images:
        channels.extend(read_image_channels(path))
    if len(channels) != spec.num_channels:
        raise DatasetError(
            f"{case.images[0]}: has {len(channels)} channel(s), the dataset declares {spec.num_channels}"
        )
    return channels


def read_case_label(spec: DatasetSpec, case: CaseSpec) -> Image:
    """The label map of one case as integers (0/255 masks become 0/1)."""
    if case.label is None:
        raise DatasetError(f"{spec.root}: case {case.case_id} has no label")
    label = read_image(case.label)
    array = label.array
    if spec.binary_masks_255:
        array = (array > 127).astype(np.uint8)
    elif array.dtype.kind == "f":
        array = np.rint(array)
    return label.with_array(array.astype(np.uint8 if array.max(initial=0) < 256 else np.int16))


def parse_labels(raw: dict, path: Path) -> tuple[tuple[int, str], ...]:
    """Labels in either direction: ``{"0": "background"}`` (MSD) or ``{"background": 0}`` (nnU-Net v2)."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty mapping")
    pairs: list[tuple[int, str]] = []
    for key, value in raw.items():
        if _INTEGER.match(str(key).strip()):
            pairs.append((int(key), str(value)))
        elif (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and _INTEGER.match(value.strip())
        ):
            pairs.append((int(value), str(key)))
        elif isinstance(value, list):
            raise DatasetError(f"{path}: region-based labels ({key}: {value}) are not supported")
        else:
            raise DatasetError(f"{path}: cannot read label entry {key!r}: {value!r}")
    pairs.sort()
    if pairs[0][0] != 0:
        pairs.insert(0, (0, "background"))
    values = [v for v, _ in pairs]
    if len(set(values)) != len(values):
        raise DatasetError(f"{path}: label values repeat: {values}")
    return tuple(pairs)


def _channel_names(meta: dict, path: Path) -> tuple[str, ...]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: needs 'modality' (MSD) or 'channel_names' (nnU-Net v2)")
    if not all(_INTEGER.match(str(k).strip()) for k in raw):
        raise DatasetError(f'{path}: channel keys must be numbers like "0", got {list(raw)[:5]}')
    return tuple(str(raw[k]) for k in sorted(raw, key=lambda k: int(k)))


def _channel_files(
    folder: Path, case_id: str, n_channels: int, ending: str
) -> tuple[str, ...] | None:
    files = [folder / f"{case_id}_{i:04d}{ending}" for i in range(n_channels)]
    if all(f.exists() for f in files):
        return tuple(str(f) for f in files)
    return None


def _scan_cases(
    images_dir: Path, labels_dir: Path | None, n_channels: int, ending: str
) -> tuple[CaseSpec, ...]:
    """Cases from ``<case>_<XXXX><ending>`` files (or ``<case><ending>`` single files)."""
    if not images_dir.is_dir():
        return ()
    ids: set[str] = set()
    for f in images_dir.iterdir():
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        stem = f.name[: -len(ending)]
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            ids.add(stem[:-5])
        else:
            ids.add(stem)
    cases = []
    for case_id in sorted(ids):
        images = _channel_files(images_dir, case_id, n_channels, ending)
        if images is None:
            single = images_dir / f"{case_id}{ending}"
            images = (
                (str(single),)
                if single.exists()
                else tuple(
                    str(images_dir / f"{case_id}_{i:04d}{ending}") for i in range(n_channels)
                )
            )
        label = None
        if labels_dir is not None:
            label = str(labels_dir / f"{case_id}{ending}")
        cases.append(CaseSpec(case_id, images, label))
    return tuple(cases)


_INTEGER = re.compile(r"^-?[0-9]{1,9}$")
_ENDING = re.compile(r"^\.[A-Za-z0-9.]{1,15}$")


def _inside(meta_path: Path, relative: str) -> str:
    """A path of dataset.json, refused when it leaves the dataset folder."""
    normal = os.path.normpath(relative) if relative else ""
    if os.path.isabs(normal) or normal == ".." or normal.startswith("../") or "\0" in normal:
        raise DatasetError(f"{meta_path}: {relative[:60]!r} points outside the dataset folder")
    return relative


def _load_json_dataset(root: Path) -> DatasetSpec:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{meta_path}: not UTF-8 text") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: must hold a JSON object")
    if "labels" not in meta:
        raise DatasetError(f"{meta_path}: missing 'labels'")
    channels = _channel_names(meta, meta_path)
    labels = parse_labels(meta["labels"], meta_path)
    layout = "nnunetv2" if "channel_names" in meta or "file_ending" in meta else "msd"
    ending = str(meta.get("file_ending", ".nii.gz"))
    if not _ENDING.match(ending):
        raise DatasetError(
            f"{meta_path}: 'file_ending' must look like .nii.gz, got {ending[:30]!r}"
        )
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    cases = _scan_cases(images_dir, labels_dir, len(channels), ending)
    if layout == "msd" and isinstance(meta.get("training"), list) and meta["training"]:
        # MSD lists its cases; an nnU-Net conversion of it renames images to _0000.
        listed = []
        for entry in meta["training"]:
            if not isinstance(entry, dict):
                raise DatasetError(
                    f"{meta_path}: 'training' entries must be objects, got {entry!r:.40}"
                )
            image_rel = _inside(meta_path, str(entry.get("image", "")).removeprefix("./"))
            case_id = strip_suffix(image_rel)
            found = _channel_files(images_dir, case_id, len(channels), ending)
            images = found or (str(root / image_rel),)
            label_rel = entry.get("label")
            listed.append(
                CaseSpec(
                    case_id,
                    images,
                    str(root / _inside(meta_path, str(label_rel).removeprefix("./")))
                    if label_rel
                    else None,
                )
            )
        listed_ids = {c.case_id for c in listed}
        # Files on disk that the JSON does not list still count (check reports them).
        cases = tuple(listed) + tuple(c for c in cases if c.case_id not in listed_ids)
    labels_ts = root / "labelsTs"  # held-out references, where a dataset ships them
    test_cases = _scan_cases(
        root / "imagesTs", labels_ts if labels_ts.is_dir() else None, len(channels), ending
    )
    return DatasetSpec(
        root=str(root),
        name=str(meta.get("name", root.name)),
        layout=layout,
        channel_names=channels,
        labels=labels,
        cases=cases,
        test_cases=test_cases,
        file_ending=ending,
    )


def _find_plain_label(masks_dir: Path, stem: str) -> Path | None:
    for suffix in ("", "_mask", "_seg", "_label", "_Annotation", "_annotation"):
        for ext in _2D_SUFFIXES + (".nii.gz", ".nii", ".mha", ".nrrd"):
            candidate = masks_dir / f"{stem}{suffix}{ext}"
            if candidate.exists():
                return candidate
    return None


def _load_plain_dataset(root: Path, images_dir: Path, masks_dir: Path) -> DatasetSpec:
    cases = []
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or not image_suffix(f):
            continue
        stem = strip_suffix(f)
        label = _find_plain_label(masks_dir, stem)
        cases.append(CaseSpec(stem, (str(f),), str(label) if label else str(masks_dir / f.name)))
    if not cases:
        raise DatasetError(f"{images_dir}: no image files")
    # Label values and channel count come from the files themselves.
    values: set[int] = set()
    for case in cases:
        if case.label and Path(case.label).exists():
            try:
                array = read_image(case.label).array
            except Exception:  # unreadable masks are reported by `check`
                continue
            values.update(int(v) for v in np.unique(array) if float(v).is_integer())
    binary_255 = bool(values) and values <= {0, 255} and 255 in values
    if binary_255:
        values = {0, 1}
    values |= {0}
    labels = tuple((v, "background" if v == 0 else f"label_{v}") for v in sorted(values))
    if len(labels) == 1:
        labels = ((0, "background"), (1, "foreground"))
    try:
        n_channels = len(read_image_channels(cases[0].images[0]))
    except MedsegError:  # an unreadable first image is reported by `check`
        n_channels = 1
    channel_names = (
        ("grey",) if n_channels == 1 else tuple(f"channel_{i}" for i in range(n_channels))
    )
    return DatasetSpec(
        root=str(root),
        name=root.name,
        layout="plain2d",
        channel_names=channel_names,
        labels=labels,
        cases=tuple(cases),
        file_ending=image_suffix(cases[0].images[0]),
        binary_masks_255=binary_255,
    )


def load_dataset(root: str | os.PathLike) -> DatasetSpec:
    """Read a dataset folder in the MSD, nnU-Net v2 or plain 2D (``images/`` + ``masks/``) layout."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if (root / "dataset.json").exists():
        return _load_json_dataset(root)
    images_dir = root / "images"
    masks_dir = next((root / n for n in ("masks", "labels") if (root / n).is_dir()), None)
    if images_dir.is_dir() and masks_dir is not None:
        return _load_plain_dataset(root, images_dir, masks_dir)
    raise DatasetError(
        f"{root}: not a dataset folder (expected dataset.json with imagesTr/ and labelsTr/, "
        "or images/ and masks/)"
    )
