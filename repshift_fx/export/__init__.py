"""Deployment: the compressed graph as ONNX (torch.export -> torch.onnx), run in onnxruntime.

    exported = repshift_fx.export(model, x, "model.onnx", keep=0.7)   # exported.path, .report

onnx, onnxscript and onnxruntime (the `export` extra) are imported only when used.
"""
from repshift_fx.export.onnx import Exported, export

__all__ = ["export", "Exported"]
