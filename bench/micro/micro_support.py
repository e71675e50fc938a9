"""Shared by bench/micro's conftest and benchmarks (a name that cannot clash with tests/conftest.py)."""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THROUGHPUT: list[tuple[str, str, float, str]] = []


def _load_reference():
    """tests/wire_reference.py, imported by path (tests/ is not a package)."""
    path = os.path.join(REPO, "tests", "wire_reference.py")
    spec = importlib.util.spec_from_file_location("wire_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def record_throughput(benchmark, name: str, amount: float, unit: str) -> None:
    """After benchmark(...) ran: amount (bytes or messages) per call over the median time."""
    median = benchmark.stats.stats.median
    rate = amount / median
    if unit == "MB/s":
        rate /= 1e6
    benchmark.extra_info[unit] = round(rate, 1)
    THROUGHPUT.append((benchmark.group or "", name, rate, unit))
