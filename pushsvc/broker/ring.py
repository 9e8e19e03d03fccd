"""Consistent hashing of keys over named Redis servers (several ``--redis``).

Places every key exactly where txredisapi 1.6's ``HashRing`` did (earlier
releases reached Redis through it), so a cluster upgraded across the change
of Redis client keeps each uid's channel and history on the same server:
160 points per server at ``crc32(b"<name>:<i>")``; a key goes to the first
point at or after ``crc32(key)`` (bisect_right) and, past the last point, to
the last one — txredisapi clamps there instead of wrapping round, and so must
we.  tests/test_ring.py compares the two on many keys.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

REPLICAS = 160


def hash_ring(named: Sequence[tuple[str, T]]) -> Callable[[bytes], T]:
    """A function from a key to the value whose name owns it on the ring."""
    ring: dict[int, T] = {}
    points: list[int] = []  # duplicates kept, as txredisapi keeps them (the later name wins)
    for name, value in named:
        for i in range(REPLICAS):
            point = zlib.crc32(b":".join([name.encode(), str(i).encode()]))
            ring[point] = value
            points.append(point)
    points.sort()
    last = len(points) - 1

    def place(key: bytes) -> T:
        return ring[points[min(bisect.bisect(points, zlib.crc32(key)), last)]]

    return place
