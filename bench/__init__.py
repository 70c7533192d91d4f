"""Headrace's benchmarks: `python -m bench [SCENARIO] [OPTIONS]` (see bench/README.md)."""
