"""Load a trained model folder and predict cases in their original geometry."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.inference.postprocess import fill_holes, keep_largest_component
from medseg.io.files import image_suffix, read_image_channels, strip_suffix, write_image
from medseg.io.image import Image
from medseg.models.sliding_window import sliding_window_logits
from medseg.planning.plan import read_plan
from medseg.preprocessing.preprocess import CaseGeometry, preprocess_image
from medseg.progress import progress
from medseg.serialization import from_jsonable, write_json_atomic
from medseg.training.config import TrainConfig
from medseg.training.trainer import available_cores, build_model, choose_device, memory_format


@dataclass(frozen=True)
class Prediction:
    """What one prediction produced (JSON round trip via medseg.serialization)."""

    case_id: str
    inputs: tuple[str, ...]
    output: str
    folds: tuple[int, ...]
    mirror_axes: tuple[int, ...]
    seconds: float
    label_volumes_mm3: dict[str, float]


def available_folds(model_dir: str | os.PathLike, checkpoint: str = "best") -> list[int]:
    folds = []
    for d in sorted(Path(model_dir).glob("fold_*")):
        if (d / f"checkpoint_{checkpoint}.pt").exists() and d.name[5:].isdigit():
            folds.append(int(d.name[5:]))
    return folds


class Predictor:
    """Networks of one or several folds, ready to predict. Folds are ensembled by mean probability."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        folds: list[int] | None = None,
        checkpoint: str = "best",
        device: str = "auto",
    ) -> None:
        self.model_dir = Path(model_dir)
        self.plan = read_plan(model_dir)
        self.device = choose_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(available_cores())
        found = available_folds(model_dir, checkpoint)
        self.folds = folds if folds is not None else found
        missing = [f for f in self.folds if f not in found]
        if not self.folds or missing:
            raise MedsegError(
                f"{model_dir}: no {checkpoint} checkpoint for fold(s) {missing or 'any'}"
            )
        self.models = []
        for fold in self.folds:
            fold_dir = self.model_dir / f"fold_{fold}"
            config_path = fold_dir / "train_config.json"
            model_name = None
            if config_path.exists():
                model_name = from_jsonable(TrainConfig, json.loads(config_path.read_text())).model
            model = build_model(self.plan, name=model_name, deep_supervision=False)
            state = torch.load(
                fold_dir / f"checkpoint_{checkpoint}.pt", map_location="cpu", weights_only=False
            )
            model.load_state_dict(state["model"])
            model.eval()
            self.models.append(
                model.to(self.device).to(memory_format=memory_format(self.plan.ndim))
            )

    def probabilities(self, data: np.ndarray, *, mirror_axes: tuple[int, ...] = ()) -> torch.Tensor:
        """Mean softmax over folds for preprocessed ``(C, *S)`` data: ``(K, *S)``."""
        x = torch.from_numpy(np.ascontiguousarray(data))
        total = None
        for model in self.models:
            logits = sliding_window_logits(
                model,
                x,
                patch_size=self.plan.patch_size,
                num_classes=self.plan.num_classes,
                mirror_axes=mirror_axes,
                device=self.device,
            )
            probs = torch.softmax(logits, dim=0)
            total = probs if total is None else total.add_(probs)
        return total / len(self.models)

    def predict(
        self,
        channels: list[Image],
        *,
        mirror_axes: tuple[int, ...] = (),
        largest_component: bool = False,
        fill: bool = False,
    ) -> Image:
        """Label map for one case, in the geometry of its first channel."""
        if len(channels) != self.plan.num_channels:
            raise MedsegError(
                f"the model expects {self.plan.num_channels} channel(s), got {len(channels)}"
            )
        if channels[0].ndim != self.plan.ndim:
            raise MedsegError(
                f"the model expects {self.plan.ndim}D images, got {channels[0].ndim}D"
            )
        data, geometry = preprocess_image(channels, self.plan)
        probs = self.probabilities(data, mirror_axes=mirror_axes)
        label = restore_geometry(probs, geometry)
        if largest_component:
            label = keep_largest_component(label)
        if fill:
            label = fill_holes(label)
        return channels[0].with_array(label)


