"""The model-folder contract: one writer and one reader of trained networks.

A model folder holds::

    plan.json                  the plan; ``network.name`` is the network actually trained
    dataset.json, splits.json  the label map and the folds
    fold_<k>/weights_best.safetensors + weights_best.json   best weights and their metadata
    fold_<k>/weights_last.safetensors + weights_last.json   last weights and their metadata
    fold_<k>/train_config.json the training record (plain JSON, never needed to predict)
    fold_<k>/checkpoint_last.pt the training engine's resumable state (tensors and plain
                               containers only, read with ``weights_only=True``)

Weights are stored with safetensors, so reading a folder never runs code. Folders written
by earlier versions (``fold_<k>/checkpoint_best.pt``, a pickle) are converted once: the
pickle is read with ``torch.load(weights_only=True)``, which refuses anything but tensors
and plain containers, and the original file is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.models import create_model
from medseg.models.fusion import fuse_conv_batchnorm
from medseg.planning.plan import Plan, read_plan
from medseg.runtime import memory_format
from medseg.schema import WEIGHTS_METADATA_SCHEMA, check_plan_json, read_checked_json
from medseg.serialization import write_json_atomic

__all__ = [
    "CALIBRATION_FILE",
    "WEIGHT_KINDS",
    "WEIGHTS_FORMAT_VERSION",
    "Calibration",
    "ModelFolder",
    "build_network",
    "file_sha256",
    "has_weights",
    "legacy_checkpoint_path",
    "read_calibration",
    "read_state_dict_file",
    "read_weights",
    "read_weights_metadata",
    "weights_path",
    "write_weights",
]

WEIGHTS_FORMAT_VERSION = 1
WEIGHT_KINDS = ("best", "last")
CALIBRATION_FILE = "calibration.json"  # written by ``medseg calibrate`` (medseg.calibration)


def _check_kind(kind: str) -> None:
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown weights kind {kind!r} (use one of {', '.join(WEIGHT_KINDS)})")


def weights_path(folder: str | os.PathLike, kind: str = "best") -> Path:
    """Where the ``kind`` (``"best"`` or ``"last"``) weights of a fold folder are stored."""
    _check_kind(kind)
    return Path(folder) / f"weights_{kind}.safetensors"


def legacy_checkpoint_path(folder: str | os.PathLike, kind: str = "best") -> Path:
    """The pickle checkpoint that earlier versions wrote instead of :func:`weights_path`."""
    _check_kind(kind)
    return Path(folder) / f"checkpoint_{kind}.pt"


def _plain_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, contiguous and owning their memory (safetensors refuses shared storage)."""
    tensors = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[str(name)] = value.detach().to(
            device="cpu", memory_format=torch.contiguous_format, copy=True
        )
    return tensors


def write_weights(
    folder: str | os.PathLike,
    kind: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    metadata: dict[str, Any],
) -> None:
    """Write ``weights_<kind>.safetensors`` and ``weights_<kind>.json`` into ``folder``.

    Parameters
    ----------
    folder
        A fold folder (created if missing).
    kind
        ``"best"`` or ``"last"``.
    state_dict
        Tensors by name, e.g. ``model.state_dict()``; copied to the CPU first.
    metadata
        Plain JSON (network name, epoch, val_dice, ...); ``format_version`` is added.

    Notes
    -----
    Both files are written to temporary names in ``folder`` and renamed into place, the
    metadata first, so a reader never sees weights without their metadata. The metadata
    records the SHA-256 of the weights file (``sha256``), checked by :func:`read_weights`.
    """
    path = weights_path(folder, kind)
    tensors = _plain_tensors(state_dict)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
        write_json_atomic(
            {"format_version": WEIGHTS_FORMAT_VERSION, **metadata, "sha256": file_sha256(tmp)},
            path.with_suffix(".json"),
        )


