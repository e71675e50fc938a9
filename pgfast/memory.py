"""Giving memory back after a burst of connections.

Each connection's memory (its Python objects, OpenSSL's SSL object and buffers) is freed
when it closes, but the C allocator keeps freed pages for reuse, so after thousands of
clients come and go the process would stay at its peak. Once the number of connections
has fallen well below its peak, free pages are handed back to the system
(glibc's malloc_trim); elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

CHECK_SECONDS = 5.0
# fewer connections than at the peak by at least this many: worth a trim (it costs a few ms)
_DROP = 256


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):    # not glibc (musl has no malloc_trim)
        return None


class Trimmer:
    def __init__(self):
        self._trim = _malloc_trim()
        self._peak = 0

    def saw(self, connections: int) -> None:
        """A connection opened; there are now this many."""
        if connections > self._peak:
            self._peak = connections

    def check(self, connections: int) -> bool:
        """Called every CHECK_SECONDS with the number of connections; True when it trimmed."""
        if self._trim is None or self._peak - connections < _DROP:
            return False
        self._peak = connections
        self._trim(0)
        return True