def restore_geometry(probs: torch.Tensor, geometry: CaseGeometry) -> np.ndarray:
    """Resample class probabilities back to the cropped grid, take the argmax, and un-crop."""
    cropped = geometry.cropped_shape
    num_classes = probs.shape[0]
    if tuple(probs.shape[1:]) != cropped:
        mode = "bilinear" if len(cropped) == 2 else "trilinear"
        best = torch.full(cropped, -1.0)
        label_small = torch.zeros(cropped, dtype=torch.int64)
        for c in range(num_classes):  # one class at a time keeps peak memory at one volume
            up = F.interpolate(probs[c][None, None], size=cropped, mode=mode, align_corners=False)[
                0, 0
            ]
            better = up > best
            best[better] = up[better]
            label_small[better] = c
        label_cropped = label_small.numpy()
    else:
        label_cropped = probs.argmax(0).numpy()
    dtype = np.uint8 if num_classes < 256 else np.int16
    full = np.zeros(geometry.shape, dtype=dtype)
    full[tuple(slice(a, b) for a, b in geometry.bbox)] = label_cropped
    return full


def group_inputs(paths: list[Path], num_channels: int) -> dict[str, list[Path]]:
    """Group input files into cases: ``case_0000.nii.gz``, ``case_0001.nii.gz`` ... or one file per case."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(paths):
        stem = strip_suffix(path) if path.is_file() else path.name
        if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            groups.setdefault(stem[:-5], []).append(path)
        else:
            groups.setdefault(stem, []).append(path)
    for case_id, files in groups.items():
        if (
            num_channels > 1
            and len(files) != num_channels
            and not (len(files) == 1 and files[0].is_file())
        ):
            raise MedsegError(
                f"{files[0].parent}: case {case_id} has {len(files)} file(s), the model needs {num_channels} channels"
            )
    return groups


def collect_inputs(input_path: str | os.PathLike) -> list[Path]:
    """Image files of a folder, one file, or a DICOM series folder."""
    path = Path(input_path)
    if not path.exists():
        raise MedsegError(f"{path}: not found")
    if path.is_file():
        return [path]
    files = [
        p
        for p in sorted(path.iterdir())
        if p.is_file() and image_suffix(p) and not p.name.startswith(".")
    ]
    if files:
        return files
    subdirs = [p for p in sorted(path.iterdir()) if p.is_dir()]
    if subdirs:  # a folder of DICOM series folders
        return subdirs
    return [path]  # a DICOM series folder itself


def predict_to_folder(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    folds: list[int] | None = None,
    mirror_axes: tuple[int, ...] = (),
    largest_component: bool = False,
    fill: bool = False,
    overwrite: bool = False,
    output_format: str | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> list[Prediction]:
    """Predict every case under ``input_path`` into ``output_dir`` (same geometry as the input).

    Cases whose output exists are skipped unless ``overwrite`` (so an interrupted run resumes).
    """
    predictor = Predictor(model_dir, folds=folds, device=device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    groups = group_inputs(collect_inputs(input_path), predictor.plan.num_channels)
    results = []
    for case_id, files in progress(
        groups.items(), total=len(groups), desc="predict", enabled=show_progress
    ):
        suffix = output_format or (
            ".png" if image_suffix(files[0]) in (".png", ".jpg", ".jpeg", ".bmp") else ".nii.gz"
        )
        out_path = output_dir / f"{case_id}{suffix}"
        if out_path.exists() and not overwrite:
            continue
        t = time.perf_counter()
        channels: list[Image] = []
        for f in files:
            channels.extend(read_image_channels(f))
        label = predictor.predict(
            channels, mirror_axes=mirror_axes, largest_component=largest_component, fill=fill
        )
        write_image(label, out_path, overwrite=overwrite)
        voxel = float(np.prod(label.spacing))
        counts = np.bincount(
            label.array.ravel().astype(np.int64), minlength=predictor.plan.num_classes
        )
        names = dict(predictor.plan.labels)
        results.append(
            Prediction(
                case_id=case_id,
                inputs=tuple(str(f) for f in files),
                output=str(out_path),
                folds=tuple(predictor.folds),
                mirror_axes=tuple(mirror_axes),
                seconds=round(time.perf_counter() - t, 3),
                label_volumes_mm3={
                    names.get(v, str(v)): float(counts[v] * voxel) for v in range(1, len(counts))
                },
            )
        )
    if results:
        write_json_atomic(results, output_dir / "predictions.json")
    return results
