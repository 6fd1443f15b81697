"""ONNX / TorchScript export of a model folder, int8 quantization, and agreement checks.

``export_model`` writes ``<model_dir>/export/``:

* ``fold_<k>.onnx``: fp32, dynamic batch and spatial axes (any size the network's
  strides divide), checked with onnxruntime against PyTorch;
* ``fold_<k>_int8_dynamic.onnx``: weights int8, activations quantized on the fly
  (onnxruntime ``quantize_dynamic``);
* ``fold_<k>_int8_static.onnx``: weights and activations int8 (QDQ), activation
  ranges calibrated on patches of the training cases (``quantize_static``);
* ``fold_<k>.pt``: TorchScript (``torch.jit.trace``);
* ``export.json``: what was written and the agreement of each file with PyTorch
  (max abs logit difference, share of voxels with the same argmax).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.imaging.atomic import atomic_path
from medseg.io.dataset import DatasetSpec, read_case_image
from medseg.model_folder import ModelFolder
from medseg.preprocessing.preprocess import preprocess_image, preprocessed_folder
from medseg.runtime import usable_cores
from medseg.serialization import write_json_atomic
from medseg.training.splits import read_splits

QUANTIZABLE_OPS = {"Conv", "MatMul", "Gemm", "ConvTranspose"}
INT8_MODES = ("dynamic", "static")
FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class ExportReport:
    """What ``export_model`` wrote and how closely each file matches PyTorch."""

    model_dir: str
    format: str
    files: dict[str, str] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise MedsegError(f"{path}: already exists (use --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)


def _test_inputs(plan, *, seed: int = 0) -> list[np.ndarray]:
    """A patch-sized input and a larger, differently shaped one (exercises dynamic axes)."""
    rng = np.random.default_rng(seed)
    patch = [int(p) for p in plan.patch_size]
    # the network's total stride: every spatial size must be a multiple of it
    total = np.prod(np.array(plan.network.strides), axis=0).astype(int)
    bigger = [p + int(t) for p, t in zip(patch, total)]
    return [
        rng.standard_normal((1, plan.num_channels, *patch)).astype(np.float32),
        rng.standard_normal((2, plan.num_channels, *bigger)).astype(np.float32),
    ]


def compare_outputs(reference: np.ndarray, other: np.ndarray) -> dict:
    """Max abs logit difference and argmax agreement of two ``(N, K, *S)`` logit arrays."""
    return {
        "max_abs_logit_diff": float(np.abs(reference - other).max()),
        "argmax_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
    }


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, model: torch.nn.Module, inputs: list[np.ndarray]) -> dict:
    """Run the ONNX file with onnxruntime and compare with the PyTorch network."""
    session = _session(path)
    name = session.get_inputs()[0].name
    results = []
    for x in inputs:
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).float().numpy()
        out = session.run(None, {name: x})[0]
        results.append({"input_shape": list(x.shape), **compare_outputs(ref, out)})
    return {
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in results),
        "argmax_agreement": min(r["argmax_agreement"] for r in results),
        "inputs": results,
    }


def export_onnx(
    model: torch.nn.Module, path: Path, *, example: np.ndarray, opset: int = 17
) -> Path:
    """Write ``model`` as ONNX with dynamic batch and spatial axes (atomically)."""
    ndim = example.ndim - 2
    axes = {0: "batch", **{i + 2: f"s{i}" for i in range(ndim)}}
    # The TorchScript-based exporter handles the dynamic spatial axes of these networks;
    # its deprecation and tracer warnings say nothing about this model.
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=opset,
            dynamo=False,
        )
    return path


def quantizable_ops(path: str | os.PathLike) -> dict[str, int]:
    """Count of the graph's node types that int8 quantization can convert."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type in QUANTIZABLE_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class _PatchReader:
    """onnxruntime calibration reader over a list of ``(1, C, *P)`` arrays."""

    def __init__(self, name: str, patches: list[np.ndarray]) -> None:
        self.name, self.patches = name, list(patches)

    def get_next(self) -> dict | None:
        return {self.name: self.patches.pop()} if self.patches else None

    def rewind(self) -> None:  # some onnxruntime versions call it
        pass


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mode: str = "dynamic",
    calibration: list[np.ndarray] | None = None,
) -> Path:
    """Quantize an fp32 ONNX model to int8 (``mode`` "dynamic" or "static").

    Raises
    ------
    MedsegError
        When the graph has nothing int8 can represent (no Conv/MatMul/Gemm), when
        static quantization gets no calibration data, or when onnxruntime refuses.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    if mode not in INT8_MODES:
        raise MedsegError(f"unknown int8 mode {mode!r} (use dynamic or static)")
    ops = quantizable_ops(src)
    supported = {k: v for k, v in ops.items() if mode == "static" or k != "ConvTranspose"}
    if not supported:
        raise MedsegError(
            f"{src}: cannot quantize to int8: the graph has no Conv, MatMul or Gemm node "
            f"(nothing whose weights int8 can hold)"
        )
    try:
        with atomic_path(dst) as tmp:
            if mode == "dynamic":
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
            else:
                if not calibration:
                    raise MedsegError(
                        f"{src}: static int8 quantization needs calibration patches (none found)"
                    )
                reader = _PatchReader(_session(src).get_inputs()[0].name, calibration)
                quantize_static(
                    str(src),
                    str(tmp),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax,
                )
    except MedsegError:
        raise
    except Exception as exc:  # onnxruntime's quantizer raises many exception types
        raise MedsegError(f"{src}: cannot quantize to int8 ({str(exc)[:200]})") from None
    return dst


def calibration_patches(
    model_dir: Path, plan, *, count: int = 16, seed: int = 0
) -> list[np.ndarray]:
    """Random patches ``(1, C, *P)`` of the training cases, preprocessed with the plan.

    Reads the preprocessed cache of the work folder (``model_dir/../preprocessed``)
    when it is there, else reads and preprocesses a few training cases.
    """
    rng = np.random.default_rng(seed)
    patch = [int(p) for p in plan.patch_size]
    train_ids: list[str] = []
    if (model_dir / "splits.json").exists():
        train_ids = sorted({c for f in read_splits(model_dir / "splits.json") for c in f["train"]})
    cache = preprocessed_folder(model_dir.parent, plan)
    volumes: list[np.ndarray] = []
    picked = (
        list(rng.choice(train_ids, size=min(count, len(train_ids)), replace=False))
        if train_ids
        else []
    )
    for case_id in picked:
        f = cache / f"{case_id}_data.npy"
        if f.exists():
            volumes.append(np.load(f, mmap_mode="r"))
    if not volumes and (model_dir / "dataset.json").exists():
        spec = DatasetSpec.from_json(json.loads((model_dir / "dataset.json").read_text()))
        ids = picked or [c.case_id for c in spec.cases][:count]
        for case_id in ids[: max(1, count // 4)]:
            data, _ = preprocess_image(read_case_image(spec, spec.case(case_id)), plan)
            volumes.append(data)
    patches = []
    for i in range(count if volumes else 0):
        v = volumes[i % len(volumes)]
        pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, v.shape[1:])]
        v = np.pad(np.asarray(v), pad) if any(b for _, b in pad) else v
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(v.shape[1:], patch)]
        region = (slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, patch))
        patches.append(np.ascontiguousarray(v[region], dtype=np.float32)[None])
    return patches


def export_model(
    model_dir: str | os.PathLike,
    *,
    fmt: str = "onnx",
    int8: tuple[str, ...] = (),
    folds: list[int] | None = None,
    checkpoint: str = "best",
    calibration_count: int = 16,
    overwrite: bool = False,
) -> ExportReport:
    """Export the folds of a model folder to ``model_dir/export/`` and check each file.

    Parameters
    ----------
    model_dir
        A trained model folder (plan.json, fold_<k>/weights_<checkpoint>.safetensors), or a
        work folder holding ``model/``.
    fmt
        ``"onnx"`` or ``"torchscript"``.
    int8
        Quantized ONNX variants to add: ``("dynamic",)``, ``("static",)`` or both.
    folds
        Folds to export (default: all trained).
    checkpoint
        ``"best"`` or ``"last"``.
    calibration_count
        Training patches for static int8 calibration.
    overwrite
        Replace existing exported files.

    Returns
    -------
    ExportReport
        Files written and their agreement with PyTorch (also in ``export/export.json``).
    """
    model_dir = Path(model_dir)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise MedsegError(
                "ONNX export needs onnx and onnxruntime: pip install 'medseg[export]'"
            ) from None
    if fmt not in FORMATS:
        raise MedsegError(f"unknown export format {fmt!r} (use onnx or torchscript)")
    int8 = tuple(int8)
    for mode in int8:
        if mode not in INT8_MODES:
            raise MedsegError(f"unknown int8 mode {mode!r} (use dynamic or static)")
    if int8 and fmt != "onnx":
        raise MedsegError(f"{model_dir}: int8 quantization needs --format onnx (got {fmt})")
    folder = ModelFolder.open(model_dir)
    model_dir, plan = folder.path, folder.plan
    folds = folder.select_folds(folds, checkpoint)
    out_dir = model_dir / "export"
    inputs = _test_inputs(plan)
    files: dict[str, str] = {}
    checks: dict[str, dict] = {}
    calibration: list[np.ndarray] | None = None
    for fold in folds:
        (model,) = folder.load_networks([fold], kind=checkpoint, device="cpu")
        model = model.to(memory_format=torch.contiguous_format)
        if fmt == "torchscript":
            path = out_dir / f"fold_{fold}.pt"
            _check_target(path, overwrite)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, torch.from_numpy(inputs[0]))
            with atomic_path(path) as tmp:
                traced.save(str(tmp))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = torch.jit.load(str(path))
            with torch.inference_mode():
                results = [
                    compare_outputs(
                        model(torch.from_numpy(x)).numpy(), loaded(torch.from_numpy(x)).numpy()
                    )
                    for x in inputs
                ]
            files[f"fold_{fold}"] = str(path)
            checks[f"fold_{fold}"] = {
                "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in results),
                "argmax_agreement": min(r["argmax_agreement"] for r in results),
            }
            continue
        path = out_dir / f"fold_{fold}.onnx"
        _check_target(path, overwrite)
        export_onnx(model, path, example=inputs[0])
        files[f"fold_{fold}"] = str(path)
        checks[f"fold_{fold}"] = check_onnx(path, model, inputs)
        for mode in int8:
            qpath = out_dir / f"fold_{fold}_int8_{mode}.onnx"
            _check_target(qpath, overwrite)
            if mode == "static" and calibration is None:
                calibration = calibration_patches(model_dir, plan, count=calibration_count)
            quantize_onnx(path, qpath, mode=mode, calibration=list(calibration or []))
            files[f"fold_{fold}_int8_{mode}"] = str(qpath)
            checks[f"fold_{fold}_int8_{mode}"] = check_onnx(qpath, model, inputs)
    report = ExportReport(model_dir=str(model_dir), format=fmt, files=files, checks=checks)
    write_json_atomic(report, out_dir / "export.json")
    return report
