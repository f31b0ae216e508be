"""Making models smaller: weight-only quantization and pruning, each returning a model the loader can save and read."""
