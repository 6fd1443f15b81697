"""Load a trained model folder and predict cases in their original geometry.

The networks of all folds share one sliding-window tile loop (logits averaged,
as nnU-Net does). Volumes whose preprocessed grid is the original one are
streamed (argmax slab by slab, see :func:`medseg.models.sliding_window.sliding_window_labels`);
the others keep logits (float16 when large) and are resampled back one class
at a time, so peak memory does not grow with classes x original voxels.
Networks run with PyTorch or, after ``medseg export``, with onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.imaging.components import keep_largest_component
from medseg.imaging.morphology import fill_holes
from medseg.inference.postprocess import apply_postprocessing, read_postprocessing
from medseg.inference.uncertainty import (
    MCDropoutForward,
    MemberAccumulator,
    case_scores,
    has_dropout,
)
from medseg.inference.uncertainty import entropy as entropy_of
from medseg.io.image import Image
from medseg.io.sanity import NAN_POLICIES, check_finite
from medseg.model_folder import ModelFolder
from medseg.models.sliding_window import flip_sets, sliding_window_labels, sliding_window_logits
from medseg.preprocessing.preprocess import CaseGeometry, preprocess_image
from medseg.runtime import choose_device, resolve_precision, usable_cores

BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-int8-static")
# Above this many bytes of float32 logits, accumulate in float16 instead.
HALF_PRECISION_BYTES = 1 << 30


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
    quality: dict[str, float] | None = None  # per-case uncertainty scores (predict --qc)


@dataclass(frozen=True)
class TrustResult:
    """What :meth:`Predictor.infer_trust` produced for one case.

    ``probabilities`` is ``(K, *S)`` float32 on the input grid (None unless asked);
    ``scores`` are the per-case uncertainty scores; ``members`` how many predictions
    (folds x mirrored copies x MC samples) were combined.
    """

    label: Image
    entropy: Image
    mutual_information: Image | None
    probabilities: np.ndarray | None
    scores: dict[str, float]
    members: int


def onnx_path(model_dir: str | os.PathLike, fold: int, backend: str) -> Path:
    """Where ``medseg export`` puts a fold's ONNX file for a backend."""
    suffix = {
        "onnx": "",
        "onnx-int8": "_int8_dynamic",
        "onnx-int8-static": "_int8_static",
    }[backend]
    return Path(model_dir) / "export" / f"fold_{fold}{suffix}.onnx"