def has_weights(folder: str | os.PathLike, kind: str = "best") -> bool:
    """Whether ``folder`` has ``kind`` weights (safetensors, or a legacy checkpoint)."""
    return weights_path(folder, kind).is_file() or legacy_checkpoint_path(folder, kind).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_metadata(path: Path) -> dict[str, Any]:
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return {}
    # checked against its schema: the folder may come from anywhere
    return read_checked_json(json_path, WEIGHTS_METADATA_SCHEMA)


def _check_checksum(path: Path, metadata: Mapping[str, Any]) -> None:
    """Refuse weights whose SHA-256 differs from the one their metadata recorded."""
    expected = metadata.get("sha256")
    if expected is None:  # written before checksums were recorded
        return
    actual = file_sha256(path)
    if actual != expected:
        raise MedsegError(
            f"{path}: checksum mismatch (sha256 {actual[:16]}..., {path.with_suffix('.json').name} "
            f"records {expected[:16]}...): the weights file is damaged or was replaced"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _torch_load_plain(path: Path) -> Any:
    """``torch.load`` that refuses anything but tensors, numbers, strings and containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a pickle at all, or a damaged one
            raise MedsegError(f"{path}: unreadable checkpoint (not a PyTorch file)") from None
        raise MedsegError(
            f"{path}: refused: the file holds more than tensors and plain containers "
            "(a pickle that could run code); only load model folders you trust"
        ) from None
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        raise MedsegError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None


def _load_legacy(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a legacy checkpoint, read without running pickled code."""
    state = _torch_load_plain(path)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise MedsegError(f"{path}: not a medseg checkpoint (no 'model' state dict)")
    metadata: dict[str, Any] = {"converted_from": path.name}
    for key in ("epoch", "val_dice"):
        value = state.get(key)
        if isinstance(value, (int, float)):
            metadata[key] = value
    return dict(weights), metadata


def read_weights_metadata(folder: str | os.PathLike, kind: str = "best") -> dict[str, Any]:
    """The metadata beside a fold's ``kind`` weights (``{}`` when there is none yet)."""
    return _read_metadata(weights_path(folder, kind))


def read_weights(
    folder: str | os.PathLike, kind: str = "best"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``kind`` weights of a fold folder (CPU tensors) and their metadata.

    Parameters
    ----------
    folder
        A fold folder.
    kind
        ``"best"`` or ``"last"``.

    Returns
    -------
    tuple
        ``(state_dict, metadata)``.

    Raises
    ------
    MedsegError
        When the folder has no such weights, or a legacy checkpoint is not plain tensors.

    Notes
    -----
    A legacy ``checkpoint_<kind>.pt`` is converted once to safetensors beside it (a one-line
    message on stderr); the ``.pt`` file is kept.
    """
    path = weights_path(folder, kind)
    if path.is_file():
        metadata = _read_metadata(path)
        _check_checksum(path, metadata)
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise MedsegError(f"{path}: unreadable weights ({exc})") from None
        return tensors, {k: v for k, v in metadata.items() if k != "sha256"}
    legacy = legacy_checkpoint_path(folder, kind)
    if not legacy.is_file():
        raise MedsegError(f"{folder}: no {kind} weights ({path.name})")
    tensors, metadata = _load_legacy(legacy)
    try:
        write_weights(folder, kind, tensors, metadata=metadata)
    except OSError as exc:  # a read-only folder: use the weights without converting
        print(
            f"medseg: read {legacy} (could not convert it to safetensors: {exc.strerror})",
            file=sys.stderr,
        )
    else:
        print(
            f"medseg: converted {legacy} to {path} (safetensors); the .pt file is kept",
            file=sys.stderr,
        )
    return tensors, {"format_version": WEIGHTS_FORMAT_VERSION, **metadata}


def build_network(
    plan: Plan, *, name: str | None = None, deep_supervision: bool = True, **options: Any
) -> torch.nn.Module:
    """The plan's network, or the registered model ``name``, untrained.

    Parameters
    ----------
    plan
        Gives dimensionality, channels, classes and the topology (features, strides, ...).
    name
        A registered model name (default: ``plan.network.name``).
    deep_supervision
        Whether to build the deep-supervision heads (when the plan has them).
    **options
        Passed to the model factory.

    Returns
    -------
    torch.nn.Module
    """
    net = plan.network
    return create_model(
        name or net.name,
        ndim=plan.ndim,
        in_channels=plan.num_channels,
        num_classes=plan.num_classes,
        features=net.features,
        strides=net.strides,
        kernel_sizes=net.kernel_sizes,
        residual=net.residual,
        deep_supervision=deep_supervision and net.deep_supervision,
        **options,
    )


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one weights file: ``.safetensors``, or a ``.pt`` state dict.

    A ``.pt`` file is read with ``torch.load(weights_only=True)``: a pickle that needs more
    than tensors and plain containers is refused. A medseg checkpoint (a dict with a
    ``"model"`` state dict) gives that state dict.

    Raises
    ------
    MedsegError
        When the file is unreadable, refused, or holds no tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise MedsegError(f"{path}: unreadable weights ({exc})") from None
    state = _torch_load_plain(path)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    tensors = (
        {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, Mapping)
        else {}
    )
    if not tensors:
        raise MedsegError(f"{path}: no state dict of tensors in this file")
    return tensors


@dataclass(frozen=True)
class Calibration:
    """What ``medseg calibrate`` stored in a model folder (``calibration.json``).

    Parameters
    ----------
    temperature
        One temperature (global) or one per class; logits are divided by it before the softmax.
    qc_score
        Name of the per-case uncertainty score that ``predict --qc`` reports.
    qc_threshold
        Cases whose score is at least this are flagged for review (None: not chosen).
    record
        The whole JSON object (how and on what it was fitted).
    """

    temperature: tuple[float, ...]
    qc_score: str | None = None
    qc_threshold: float | None = None
    record: Mapping[str, Any] | None = None


def _positive_finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def read_calibration(path: str | os.PathLike, num_classes: int) -> Calibration | None:
    """The calibration stored at ``path`` (``None`` when there is no file), validated.

    Raises
    ------
    MedsegError
        One line naming the file, when it is not JSON, a temperature is not a positive
        finite number, or the number of temperatures is neither 1 nor ``num_classes``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{path}: unreadable calibration ({_first_line(exc)})") from None
    temps = data.get("temperature") if isinstance(data, dict) else None
    if not isinstance(temps, list) or not temps or not all(map(_positive_finite, temps)):
        raise MedsegError(f"{path}: 'temperature' must be a list of positive numbers")
    if len(temps) not in (1, num_classes):
        raise MedsegError(
            f"{path}: {len(temps)} temperatures for a model of {num_classes} classes "
            "(give 1 or one per class)"
        )
    qc = data.get("qc") or {}
    threshold = qc.get("threshold") if isinstance(qc, dict) else None
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and math.isfinite(threshold)
    ):
        raise MedsegError(f"{path}: 'qc.threshold' must be a finite number")
    score = qc.get("score") if isinstance(qc, dict) else None
    return Calibration(
        temperature=tuple(float(t) for t in temps),
        qc_score=str(score) if score else None,
        qc_threshold=None if threshold is None else float(threshold),
        record=data,
    )


@dataclass(frozen=True)
class ModelFolder:
    """A trained model folder: its plan and the weights of its folds.

    Parameters
    ----------
    path
        The model folder (``plan.json`` and ``fold_<k>/``).
    plan
        Its plan.

    Notes
    -----
    Use :meth:`open`, which also accepts a work folder holding ``model/`` and checks the
    folder, rather than the constructor.
    """

    path: Path
    plan: Plan

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelFolder:
        """The model folder at ``path``, or in ``path/model`` (a work folder).

        Raises
        ------
        MedsegError
            One line naming the folder, when it has no ``plan.json`` or no trained fold.
        """
        path = Path(path)
        if (path / "model" / "plan.json").is_file():
            path = path / "model"
        if not (path / "plan.json").is_file():
            raise MedsegError(f"{path}: not a medseg model folder (no plan.json)")
        check_plan_json(path / "plan.json")  # types and bounds before any value is used
        folder = cls(path, read_plan(path))
        if not folder.folds("best") and not folder.folds("last"):
            raise MedsegError(
                f"{path}: no trained fold (fold_<k>/weights_best.safetensors); train it first"
            )
        return folder

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return {int(value): str(name) for value, name in self.plan.labels}

    @property
    def calibration(self) -> Calibration | None:
        """The folder's ``calibration.json`` (``medseg calibrate``), validated; None if absent."""
        return read_calibration(self.path / CALIBRATION_FILE, self.plan.num_classes)

    def fold_dir(self, fold: int) -> Path:
        """The folder of fold ``fold`` (which may not exist)."""
        return self.path / f"fold_{fold}"

    def folds(self, kind: str = "best") -> list[int]:
        """The folds that have ``kind`` weights, in increasing order."""
        _check_kind(kind)
        found = []
        for d in self.path.glob("fold_*"):
            if d.name[5:].isdigit() and d.is_dir() and has_weights(d, kind):
                found.append(int(d.name[5:]))
        return sorted(found)

    def select_folds(self, folds: list[int] | None = None, kind: str = "best") -> list[int]:
        """``folds`` (default: every fold with ``kind`` weights), checked.

        Raises
        ------
        MedsegError
            One line naming the folder, when one of them, or all, has no ``kind`` weights.
        """
        found = self.folds(kind)
        folds = found if folds is None else list(folds)
        missing = [f for f in folds if f not in found]
        if not folds or missing:
            raise MedsegError(f"{self.path}: no {kind} weights for fold(s) {missing or 'any'}")
        return folds

    def training_record(self, fold: int) -> dict[str, Any] | None:
        """The fold's ``train_config.json`` as plain JSON (``None`` when absent)."""
        path = self.fold_dir(fold) / "train_config.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MedsegError(f"{path}: unreadable training record ({exc})") from None
        return record if isinstance(record, dict) else None

    def network_name(self, fold: int, kind: str = "best") -> str:
        """The registered name of the network trained in fold ``fold``.

        From the weights metadata, else the training record's ``model``, else the plan.
        """
        return self._network_name(fold, read_weights_metadata(self.fold_dir(fold), kind))

    def _network_name(self, fold: int, metadata: Mapping[str, Any]) -> str:
        name = metadata.get("network")
        if not name:
            record = self.training_record(fold) or {}
            name = record.get("model")
        return str(name or self.plan.network.name)

    def load_networks(
        self,
        folds: list[int] | None = None,
        *,
        kind: str = "best",
        device: torch.device | str = "cpu",
        fuse_batchnorm: bool = True,
    ) -> list[torch.nn.Module]:
        """The networks of ``folds`` (default: all with ``kind`` weights), ready to predict.

        Parameters
        ----------
        folds
            Folds to load; checked with :meth:`select_folds`.
        kind
            ``"best"`` or ``"last"`` weights.
        device
            Where the networks go.
        fuse_batchnorm
            Fold each BatchNorm into the convolution before it (same outputs, fewer passes;
            see :mod:`medseg.models.fusion`); False keeps the trained module structure,
            e.g. to edit the network.

        Returns
        -------
        list of torch.nn.Module
            In eval mode, on ``device``, in the plan's channels-last memory format.
        """
        device = torch.device(device)
        networks = []
        for fold in self.select_folds(folds, kind):
            state, metadata = read_weights(self.fold_dir(fold), kind)
            model = build_network(
                self.plan, name=self._network_name(fold, metadata), deep_supervision=False
            )
            model.load_state_dict(state)
            model.eval()
            if fuse_batchnorm:
                fuse_conv_batchnorm(model)
            networks.append(model.to(device).to(memory_format=memory_format(self.plan.ndim)))
        return networks
