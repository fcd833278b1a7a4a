"""Tools beside the method: the benchmark (python -m tools.bench) and plots of runs (python -m
tools.plots, matplotlib optional)."""
