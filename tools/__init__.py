"""Tools beside the method: the benchmark (python -m tools.bench)."""
