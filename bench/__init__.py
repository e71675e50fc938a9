"""pgfast benchmarks: `python -m bench` (see bench/README.md) and bench/micro (pytest-benchmark)."""
