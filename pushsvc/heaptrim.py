"""Give memory freed by closed connections back to the operating system.

A push server's heap breathes with its connections: a reconnect storm
allocates tens of megabytes that are freed when those browsers leave.
CPython returns its own arenas, but glibc's malloc keeps the freed chunks
of everything else (buffers, Autobahn's per-connection objects) for reuse,
so RSS ratchets up over days of churn (docs/performance.md, "Soak").
``malloc_trim(0)`` hands the unused tops and pages back; it takes a few
milliseconds, so it runs on a timer, not per connection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

from twisted.application.internet import TimerService


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def trim() -> bool:
    """Release free heap memory to the OS; True if the C library can and did."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


def trimmer(interval: float) -> TimerService:
    """A service that trims every ``interval`` seconds."""
    return TimerService(interval, trim)
