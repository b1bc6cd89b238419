"""The model runtime: ONNX Runtime sessions (CUDA or CPU), their runner and their logging."""
