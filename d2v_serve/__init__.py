"""d2v serving: gRPC embeddings of audio, images and text from d2v ONNX model files (torch-free)."""