class OnnxForward:
    """An onnxruntime session as a ``(N, C, *P) tensor -> (N, K, *P) tensor`` callable."""

    def __init__(self, path: str | os.PathLike, *, num_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MedsegError(
                "the ONNX backends need onnxruntime: pip install 'medseg[export]'"
            ) from None
        path = Path(path)
        if not path.exists():
            raise MedsegError(f"{path}: no exported model (run `medseg export` first)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or usable_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MedsegError(f"{path}: cannot load ONNX model ({str(exc)[:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


class Predictor:
    """Networks of one or several folds, ready to predict. Folds are ensembled by mean logits.

    Parameters
    ----------
    model_dir
        Model folder (plan.json, fold_<k>/ and, after ``medseg export``, export/), or a
        work folder holding ``model/``; read with :class:`medseg.model_folder.ModelFolder`.
    folds
        Folds to ensemble (default: every fold with weights).
    checkpoint
        ``"best"`` or ``"last"`` weights.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` ... (PyTorch backend).
    backend
        ``"torch"``, ``"onnx"``, ``"onnx-int8"`` (dynamic) or ``"onnx-int8-static"``.
    num_threads
        CPU threads (default: the cores actually usable, see :func:`usable_cores`).
    tile_batch_size
        Tiles per forward pass.
    precision
        ``"auto"`` (default: see :func:`resolve_precision`), ``"fp32"`` or ``"bf16"``
        (PyTorch on CPU: bfloat16 autocast, fast on CPUs with AMX or AVX512-BF16; logits
        are still accumulated in float32). The choice is in ``self.precision``.
    nan_policy
        NaN or infinite input voxels: ``"refuse"`` (default, a one-line error naming the
        file) or ``"zero"`` (set to 0, with a warning naming the file and the voxel count).
    calibrated
        Divide the logits by the temperature that ``medseg calibrate`` stored in the model
        folder (``calibration.json``), if any; ``self.temperature`` holds it (None: none).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        folds: list[int] | None = None,
        checkpoint: str = "best",
        device: str = "auto",
        backend: str = "torch",
        num_threads: int | None = None,
        tile_batch_size: int = 4,
        precision: str = "auto",
        nan_policy: str = "refuse",
        calibrated: bool = True,
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise MedsegError(f"unknown NaN policy {nan_policy!r} (use one of refuse, zero)")
        self.nan_policy = nan_policy
        if backend not in BACKENDS:
            raise MedsegError(f"unknown backend {backend!r} (use one of {', '.join(BACKENDS)})")
        self.device = choose_device(device) if backend == "torch" else torch.device("cpu")
        self.precision = resolve_precision(precision, backend=backend, device=self.device)
        self.folder = ModelFolder.open(model_dir)
        self.model_dir = self.folder.path
        self.plan = self.folder.plan
        self.backend = backend
        self.cpu_bf16 = self.precision == "bf16" and backend == "torch"
        self.tile_batch_size = tile_batch_size
        threads = num_threads or usable_cores()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.folds = self.folder.select_folds(folds, checkpoint)
        if backend != "torch" and folds is None:
            exported = [f for f in self.folds if onnx_path(self.model_dir, f, backend).exists()]
            self.folds = exported or self.folds
        if backend == "torch":
            self.models: list = self.folder.load_networks(
                self.folds, kind=checkpoint, device=self.device
            )
        else:
            self.models = [
                OnnxForward(onnx_path(self.model_dir, f, backend), num_threads=threads)
                for f in self.folds
            ]
        self.postprocessing = read_postprocessing(self.model_dir)
        self.calibration = self.folder.calibration
        self.temperature: torch.Tensor | None = None
        if calibrated and self.calibration is not None:
            self.temperature = torch.tensor(self.calibration.temperature, dtype=torch.float32)
        # Channels may be missing at prediction only if every fold trained with modality dropout.
        self.modality_dropout = min(
            float((self.folder.training_record(f) or {}).get("modality_dropout") or 0.0)
            for f in self.folds
        )

    def missing_channels(self, missing: Sequence[str | int] = ()) -> tuple[int, ...]:
        """Indices of the plan channels named in ``missing`` (names, any case, or numbers).

        Raises
        ------
        MedsegError
            One line naming the channel, when it is unknown, when every channel would be
            missing, or when the model was not trained for missing channels (modality dropout).
        """
        names = [n.lower() for n in self.plan.channel_names]
        indices = set()
        for item in missing:
            key = str(item).strip()
            if key.lower() in names:
                indices.add(names.index(key.lower()))
            elif key.isdigit() and int(key) < len(names):
                indices.add(int(key))
            else:
                raise MedsegError(
                    f"missing channel {key!r} is not a channel of the model "
                    f"({', '.join(self.plan.channel_names)})"
                )
        if not indices:
            return ()
        if len(indices) == len(names):
            raise MedsegError("every channel of the model is missing: nothing to predict from")
        if self.modality_dropout <= 0:
            name = self.plan.channel_names[min(indices)]
            raise MedsegError(
                f"{self.model_dir}: channel {name!r} is missing and this model was not trained "
                "for missing channels (train it with --modality-dropout)"
            )
        return tuple(sorted(indices))

    def logits(
        self, data: np.ndarray, *, mirror_axes: tuple[int, ...] = (), half: bool | None = None
    ) -> torch.Tensor:
        """Mean blended logits over folds for preprocessed ``(C, *S)`` data: ``(K, *S)``.

        ``half`` accumulates in float16 (default: when float32 logits would exceed 1 GiB).
        """
        x = torch.from_numpy(np.ascontiguousarray(data))
        if half is None:
            half = self.plan.num_classes * data[0].size * 4 > HALF_PRECISION_BYTES
        logits = sliding_window_logits(
            self.models,
            x,
            patch_size=self.plan.patch_size,
            num_classes=self.plan.num_classes,
            mirror_axes=mirror_axes,
            tile_batch_size=self.tile_batch_size,
            device=self.device,
            cpu_bf16=self.cpu_bf16,
            buffer_dtype=torch.float16 if half else torch.float32,
        )
        return self.scale(logits)

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        """Divide ``(K, *S)`` logits in place by the stored temperature (no-op without one)."""
        if self.temperature is not None:
            t = self.temperature.to(logits.device, logits.dtype)
            logits.div_(t.reshape(-1, *([1] * (logits.ndim - 1))))
        return logits

    def probabilities(self, data: np.ndarray, *, mirror_axes: tuple[int, ...] = ()) -> torch.Tensor:
        """Softmax of the mean logits over folds for preprocessed ``(C, *S)`` data: ``(K, *S)``."""
        return softmax_inplace(self.logits(data, mirror_axes=mirror_axes))

    def predict_case(
        self,
        channels: list[Image],
        *,
        mirror_axes: tuple[int, ...] = (),
        largest_component: bool = False,
        fill: bool = False,
        postprocess: bool = True,
        uncertainty: bool = False,
        source: str | os.PathLike | None = None,
        missing: Sequence[str | int] = (),
    ) -> tuple[Image, Image | None]:
        """Label map (and entropy map when ``uncertainty``) in the geometry of the first channel.

        ``postprocess`` applies what :func:`medseg.api.select_postprocessing` recorded in
        the model folder (thresholds, components, holes); ``largest_component`` and
        ``fill`` add those operations to every class. ``source`` (the input file) is named
        in the errors of :meth:`prepare`. ``missing``: see :meth:`prepare`.
        """
        data, geometry = self.prepare(channels, source=source, missing=missing)
        return self.infer(
            data,
            geometry,
            channels[0],
            mirror_axes=mirror_axes,
            largest_component=largest_component,
            fill=fill,
            postprocess=postprocess,
            uncertainty=uncertainty,
        )

    def prepare(
        self,
        channels: list[Image],
        *,
        source: str | os.PathLike | None = None,
        missing: Sequence[str | int] = (),
    ) -> tuple[np.ndarray, CaseGeometry]:
        """Check and preprocess one case's channels (crop, normalize, resample).

        The checks (channel count, 2D/3D, NaN/inf by ``nan_policy``) name ``source``, the
        input file(s), when given. ``missing`` names the channels the case lacks (see
        :meth:`missing_channels`); ``channels`` then holds the others, in the plan's order,
        and each missing channel is zero after normalization, as in modality dropout.
        """
        where = f"{source}: " if source is not None else ""
        absent = self.missing_channels(missing)
        if len(channels) + len(absent) != self.plan.num_channels:
            raise MedsegError(
                f"{where}the model expects {self.plan.num_channels} channel(s), got {len(channels)}"
                + (f" and {len(absent)} missing" if absent else "")
            )
        if channels[0].ndim != self.plan.ndim:
            raise MedsegError(
                f"{where}the model expects {self.plan.ndim}D images, got {channels[0].ndim}D"
            )
        channels = check_finite(
            channels, source=source if source is not None else "input", policy=self.nan_policy
        )
        if not absent:
            return preprocess_image(channels, self.plan)
        present = iter(channels)
        blank = channels[0].with_array(np.zeros(channels[0].shape, dtype=np.float32))
        full = [blank if c in absent else next(present) for c in range(self.plan.num_channels)]
        data, geometry = preprocess_image(full, self.plan)
        data[list(absent)] = 0.0
        return data, geometry

    def infer(
        self,
        data: np.ndarray,
        geometry: CaseGeometry,
        reference: Image,
        *,
        mirror_axes: tuple[int, ...] = (),
        largest_component: bool = False,
        fill: bool = False,
        postprocess: bool = True,
        uncertainty: bool = False,
    ) -> tuple[Image, Image | None]:
        """Network, resampling back and postprocessing of a :meth:`prepare`-d case."""
        pp = self.postprocessing if postprocess else None
        thresholds = pp.thresholds if pp is not None else {}
        entropy_small: np.ndarray | None = None
        # a stored temperature changes the entropy (and, per class, the argmax): not streamed
        calibrated = self.temperature is not None and (uncertainty or self.temperature.numel() > 1)
        if tuple(data.shape[1:]) == geometry.cropped_shape and not thresholds and not calibrated:
            # Same grid as the input: stream the argmax, never holding all class logits.
            label_cropped, entropy_small = sliding_window_labels(
                self.models,
                torch.from_numpy(np.ascontiguousarray(data)),
                patch_size=self.plan.patch_size,
                num_classes=self.plan.num_classes,
                mirror_axes=mirror_axes,
                tile_batch_size=self.tile_batch_size,
                device=self.device,
                cpu_bf16=self.cpu_bf16,
                entropy=uncertainty,
            )
            del data
            label = uncrop(label_cropped, geometry, self.plan.num_classes)
            entropy = uncrop(entropy_small, geometry) if entropy_small is not None else None
        else:
            probs = softmax_inplace(self.logits(data, mirror_axes=mirror_axes))
            del data
            entropy = None
            if uncertainty:
                entropy = uncrop(resample_to(entropy_map(probs), geometry), geometry)
            label = restore_geometry(probs, geometry, thresholds=thresholds)
            del probs
        if pp is not None:
            label = apply_postprocessing(label, pp, spacing=reference.spacing)
        if largest_component:
            label = keep_largest_component(label)
        if fill:
            label = fill_holes(label)
        out = reference.with_array(label)
        return out, (reference.with_array(entropy) if entropy is not None else None)

    def member_forwards(self, mc_samples: int = 0) -> list:
        """The ensemble's networks as callables; with ``mc_samples``, their dropout stays on.

        Raises
        ------
        MedsegError
            One line naming the model folder, when MC dropout is asked of a network without
            dropout (or of an exported ONNX model).
        """
        if mc_samples <= 0:
            return list(self.models)
        if self.backend != "torch":
            raise MedsegError(f"{self.model_dir}: MC dropout needs the torch backend")
        if not all(has_dropout(m) for m in self.models):
            raise MedsegError(
                f"{self.model_dir}: the network has no dropout layers, so MC dropout "
                "cannot sample it (use folds or TTA for uncertainty)"
            )
        return [MCDropoutForward(m) for m in self.models]

    def member_logits(
        self, data: np.ndarray, *, mirror_axes: tuple[int, ...] = (), mc_samples: int = 0
    ) -> Iterator[torch.Tensor]:
        """Temperature-scaled ``(K, *S)`` logits of each member, one at a time.

        Members: every fold, times every mirrored copy of ``mirror_axes`` (identity
        included), times ``mc_samples`` dropout samples (when > 0).
        """
        forwards = self.member_forwards(mc_samples)
        x = torch.from_numpy(np.ascontiguousarray(data))
        for forward in forwards:
            for dims in flip_sets(mirror_axes, self.plan.ndim):
                axes = [d - 1 for d in dims]  # (C, *S): spatial axis a is tensor dim a + 1
                xi = torch.flip(x, axes) if axes else x
                for _ in range(max(1, mc_samples)):
                    logits = sliding_window_logits(
                        forward,
                        xi,
                        patch_size=self.plan.patch_size,
                        num_classes=self.plan.num_classes,
                        tile_batch_size=self.tile_batch_size,
                        device=self.device,
                        cpu_bf16=self.cpu_bf16,
                    )
                    yield self.scale(torch.flip(logits, axes) if axes else logits)

    def infer_trust(
        self,
        data: np.ndarray,
        geometry: CaseGeometry,
        reference: Image,
        *,
        mirror_axes: tuple[int, ...] = (),
        mc_samples: int = 0,
        probabilities: bool = False,
        largest_component: bool = False,
        fill: bool = False,
        postprocess: bool = True,
    ) -> TrustResult:
        """:meth:`infer` with every member (fold x mirrored copy x MC sample) run on its own.

        The label is the argmax of the members' mean (temperature-scaled) logits, as in
        :meth:`infer`; the members also give the entropy, the mutual information and the
        per-case scores of :func:`medseg.inference.uncertainty.case_scores` (network grid).
        ``probabilities`` keeps the calibrated ``(K, *S)`` probabilities on the input grid.
        """
        accumulator = MemberAccumulator()
        for logits in self.member_logits(data, mirror_axes=mirror_axes, mc_samples=mc_samples):
            accumulator.add(logits)
        del data
        probs = torch.softmax(accumulator.mean_logits(), dim=0)
        entropy_small = entropy_of(probs)
        mi_small = accumulator.mutual_information() if accumulator.count > 1 else None
        scores = case_scores(probs, entropy_small, mi_small)
        pp = self.postprocessing if postprocess else None
        thresholds = pp.thresholds if pp is not None else {}
        full = None
        if probabilities:
            full = np.zeros((probs.shape[0], *geometry.shape), dtype=np.float32)
            for c in range(probs.shape[0]):
                full[c] = uncrop(resample_to(probs[c], geometry), geometry)
            inside = np.zeros(geometry.shape, dtype=bool)
            inside[tuple(slice(a, b) for a, b in geometry.bbox)] = True
            full[0][~inside] = 1.0  # outside the crop is background
        label = restore_geometry(probs, geometry, thresholds=thresholds)
        if pp is not None:
            label = apply_postprocessing(label, pp, spacing=reference.spacing)
        if largest_component:
            label = keep_largest_component(label)
        if fill:
            label = fill_holes(label)
        entropy = uncrop(resample_to(entropy_small, geometry), geometry)
        mi = uncrop(resample_to(mi_small, geometry), geometry) if mi_small is not None else None
        return TrustResult(
            label=reference.with_array(label),
            entropy=reference.with_array(entropy),
            mutual_information=reference.with_array(mi) if mi is not None else None,
            probabilities=full,
            scores=scores,
            members=accumulator.count,
        )

    def predict(
        self,
        channels: list[Image],
        *,
        mirror_axes: tuple[int, ...] = (),
        largest_component: bool = False,
        fill: bool = False,
        postprocess: bool = True,
    ) -> Image:
        """Label map for one case, in the geometry of its first channel."""
        label, _ = self.predict_case(
            channels,
            mirror_axes=mirror_axes,
            largest_component=largest_component,
            fill=fill,
            postprocess=postprocess,
        )
        return label


def softmax_inplace(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 0, slab by slab along the last axis (float16 buffers stay float16)."""
    step = max(1, logits.shape[-1] // 8)
    for z in range(0, logits.shape[-1], step):
        sl = (Ellipsis, slice(z, z + step))
        logits[sl] = torch.softmax(logits[sl].float(), dim=0).to(logits.dtype)
    return logits


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Softmax entropy (nats) of ``(K, *S)`` probabilities, float32 ``(*S)``."""
    out = torch.zeros(probs.shape[1:], dtype=torch.float32)
    for c in range(probs.shape[0]):
        p = probs[c].float()
        out -= p * torch.log(p.clamp_min(1e-12))
    return out


def resample_to(volume: torch.Tensor, geometry: CaseGeometry) -> np.ndarray:
    """Linear resampling of one ``(*S)`` map to the cropped original grid."""
    cropped = geometry.cropped_shape
    if tuple(volume.shape) == cropped:
        return volume.numpy()
    mode = "bilinear" if len(cropped) == 2 else "trilinear"
    return F.interpolate(volume[None, None].float(), size=cropped, mode=mode)[0, 0].numpy()


def uncrop(
    cropped: np.ndarray, geometry: CaseGeometry, num_classes: int | None = None
) -> np.ndarray:
    """Put a cropped array back into the full original grid (zeros outside the crop)."""
    if num_classes is not None:
        dtype = np.uint8 if num_classes < 256 else np.int16
    else:
        dtype = cropped.dtype
    full = np.zeros(geometry.shape, dtype=dtype)
    full[tuple(slice(a, b) for a, b in geometry.bbox)] = cropped
    return full


def restore_geometry(
    probs: torch.Tensor, geometry: CaseGeometry, *, thresholds: dict[int, float] | None = None
) -> np.ndarray:
    """Resample class probabilities back to the cropped grid, take the argmax, and un-crop.

    Classes are resampled one at a time, so peak memory is a few original-size
    volumes whatever the number of classes. With ``thresholds`` (class ->
    probability), a voxel gets the most probable foreground class that is eligible
    (its probability reaches its threshold; a class without a threshold must beat
    the background probability), else background. Without thresholds this is the
    plain argmax.
    """
    cropped = geometry.cropped_shape
    num_classes = probs.shape[0]
    thresholds = {int(k): float(v) for k, v in (thresholds or {}).items() if int(k) > 0}
    dtype = torch.uint8 if num_classes < 256 else torch.int16
    resample = tuple(probs.shape[1:]) != cropped
    if not resample and not thresholds:
        return uncrop(probs.argmax(0).to(dtype).numpy(), geometry, num_classes)
    mode = "bilinear" if len(cropped) == 2 else "trilinear"

    def channel(c: int) -> torch.Tensor:
        p = probs[c].float()
        if resample:
            p = F.interpolate(p[None, None], size=cropped, mode=mode, align_corners=False)[0, 0]
        return p

    # Without thresholds this is the argmax (ties go to the lower class), one class at a time.
    background = channel(0)
    best = torch.full(cropped, -1.0)
    label_small = torch.zeros(cropped, dtype=dtype)
    for c in range(1, num_classes):
        up = channel(c)
        eligible = up >= thresholds[c] if c in thresholds else up > background
        better = eligible & (up > best)
        best = torch.where(better, up, best)
        label_small[better] = c
        del up, eligible, better
    label_cropped = label_small.numpy()
    return uncrop(label_cropped, geometry, num_classes)
