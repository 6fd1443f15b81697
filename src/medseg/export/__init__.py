"""Export trained networks to ONNX (fp32, int8) and TorchScript, checked against PyTorch."""

from medseg.export.onnx import FORMATS, INT8_MODES, ExportReport, export_model, quantize_onnx
from medseg.export.prune import prune_model_dir, prune_unet

__all__ = [
    "FORMATS",
    "INT8_MODES",
    "ExportReport",
    "export_model",
    "prune_model_dir",
    "prune_unet",
    "quantize_onnx",
]
