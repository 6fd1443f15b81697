"""Export trained networks to ONNX (fp32, int8) and TorchScript, checked against PyTorch."""

from medseg.export.onnx import ExportReport, export_model, quantize_onnx

__all__ = ["ExportReport", "export_model", "quantize_onnx"]
