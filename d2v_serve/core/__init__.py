"""The transport-free embedding core: request plan, admission, preparation (chunking included), per-model batchers,
relay, postprocessing, result assembly and the drain. Transports call `EmbeddingCore.serve` and `describe`."""
