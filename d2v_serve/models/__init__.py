"""The served models: the typed model-file contract and the registry that loads a folder of model files."""
