"""d2v checkpoint -> one verified, self-describing ONNX model file (fp32, fp16 or int8)."""

from .graph import OPSET, ExportError
from .metadata import read as read_metadata
from .pipeline import MIN_COSINE, TOLERANCE, ParityError, export_model

__all__ = ["MIN_COSINE", "OPSET", "TOLERANCE", "ExportError", "ParityError", "export_model", "read_metadata"]
